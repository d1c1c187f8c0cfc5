"""Named presets: one registry of configurations (`phenoflow train --preset NAME`).

Each preset is a function returning a fresh `Config`; `phenoflow.config.resolve` applies overrides on top.
"""
from __future__ import annotations

from collections.abc import Callable

from phenoflow.config_schema import Config

# ----------------------------------------------------------------------------------------------------------
# Presets: one registry of named configurations.

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(name: str):
    def register(fn: Callable[[], Config]) -> Callable[[], Config]:
        PRESETS[name] = fn
        return fn

    return register


@preset("demo")
def _demo() -> Config:
    """The embedded default: a tiny MiT on 32 px synthetic 6-channel cell painting, a few minutes on 2 CPU cores."""
    c = Config()
    c.run.name = "demo"
    c.model.size, c.model.patch_size = "tiny", 4
    c.model.proj_dropout = 0.0
    c.data.image_size, c.data.channels = 32, 6
    c.data.num_perturbations, c.data.num_experiments = 4, 2
    c.data.train_images, c.data.val_images, c.data.samples_per_shard = 2048, 128, 512
    # The tiny MiT's patches (4 x 4 x 6 = 96 values) are as wide as the model (128): it predicts the clean image
    # (velocity prediction stays speckle at this shape), with logit-normal(-0.8, 0.8) times (JiT's recipe), for
    # 2,400 steps of 32: FD_morph 17.5 against 55 for the old 1,200 velocity steps (docs/demo_quality.md).
    c.model.prediction = "data"
    c.flow.time_sampler, c.flow.logit_mean, c.flow.logit_std = "logit_normal", -0.8, 0.8
    c.train.batch_size, c.train.total_samples, c.train.lr = 32, 32 * 2400, 1e-3
    c.train.log_every_samples, c.train.ckpt_every_samples = 32 * 100, 32 * 400
    c.eval.ema_std = 0.05  # a short run: the wider average of the two tracked widths
    # Euler, 20 steps: with the data head the last Euler step lands on the model's clean-image estimate, while
    # Heun's corrector at t = 1 multiplies x1_hat differences by 1 / 0.05; on the sampling study's model euler 20
    # scores FD_morph 22.7 against heun 20's 30.6 (and dopri5's 26.8 at 90 NFE) at half the NFE (docs/studies).
    c.eval.solver, c.eval.steps, c.eval.batch_size = "euler", 20, 64
    c.eval.guidance = [1.0, 2.0]
    return c


@preset("mit-xl2-rxrx1")
def _rxrx1() -> Config:
    """The paper's RxRx1 run: MiT-XL/2, 96x96x6, batch 256, 150k steps, Adam 1e-4, clip 0.5, EMA.

    Data: the public CellFlux/IMPA RxRx1 layout converted with `phenoflow data convert cellflux` (96x96x6 crops,
    splits train / test: evaluated on test). Shape and splits are checked against the manifest before any work;
    data.image_size=0, data.channels=0 and eval.split= (empty) take them from it (phenoflow/manifest_defaults.py),
    e.g. eval.split= for the MiT CSV's iid split."""
    c = Config()
    c.run.name = "mit-xl2-rxrx1"
    c.data.source = "shards"
    c.data.shards = "data/rxrx1"
    c.data.image_size, c.data.channels = 96, 6
    c.eval.split = "test"
    c.eval.guidance = [1.0, 1.5, 2.0]
    c.eval.features = ["inception", "dinov2", "morphology"]
    return c


@preset("mit-xl2-pretrain")
def _pretrain() -> Config:
    """Phenoprints-scale pretraining: MiT-XL/2, 1M steps at global batch 256 on 32 GPUs with ZeRO-2."""
    c = _rxrx1()
    c.run.name = "mit-xl2-pretrain"
    c.data.shards = "data/phenoprints"
    c.data.backend = "dali"
    c.data.num_workers = 8
    c.train.total_samples = 256 * 1_000_000
    c.train.engine, c.train.zero_stage = "deepspeed", 2
    c.train.micro_batch_size = 8  # 32 GPUs x 8
    return c


