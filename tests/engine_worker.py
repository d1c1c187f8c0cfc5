"""Multi-process engine checks, run under torchrun by tests/test_engine_equivalence.py (not collected by pytest).

For each engine (ddp, deepspeed ZeRO 1/2/3, fsdp2) a tiny MiT is trained on hand-built global batches
(every sample's image, noise, time and labels fixed by (step, sample index), so a rank's slice is the same
data the single-process run sees) and compared with a single-process SingleEngine run of the same global
batch. Rank 0 writes results.json plus, per engine, the consolidated state and export files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from phenoflow.config import resolve
from phenoflow.model.mit import build_model
from phenoflow.train.checkpoint import ema_filename, save_checkpoint, save_safetensors
from phenoflow.train.ema import PowerFunctionEMA
from phenoflow.train.engines import SingleEngine, build_engine

VOCAB = {"perturbation": 3, "experiment": 2}
GLOBAL_BATCH, MICRO = 8, 2
STEPS = 3  # steps before the checkpoint; step STEPS + 1 is the resume check


def tiny_cfg(engine: str = "single", stage: int = 2, run_dir: str = "/tmp/unused", precision: str = "fp32"):
    out, name = str(Path(run_dir).parent), Path(run_dir).name
    return resolve("demo", [
        "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
        "model.label_dropout=0.0", "model.proj_dropout=0.0", "data.image_size=16", "data.channels=3",
        # The paper's velocity head: the demo's data head divides by 1 - t, which scales bf16 rounding by up to 20.
        "model.prediction=velocity", "flow.time_sampler=uniform",
        f"train.batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO}", "train.lr=0.01",
        "train.grad_clip=0.5", f"train.precision={precision}", "train.device=cpu", f"train.engine={engine}",
        f"train.zero_stage={stage}", f"run.out_dir={out}", f"run.name={name}"])


def make_model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    # DiT init zeroes the output layer and adaLN: give them small values so every parameter gets a gradient.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def global_batch(step: int, nan: bool = False) -> dict[str, torch.Tensor]:
    """The step's global batch: x1 (data), x0 (noise), t, labels; fixed by the step index."""
    g = torch.Generator().manual_seed(1000 + step)
    x1 = torch.rand(GLOBAL_BATCH, 3, 16, 16, generator=g) * 2 - 1
    if nan:
        x1[0, 0, 0, 0] = float("nan")
    return {"x1": x1, "x0": torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g),
            "t": torch.rand(GLOBAL_BATCH, generator=g),
            "perturbation": torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
            "experiment": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)}


def train_step(engine, step: int, nan: bool = False) -> dict:
    """One optimizer step on this rank's slice of the global batch, in micro-batches of MICRO."""
    b = global_batch(step, nan)
    per_rank = GLOBAL_BATCH // engine.world_size
    lo = engine.rank * per_rank
    total = torch.zeros(())
    for m in range(engine.accum_steps):
        s = slice(lo + m * MICRO, lo + (m + 1) * MICRO)
        t = b["t"][s]
        tt = t[:, None, None, None]
        xt, target = tt * b["x1"][s] + (1 - tt) * b["x0"][s], b["x1"][s] - b["x0"][s]  # linear path
        with engine.autocast():
            v = engine.forward_model(xt, t, {"perturbation": b["perturbation"][s], "experiment": b["experiment"][s]})
        loss = (v.float() - target).pow(2).mean() / engine.accum_steps
        engine.backward(loss)
        total += loss.detach()
    loss = engine.all_reduce_mean(total).item()
    norm, stepped = engine.step(engine.cfg.train.grad_clip)
    return {"loss": loss, "grad_norm": norm, "stepped": stepped}


