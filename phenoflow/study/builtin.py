"""Built-in studies (`phenoflow study NAME [--size quick|full]`), as the MiT paper describes them (docs/study.md).

mit-design-space  Table 1: Configs A-E on the 2D ADM U-Net and on the MiT.
                  A  control -> perturbed: a control of the same experiment as source, N(0, 1) added with
                     probability 0.5 in training and always at sampling (CellFlux's augmentation; flow.coupling=
                     control, flow.control_noise=1, flow.control_noise_prob=0.5; eval_mode control), trained for
                     0.3x B's samples (the paper early-stopped A at 30k of 100k steps)
                  B  noise -> data, controls as one more perturbation class
                  C  B's runs, counterfactual sampling (inversion from a control of the same experiment)
                  D  B with minibatch OT couplings
                  E  D's runs, counterfactual sampling
interpolants      Table 5: Config B with the linear, variance-preserving and Brownian-bridge (sigma 0.1, 0.5,
                  1.0) paths, on the MiT.
sampling          one Config B MiT run scored with dopri5 at several rtol, Heun and Euler at several step counts
                  (FD and NFE; the question: the reference FD at half the NFE or less with a fixed-step solver).

Sizes: quick = the demo preset's tiny MiT on 32 px synthetic images, 1,200 steps of 32 per run (sampling,
interpolants), scored with Euler 20 steps (the sampling study: better than Heun 20 for the data head at half the
NFE); mit-design-space with seeds 0 and 1 and 800 steps of 32 per run (its 12 trainings and 20 evaluations on 2
cores: the measured time is in its report). full = a GPU size (64 px, MiT-B/4 and an ADM of base 128, 40k steps of
128, seeds 0-2).
"""
from __future__ import annotations

from phenoflow.errors import ConfigError
from phenoflow.study.spec import Study, Variant

SIZES = ("quick", "full")

# Shared by every built-in study of a size: data, training budget, evaluation protocol.
_BASE = {
    "quick": {
        "overrides": ["data.image_size=32", "data.channels=6", "data.num_perturbations=6", "data.num_experiments=3",
                      "data.train_images=2048", "data.val_images=256", "data.samples_per_shard=512",
                      "train.batch_size=32", "train.total_samples=38400", "train.lr=1e-3", "train.device=auto",
                      "train.tensorboard=false", "eval.solver=euler", "eval.steps=20", "eval.batch_size=64"],
        "protocol": ["eval.guidance=[1,2]", "eval.features=[morphology]", "eval.max_images=0", "eval.split=val",
                     "eval.ema_std=0.05"],
        # The demo's recipe (docs/demo_quality.md): the tiny MiT at patch 4 predicts the clean image (its 96-value
        # patches are as wide as the model: velocity prediction stays speckle) with logit-normal(-0.8, 0.8) times;
        # the ADM U-Net (convolutions, no token bottleneck) predicts the velocity as in the paper, same times.
        "mit": ["model.arch=mit", "model.size=tiny", "model.patch_size=4", "model.prediction=data"],
        # Base 16 (not 32): the ADM's full-resolution convolutions run at ~29 images/s per CPU thread at base 32
        # (a quarter of the tiny MiT's speed), which would take the quick study far past its 30-minute size.
        "adm": ["model.arch=unet", "model.unet_base_channels=16", "model.unet_channel_mult=[1,2,2]",
                "model.unet_num_res_blocks=1", "model.prediction=velocity"],
        "samples": 38400,
        # mit-design-space trains 12 runs (A, B, D x 2 models x 2 seeds) and scores 20: 800 steps of 32 each
        # keeps it near 30 minutes on 2 cores (measured: docs/studies/mit-design-space-quick).
        "design_samples": 25600,
        "seeds": [0],
    },
    "full": {
        "overrides": ["data.image_size=64", "data.channels=6", "data.num_perturbations=32",
                      "data.num_experiments=8", "data.train_images=65536", "data.val_images=4096",
                      "data.samples_per_shard=1024", "data.num_workers=4", "train.batch_size=128",
                      "train.total_samples=5120000", "train.lr=1e-4", "flow.time_sampler=uniform", "eval.solver=dopri5",
                      "eval.batch_size=256"],
        "protocol": ["eval.guidance=[1,1.5,2]", "eval.features=[morphology,inception]", "eval.max_images=0",
                     "eval.split=val", "eval.ema_std=0.05"],
        # The paper's recipe: velocity prediction, t ~ U[0, 1) (flow.time_sampler in "overrides").
        "mit": ["model.arch=mit", "model.size=B", "model.patch_size=4", "model.prediction=velocity"],
        "adm": ["model.arch=unet", "model.unet_base_channels=128", "model.unet_channel_mult=[1,2,3,4]",
                "model.unet_num_res_blocks=2", "model.prediction=velocity"],
        "samples": 5120000,
        "design_samples": 5120000,
        "seeds": [0, 1, 2],
    },
}