@preset("mit-xl2h64-rxrx1")
def _rxrx1_h64() -> Config:
    """MiT-XL/2 with 18 heads of 64 (same width and parameters) instead of 16 of 72: no FlashAttention padding."""
    c = _rxrx1()
    c.run.name = "mit-xl2h64-rxrx1"
    c.model.size = "XL-h64"
    return c


@preset("bbbc021")
def _bbbc021() -> Config:
    """BBBC021 (RGB 96x96 crops of compound treatments), MiT-XL/2 with one-hot compound labels (docs/molecules.md).

    Data: the CellFlux/IMPA layout resplit by compound (`python -m phenoflow.data.molecules resplit`: train /
    seen / unseen / unseen_train, the MiT split's unseen compounds of ARCHITECTURE.md) and converted with
    `phenoflow data convert cellflux`. Trains on `train` (no image of an unseen compound) and scores `seen`."""
    from phenoflow.data.molecules import BBBC021_UNSEEN

    c = _rxrx1()
    c.run.name = "bbbc021"
    c.data.shards = "data/bbbc021"
    c.data.image_size, c.data.channels = 96, 3
    c.eval.split = "seen"
    c.mol.unseen = list(BBBC021_UNSEEN)
    return c


@preset("bbbc021-morgan")
def _bbbc021_morgan() -> Config:
    """The paper's unseen-compound finetuning: start from the one-hot bbbc021 run, freeze it except its adaLN
    layers, train the molecule adaptor (Morgan fingerprints, radius 2, 2048 bits; 6 MiT blocks, dose-modulated)
    for 10k steps at batch 128 (8 GPUs x 16 in the paper); score the unseen compounds."""
    c = _bbbc021()
    c.run.name = "bbbc021-morgan"
    c.mol.conditioning, c.mol.representation = "adaptor", "fingerprint"
    c.train.init_from, c.train.trainable = "runs/bbbc021", "adaptor"
    c.train.batch_size, c.train.total_samples = 128, 128 * 10_000
    c.eval.split = "unseen"
    return c


@preset("bbbc021-embedding")
def _bbbc021_embedding() -> Config:
    """As bbbc021-morgan with a precomputed molecule embedding (e.g. MolGPS) from a CSV/NPY/Parquet file keyed
    by compound name (mol.embeddings, mol.embedding_key)."""
    c = _bbbc021_morgan()
    c.run.name = "bbbc021-embedding"
    c.mol.representation, c.mol.embeddings = "embedding", "data/bbbc021_embeddings.csv"
    return c


@preset("compounds-demo")
def _compounds_demo() -> Config:
    """The synthetic unseen-compound benchmark on the CPU (phenoflow/data/synthetic_compounds.py): 48 real NCI
    molecules whose effects follow their logP / TPSA / aromatic rings, 12 unseen by Butina cluster, 24 px RGB.
    Write the data first: `python -m phenoflow.data.synthetic_compounds data/compounds-demo`. One-hot base run."""
    c = Config()
    c.run.name = "compounds-demo"
    c.data.source, c.data.shards = "shards", "data/compounds-demo"
    c.data.image_size, c.data.channels = 24, 3
    c.model.size, c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size = "tiny", 4, 64, 2, 4
    c.model.proj_dropout = 0.0
    c.train.batch_size, c.train.total_samples, c.train.lr = 32, 32 * 300, 2e-3
    c.train.ema_stds, c.eval.ema_std = [0.05], 0.05
    c.eval.solver, c.eval.steps, c.eval.split, c.eval.features = "heun", 10, "seen", ["morphology"]
    return c