def probe_input():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, generator=g),
            {"perturbation": torch.tensor([0, 1, 2, 3]), "experiment": torch.tensor([0, 1, 2, 0])})


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def run_engine(engine_name: str, stage: int, out: Path, ref: dict, precision: str = "fp32") -> dict:
    tag = (engine_name if engine_name != "deepspeed" else f"zero{stage}") + ("" if precision == "fp32" else f"-{precision}")
    edir = out / tag
    cfg = tiny_cfg(engine_name, stage, str(edir / "run"), precision)
    eng = build_engine(cfg)
    eng.setup(make_model(cfg))
    ema = PowerFunctionEMA(eng.ema_view(), stds=(0.05,))
    res: dict = {"records": []}
    for step in range(STEPS):
        res["records"].append(train_step(eng, step))
        ema.update(eng.ema_view(), (step + 1) * GLOBAL_BATCH, GLOBAL_BATCH)

    # Non-finite guard: a NaN sample skips the step everywhere and leaves the weights untouched.
    before = eng.gather(eng.local_pieces("param"))
    bad = train_step(eng, 99, nan=True)
    after = eng.gather(eng.local_pieces("param"))
    res["nonfinite_stepped"] = bad["stepped"]
    if eng.is_main:
        res["nonfinite_weight_change"] = max_diff(after, before)

    # Native checkpoint after STEPS steps, one more step, then reload and redo it.
    native = edir / "native" / "s3"
    native.mkdir(parents=True, exist_ok=True)
    eng.barrier()
    eng.save_native(native)
    full = eng.full_state()  # consolidated (portable) state on rank 0
    ema_full = eng.gather(ema.averaged(0.05))
    eng.barrier()
    nxt = train_step(eng, STEPS)
    res["records"].append(nxt)
    eng.load_native(native)
    again = train_step(eng, STEPS)
    res["native_resume_loss"] = again["loss"]
    res["native_resume_grad_norm"] = again["grad_norm"]

    # Portable path the other way (1 -> N ranks): a fresh engine loads the consolidated state.
    box = [full]
    dist.broadcast_object_list(box, src=0)
    eng2 = build_engine(cfg)
    eng2.setup(make_model(cfg))
    with torch.no_grad():  # scramble first so that loading must overwrite everything
        for p in eng2.local_pieces("param").values():
            p.add_(1.0)
    eng2.load_full_state(box[0])
    res["consolidated_resume_loss"] = train_step(eng2, STEPS)["loss"]

    # Probe output of the trained distributed model (step STEPS weights) for the export check.
    eng.load_native(native)
    eng.model.eval()
    x, t, labels = probe_input()
    labels = {k: v.clamp(max=VOCAB[k] - 1) for k, v in labels.items()}
    with torch.no_grad():
        probe = eng.forward_model(x, t, labels)
    if eng.is_main:
        res["weights_vs_reference"] = max_diff(full["model"], {n: ref["weights_at_3"][n] for n in full["model"]})
        res["ema_vs_reference"] = max_diff({k: v for k, v in ema_full.items() if k in full["model"]},
                                           {k: ref["ema_at_3"][k] for k in full["model"]})
        res["opt_step"] = full["optimizer"]["step"]
        save_checkpoint(full, edir / "consolidated.pt")
        save_safetensors(full["model"], edir / "export" / "model.safetensors")
        save_safetensors(ema_full, edir / "export" / ema_filename(0.05))
        torch.save(probe, edir / "probe.pt")
    dist.barrier()
    return res


def reference(precision: str) -> tuple[list[dict], dict]:
    """Single process, whole global batch: records of STEPS + 1 steps, weights and EMA after STEPS."""
    eng = SingleEngine(tiny_cfg("single", precision=precision))
    model = eng.setup(make_model(eng.cfg))
    ema = PowerFunctionEMA(eng.ema_view(), stds=(0.05,))
    records, ref = [], {}
    for step in range(STEPS + 1):
        if step == STEPS:
            ref = {"weights_at_3": {n: p.detach().clone() for n, p in model.named_parameters()},
                   "ema_at_3": ema.averaged(0.05)}
        records.append(train_step(eng, step))
        ema.update(eng.ema_view(), (step + 1) * GLOBAL_BATCH, GLOBAL_BATCH)
    return records, ref