CONFIG_A = ["flow.coupling=control", "flow.control_noise=1.0", "flow.control_noise_prob=0.5"]


def _study(name: str, size: str, description: str, variants: list[Variant], out_dir: str | None,
           protocol: list[str] | None = None, seeds: list[int] | None = None) -> Study:
    b = _BASE[size]
    return Study(name=f"{name}-{size}", variants=variants, base="demo", overrides=list(b["overrides"]),
                 protocol=list(protocol or b["protocol"]), seeds=list(seeds or b["seeds"]),
                 out_dir=out_dir or "studies", description=description)


def mit_design_space(size: str, out_dir: str | None = None) -> Study:
    b = _BASE[size]
    short = int(b["design_samples"] * 0.3) // 32 * 32
    variants = []
    for arch, label in (("adm", "ADM"), ("mit", "MiT")):
        m = [*b[arch], f"train.total_samples={b['design_samples']}"]
        variants += [
            Variant(f"A-{arch}", [*m, *CONFIG_A, f"train.total_samples={short}"], label=f"{label} control -> perturbed",
                    config="A", eval_mode="control"),
            Variant(f"B-{arch}", [*m, "flow.coupling=independent"], label=f"{label} noise -> data", config="B"),
            Variant(f"C-{arch}", reuse=f"B-{arch}", label=f"{label} B, counterfactual", config="C",
                    eval_mode="counterfactual"),
            Variant(f"D-{arch}", [*m, "flow.coupling=ot"], label=f"{label} B + OT", config="D"),
            Variant(f"E-{arch}", reuse=f"D-{arch}", label=f"{label} D, counterfactual", config="E",
                    eval_mode="counterfactual"),
        ]
    return _study("mit-design-space", size, "The MiT paper's Table 1 (Configs A-E on the ADM U-Net and the MiT) on "
                  "the synthetic benchmark.", variants, out_dir, seeds=[0, 1] if size == "quick" else None)


def interpolants(size: str, out_dir: str | None = None) -> Study:
    # Velocity prediction for every path (model.prediction=data is implemented for the linear path only).
    m = [x for x in _BASE[size]["mit"] if not x.startswith("model.prediction=")] + ["model.prediction=velocity"]
    variants = [Variant("linear", [*m, "flow.path=linear"], label="linear", config="B"),
                Variant("vp", [*m, "flow.path=vp"], label="variance preserving")]
    for s in (0.1, 0.5, 1.0):
        variants.append(Variant(f"bridge-{s:g}", [*m, "flow.path=bridge", f"flow.bridge_sigma={s:g}"],
                                label=f"Brownian bridge sigma={s:g}"))
    return _study("interpolants", size, "The MiT paper's Table 5 (interpolants of Config B) on the synthetic "
                  "benchmark.", variants, out_dir)


def sampling(size: str, out_dir: str | None = None) -> Study:
    b = _BASE[size]
    variants = [Variant("train-B", [*b["mit"], "eval.solver=dopri5", "eval.rtol=1e-5", "eval.atol=1e-5"],
                        label="dopri5 rtol=1e-5 (reference)", config="B")]
    for rtol in ("1e-4", "1e-3", "1e-2"):
        variants.append(Variant(f"dopri5-{rtol}", reuse="train-B", label=f"dopri5 rtol={rtol}",
                                eval_overrides=["eval.solver=dopri5", f"eval.rtol={rtol}", f"eval.atol={rtol}"]))
    for solver, steps in (("heun", (5, 10, 20, 40)), ("euler", (10, 20, 50, 100))):
        for n in steps:
            variants.append(Variant(f"{solver}-{n}", reuse="train-B", label=f"{solver} {n} steps",
                                    eval_overrides=[f"eval.solver={solver}", f"eval.steps={n}"]))
    proto = [p if not p.startswith("eval.guidance=") else "eval.guidance=[1]" for p in b["protocol"]]
    return _study("sampling", size, "FD and NFE of one Config B MiT run under adaptive and fixed-step solvers "
                  "(the goal: the reference FD at half the NFE or less).", variants, out_dir, protocol=proto)


BUILTIN = {"mit-design-space": mit_design_space, "interpolants": interpolants, "sampling": sampling}


def builtin(name: str, size: str = "quick", out_dir: str | None = None) -> Study:
    if name not in BUILTIN:
        raise ConfigError(f"no built-in study {name!r} (built-in: {sorted(BUILTIN)}; or give a SPEC.yaml file)")
    if size not in SIZES:
        raise ConfigError(f"--size {size!r} is not one of {list(SIZES)}")
    study = BUILTIN[name](size, out_dir)
    from phenoflow.study.spec import check

    check(study)
    return study
