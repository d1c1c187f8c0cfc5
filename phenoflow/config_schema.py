"""The configuration's typed sections (model, flow, data, expr, train, eval, run) and the `Config` that holds them.

Loading, overrides and validation are in `phenoflow.config`; the named presets in `phenoflow.presets`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# Sections.


@dataclass
class ModelConfig:
    arch: str = "mit"  # mit (microscopy transformer) | unet (gene-axis U-Net, expression) | mlp (expression ablation)
    size: str = "XL"  # S | B | L | XL | tiny, see phenoflow.model.mit.MIT_SIZES
    patch_size: int = 2
    # Overrides of the size preset (0 = take the preset's value).
    depth: int = 0
    hidden_size: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    # Image size and channel count come from the data section.
    # Label vocabulary sizes; 0 = taken from the data's vocabularies when the model is built.
    num_perturbations: int = 0
    num_experiments: int = 0
    num_cell_types: int = 0
    label_dropout: float = 0.15  # each label dropped to its null row independently (gives CFG)
    proj_dropout: float = 0.1  # dropout after the attention output projection
    long_skip: bool = True
    # What the MiT's output head predicts: velocity (the MiT paper) or data (the clean image x1, turned into the
    # velocity v = (x1_hat - x_t) / max(1 - t, 0.05) inside the model, as in JiT, Li & He 2025). With patches as
    # wide as the model (the CPU demo: 4 x 4 x 6 = 96 values per token, width 128) velocity prediction cannot
    # pass the per-pixel noise through the token bottleneck and samples stay speckle (docs/demo_quality.md).
    prediction: str = "velocity"
    # MiT output head: 0 = the paper's linear decoder (each p x p patch from its own token); K > 0 = that decoder
    # to K channels, then Conv3x3 -> SiLU -> Conv3x3 to the image channels, so neighbouring patches agree at
    # their borders (the CPU demo's 4 x 4 patch seams; docs/demo_quality.md).
    output_conv: int = 0
    # Expression velocity fields (model.arch=unet|mlp; phenoflow/model/expression.py). CPU-sized defaults; the
    # PRiMeFlow shape reference is base 32, channel_mult [1, 2, 4, 8] (~5.8M parameters at 2,000 genes).
    unet_base_channels: int = 16
    unet_channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])
    unet_num_res_blocks: int = 2
    mlp_width: int = 512
    mlp_depth: int = 4
    kernels: str = "torch"  # torch | triton
    attn_backend: str = "auto"  # auto | flash_attn | sdpa | math


@dataclass
class FlowConfig:
    path: str = "linear"  # linear | vp | bridge
    bridge_sigma: float = 0.1
    coupling: str = "independent"  # independent | ot | control
    control_noise: float = 0.1  # std of the noise added to control images (coupling=control)
    # Probability that a training source gets that noise (per sample; CellFlux: 0.5 with control_noise=1).
    # Sampling from controls always adds it. 1 = always (the default, as before).
    control_noise_prob: float = 1.0
    time_sampler: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class DataConfig:
    modality: str = "microscopy"  # microscopy (images, MiT) | expression (single-cell, U-Net); phenoflow/modalities.py
    source: str = "synthetic"  # synthetic | shards
    shards: str = ""  # folder with a manifest (source=shards); synthetic data is written to run_dir/data
    image_size: int = 96
    channels: int = 6  # 6 (cell painting) or 3 (RGB)
    # Synthetic generator.
    num_perturbations: int = 8
    num_experiments: int = 3
    num_cell_types: int = 1
    train_images: int = 2048
    val_images: int = 256
    synth_seed: int = 0
    samples_per_shard: int = 1024
    # Loading.
    backend: str = "webdataset"  # webdataset | dali
    num_workers: int = 0
    shuffle_buffer: int = 1000
    bad_sample_policy: str = "error"  # error | skip (counted and logged)
    # When image bytes are checked against the crc32 in the shard's label table: first_pass (the first read of
    # each sample after a start or resume; ~40 us per 96x96x6 crop, first epoch only), always, off.
    checksums: str = "first_pass"
    # Batches as a (B, C, H, W) view of the HWC buffer (channels-last strides) instead of a CHW copy: same
    # values, a third of the loader's CPU cost for raw shards (webdataset backend).
    channels_last: bool = True
    # Augmentation (paper: random h/v flips, uniform dequantisation x + U[0,1)/128 on [-1, 1] data).
    hflip: bool = True
    vflip: bool = True
    dequantize: bool = True


@dataclass
class ExpressionConfig:
    """Single-cell expression data (data.modality=expression): where the labels live in the AnnData file
    (PerturBench conventions by default), gene selection, the split, and the synthetic count generator."""
    h5ad: str = ""  # data.source=anndata: this file is preprocessed, split and converted to shards in run_dir/data
    # data.source=anndata, several datasets (an atlas): h5ad files ("name=path", or a path: name = file stem), each
    # preprocessed alone, then put on one gene axis: "union" (every gene; a gene a dataset lacks is left out of
    # that dataset's loss) or "intersection" (data/expression_prep.py: align_datasets says why union is default)
    atlas: list[str] = field(default_factory=list)
    atlas_genes: str = "union"
    # Fixed perturbation vectors beside the learned rows (data/expression_embeddings.py): a table keyed by
    # component name (gene or compound embeddings), or a compound,smiles CSV (Morgan fingerprints, mol.fp_*).
    pert_embeddings: str = ""
    pert_smiles: str = ""
    perturbation_col: str = "condition"
    control_label: str = "control"
    combination_sep: str = "+"
    covariates: list[str] = field(default_factory=lambda: ["cell_type"])
    dose_col: str = "dose"
    dataset_col: str = "dataset"
    counts_layer: str = "counts"
    n_top_genes: int = 4000  # highly variable genes, united with every measured target gene
    split_task: str = "combine"  # transfer | combine | combine_inverse (PerturBench)
    split_seed: int = 42
    max_combination: int = 2  # components per perturbation label (A+B: 2)
    # data.source=synthetic: negative-binomial counts with known effects (phenoflow/data/synthetic_counts.py)
    synth_cells: int = 3000
    synth_genes: int = 256
    synth_cell_types: int = 2


@dataclass
class TrainConfig:
    batch_size: int = 256  # global batch
    micro_batch_size: int = 0  # 0 = batch_size / world size (no accumulation)
    total_samples: int = 256 * 150_000  # training length counted in samples seen
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    ema_stds: list[float] = field(default_factory=lambda: [0.01, 0.05])
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    engine: str = "single"  # single | ddp | deepspeed | fsdp2
    zero_stage: int = 2
    cpu_offload: bool = False  # deepspeed: optimizer states and fp32 masters in CPU memory (ZeRO-Offload)
    deepspeed_config: str = ""  # deepspeed: a JSON file whose keys override the generated DeepSpeed config
    compile: bool = False
    activation_checkpointing: bool = False
    # Intervals in samples or in optimizer steps (set one of the pair); both 0 = scaled to the run
    # (phenoflow/train/run_log.py): a log line every ~1% of the run (and at least once a minute in its first
    # minutes), a checkpoint at ~10 points, a snapshot at ~20 points.
    log_every_samples: int = 0
    log_every_steps: int = 0
    ckpt_every_samples: int = 0
    ckpt_every_steps: int = 0
    # Snapshots (checkpoints/snapshots/): both EMA profiles at numbered points of the run, for post-hoc EMA
    # reconstruction (phenoflow/train/posthoc_ema.py) and checkpoint sweeps. keep: the newest N (0 = all).
    snapshots: bool = True
    snapshot_every_samples: int = 0
    snapshot_every_steps: int = 0
    snapshot_keep: int = 0
    # MFU: the device's dense bf16 peak in TFLOP/s (0 = from phenoflow/train/devices.py; unknown: MFU omitted).
    peak_tflops: float = 0.0
    tensorboard: bool = True  # event files in run_dir/tensorboard (needs the tensorboard package)
    progress_every_s: float = 60.0  # a plain-text progress line with ETA when stderr is not a terminal (SLURM)
    max_nonfinite_steps: int = 10
    # After each optimizer step, check the weights are finite and undo a step that made them non-finite (one
    # fused norm, ~1 ms per step on the demo preset; memory: one more fp32 copy of this rank's weights).
    weight_guard: bool = True
    # Failure detection for multi-process runs (docs/distributed.md): a rank that died or froze ends every other
    # rank within peer_timeout_s (heartbeats in the launcher's store; 0 = off); collective_timeout_s is the
    # process group's timeout, the bound for a rank that is alive but never joins a collective.
    peer_timeout_s: float = 60.0
    collective_timeout_s: float = 1800.0
    # Finetuning (docs/finetune.md): a NEW run starts from these weights (a run folder, an export folder or a
    # consolidated latest.pt; read only through safetensors / weights_only), matched to this run's label
    # vocabularies and genes by name; optimizer state and sample count start fresh. A resumed run ignores it.
    init_from: str = ""
    init_ema: float = 0.0  # 0 = the source's raw weights, else one of its EMA widths (e.g. 0.05)
    trainable: str = "all"  # all | adaln (MiT: adaLN modulation + label tables) | conditioning (expression)


@dataclass
class EvalConfig:
    solver: str = "dopri5"  # dopri5 | heun | euler
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 50  # for fixed-step solvers
    guidance: list[float] = field(default_factory=lambda: [1.0])  # w = 1: no guidance
    guidance_groups: list[str] = field(default_factory=lambda: ["perturbation"])
    # Expression: reference baselines scored beside the model (eval/expression/baselines.py): control, additive.
    baselines: list[str] = field(default_factory=lambda: ["control", "additive"])
    split: str = "val"
    batch_size: int = 64
    max_images: int = 0  # 0 = every real image of the split
    features: list[str] = field(default_factory=lambda: ["morphology"])  # morphology | inception | dinov2
    inception_weights: str = ""  # local path to the converted Inception-v3 weights
    dinov2_weights: str = ""  # local path to DINOv2 ViT-L/14 weights
    ema_std: float = 0.01  # which EMA width to sample from (0 = raw weights); 0.01 as in the public MiT code
    per_perturbation: bool = False  # also FD/KD per perturbation (phenoflow.eval; those with >= 2 images per set)
    include_controls: bool = False  # also generate/score control images (MiT RxRx1 protocol: controls are not scored)


@dataclass
class MolConfig:
    """Molecule conditioning of compound perturbations (docs/molecules.md; phenoflow/data/molecules.py,
    phenoflow/model/molecule_adaptor.py)."""
    conditioning: str = "onehot"  # onehot (label tables) | adaptor (labels with a molecule go through the adaptor)
    representation: str = "fingerprint"  # fingerprint (RDKit Morgan) | embedding (a precomputed table)
    fp_radius: int = 2
    fp_size: int = 2048
    fp_counts: bool = False  # counts instead of bits
    embeddings: str = ""  # representation=embedding: a CSV, NPY (+ .names.txt), NPZ or Parquet file
    embedding_key: str = "name"  # name (compound name) | smiles (canonical SMILES after standardisation)
    smiles_csv: str = ""  # compound,smiles CSV (default: the samples' smiles metadata in the shards)
    adaptor_depth: int = 6  # MiT blocks in the adaptor (paper: 6)
    adaptor_heads: int = 0  # 0 = the model's head count
    dose_log: bool = False  # min-max scale log1p(dose) instead of the dose
    unseen: list[str] = field(default_factory=list)  # held-out compounds (documentation and the unseen report)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run folder is out_dir/name


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    expr: ExpressionConfig = field(default_factory=ExpressionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mol: MolConfig = field(default_factory=MolConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name