class Planted:
    """A __reduce__ payload (tests/test_security.py): unpickling it with full pickle runs exec, which creates
    `marker`; a safe reader refuses the global `exec` before anything runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def plant(native: Path, target: str, marker: Path) -> dict[Path, bytes]:
    """Plant a Planted payload in a native checkpoint (rank 0); returns the original bytes of the changed files.
    Targets: model (DeepSpeed model states), optim1 (rank 1's optimizer states), metadata (DCP .metadata),
    bytes (a DCP non-tensor entry, optimizer.param_groups.0.lr, appended to a .distcp file)."""
    import dataclasses
    import io
    import pickle

    if target in ("metadata", "bytes"):
        mdf = native / "dcp" / ".metadata"
        md = pickle.loads(mdf.read_bytes())  # our own file, written just before
        if target == "metadata":
            originals = {mdf: mdf.read_bytes()}
            md.planted = Planted(marker)
        else:
            idx = next(i for i in md.storage_data if i.fqn == "optimizer.param_groups.0.lr")
            info = md.storage_data[idx]
            data = native / "dcp" / info.relative_path
            originals = {mdf: mdf.read_bytes(), data: data.read_bytes()}
            buf = io.BytesIO()
            torch.save(Planted(marker), buf)
            md.storage_data[idx] = dataclasses.replace(info, offset=len(originals[data]), length=len(buf.getvalue()))
            data.write_bytes(originals[data] + buf.getvalue())
        mdf.write_bytes(pickle.dumps(md))
        return originals
    pattern = "*zero_pp_rank_1_*optim_states.pt" if target == "optim1" else "*mp_rank_00_model_states.pt"
    f = min(native.glob(pattern))
    originals = {f: f.read_bytes()}
    sd = torch.load(f, map_location="cpu", weights_only=False)  # our own file, written just before
    sd["planted"] = Planted(marker)
    torch.save(sd, f)
    return originals


def plant_checks(out: Path, specs: str) -> None:
    """Security checks (tests/test_security.py). Per "engine:stage:target+target...": one step, a native
    checkpoint, then per target: plant a payload, try load_native (target "direct": DeepSpeed's own
    load_checkpoint inside deepspeed_safe_load, without the screening), restore the files. Last, the clean
    checkpoint loads and step 2 repeats. Each rank writes plant-rank<r>.json: per target the error raised and
    whether the payload ran."""
    import os

    res: dict = {}
    for spec in specs.split(","):
        name, stage, targets = spec.split(":")
        edir = out / f"{name}{stage}"
        cfg = tiny_cfg(name, int(stage), str(edir / "run"))
        eng = build_engine(cfg)
        eng.setup(make_model(cfg))
        train_step(eng, 0)
        native = edir / "native" / "s1"
        native.mkdir(parents=True, exist_ok=True)
        eng.barrier()
        eng.save_native(native)
        eng.barrier()
        expect = train_step(eng, 1)["loss"]
        for target in targets.split("+"):
            marker = edir / f"ran-{target}"
            originals = plant(native, "model" if target == "direct" else target, marker) if eng.is_main else {}
            eng.barrier()
            err = None
            try:
                if target == "direct":
                    from phenoflow.train.safe_load import deepspeed_safe_load

                    with deepspeed_safe_load(eng.ds):
                        eng.ds.load_checkpoint(str(native.parent), tag=native.name)
                else:
                    eng.load_native(native)
            except Exception as e:  # noqa: BLE001 - recorded for the test
                err = f"{type(e).__name__}: {e}"
            eng.barrier()
            rec = {"error": err, "ran": marker.exists()}
            if name == "deepspeed":  # the scoped guard is undone
                rec["after"] = [type(eng.ds.checkpoint_engine).__name__,
                                os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")]
            res[f"{name}:{stage}:{target}"] = rec
            if eng.is_main:
                for f, b in originals.items():
                    f.write_bytes(b)
            eng.barrier()
        eng.load_native(native)
        res[f"{name}:{stage}:clean"] = {"expect": expect, "again": train_step(eng, 1)["loss"]}
    (out / f"plant-rank{dist.get_rank()}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """argv: out folder, engine specs "name:stage[:precision]" separated by commas (or "plant=SPECS":
    plant_checks)."""
    out = Path(sys.argv[1])
    if sys.argv[2].startswith("plant="):
        return plant_checks(out, sys.argv[2][len("plant="):])
    results, refs = {}, {}
    for spec in sys.argv[2].split(","):
        name, stage, *prec = spec.split(":")
        precision = prec[0] if prec else "fp32"
        if precision not in refs:  # every rank computes the (tiny) reference itself
            refs[precision] = reference(precision)
            results["reference" if precision == "fp32" else f"reference:{precision}"] = refs[precision][0]
        results[spec] = run_engine(name, int(stage), out, refs[precision][1], precision)
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