@preset("compounds-demo-morgan")
def _compounds_demo_morgan() -> Config:
    """compounds-demo's adaptor finetuning: frozen base but adaLN, a 2-block fingerprint adaptor, 200 steps."""
    c = _compounds_demo()
    c.run.name = "compounds-demo-morgan"
    c.mol.conditioning, c.mol.adaptor_depth = "adaptor", 2
    c.train.init_from, c.train.trainable = "runs/compounds-demo", "adaptor"
    c.train.total_samples, c.train.lr = 32 * 200, 3e-3
    c.eval.split, c.eval.guidance = "unseen", [1.0, 2.0]
    return c


def _expression(c: Config) -> Config:
    c.data.modality, c.model.arch = "expression", "unet"
    c.model.proj_dropout = 0.0
    c.data.samples_per_shard = 4096
    c.flow.path = "linear"
    return c


@preset("expression-demo")
def _expression_demo() -> Config:
    """Expression on the CPU: synthetic negative-binomial counts with known effects (3,000 cells x 256 genes,
    combinations held out), a small gene-axis U-Net (base 16, channel_mult [1, 2, 4]), a few minutes."""
    c = _expression(Config())
    c.run.name = "expression-demo"
    # 350 steps of 64: the held-out combination scores as at 600 steps (rmse 0.335 vs 0.329, energy distance
    # 2.11 vs 2.06 at w = 1) in 58% of the time, so the demo fits its 5-minute CPU budget.
    c.train.batch_size, c.train.total_samples, c.train.lr = 64, 64 * 350, 1e-3
    c.train.log_every_samples, c.train.ckpt_every_samples = 64 * 50, 64 * 175
    c.eval.ema_std = 0.05
    c.eval.solver, c.eval.steps = "euler", 50
    # The combine split puts the held-out combination in test (val holds only controls at this size).
    c.eval.split, c.eval.guidance, c.eval.batch_size = "test", [1.0, 2.0], 256
    return c


@preset("primeflow-norman")
def _primeflow_norman() -> Config:
    """PRiMeFlow on PerturBench's Norman19 (K562, CRISPRa singles and A+B combinations, `combine` split): the
    gene-axis U-Net at the PRiMeFlow shape reference (base 32, channel_mult [1, 2, 4, 8]) on 4,000 HVGs plus
    targets. Point expr.h5ad at the PerturBench-processed norman19 h5ad."""
    c = _expression(Config())
    c.run.name = "primeflow-norman"
    c.data.source, c.expr.h5ad = "anndata", "data/norman19.h5ad"
    c.model.unet_base_channels, c.model.unet_channel_mult = 32, [1, 2, 4, 8]
    c.train.batch_size, c.train.total_samples, c.train.lr = 256, 256 * 50_000, 1e-4
    c.train.log_every_samples, c.train.ckpt_every_samples = 256 * 200, 256 * 5000
    c.eval.solver, c.eval.steps = "euler", 100
    return c


@preset("primeflow-atlas")
def _primeflow_atlas() -> Config:
    """PRiMeFlow atlas pretraining: several PerturBench datasets (genetic and chemical perturbations, different
    cell types and gene panels), each preprocessed alone, on the union of their genes with each dataset's
    unmeasured genes left out of its loss; the dataset is a covariate; `transfer` split. Finetune on a target
    with `train.init_from=runs/primeflow-atlas` (docs/finetune.md). Point expr.atlas at the local h5ad files."""
    c = _primeflow_norman()
    c.run.name = "primeflow-atlas"
    c.expr.h5ad = ""
    c.expr.atlas = ["norman19=data/norman19.h5ad", "srivatsan20=data/srivatsan20.h5ad",
                    "mcfaline23=data/mcfaline23.h5ad"]
    c.expr.atlas_genes, c.expr.split_task = "union", "transfer"
    c.train.total_samples = 256 * 200_000
    c.train.log_every_samples, c.train.ckpt_every_samples = 256 * 500, 256 * 10_000
    return c
