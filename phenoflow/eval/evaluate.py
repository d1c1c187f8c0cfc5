"""`evaluate(cfg, run_dir)`: checkpoint -> generate (solver + guidance) -> features -> metrics -> report.

For every guidance strength w in cfg.eval.guidance, one image is generated per real image of the eval split (same
labels; control images are neither generated nor scored unless eval.include_controls, as in the MiT RxRx1
protocol), saved with its labels to report_dir/samples/w<w>.npz, featurised with each set in cfg.eval.features
and compared with the real images' features:
  FD  Fréchet distance from streamed float64 statistics (summed over ranks when torch.distributed is initialised);
  KD  unbiased MMD^2, cubic kernel, 100 subsets of min(100, n) (reported x 1000; MiT's torch-fidelity settings).
Morphology features are z-scored with the real set's mean and std (std floored at 1% of the feature's scale) and
soft-clipped at +-10 before both (their raw scales differ by orders of magnitude); network features are used raw,
as FID/KID conventionally are.
Real features are cached in run_dir/eval_cache, keyed by a hash of the data manifest, split, image cap,
include_controls, feature set and weights file, so a sweep or a rerun featurises the real images once.
With several ranks each rank generates the disjoint part of the split its loader yields; features are gathered and
ordered by sample key, so the metrics do not depend on the number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from phenoflow.config import Config, from_dict
from phenoflow.eval.features import FeatureUnavailable, extract, weights_path
from phenoflow.eval.generate import LABEL_KEYS, ControlPool, generate, save_samples
from phenoflow.eval.grids import grid_rows, save_grid
from phenoflow.eval.metrics import (
    KID_SCALE,
    FeatureStats,
    frechet_distance,
    kernel_distance,
    reference_scale,
    standardize,
)
from phenoflow.eval.report import METRIC_NAMES, write_report
from phenoflow.eval.report_extras import ReportExtras

log = logging.getLogger(__name__)
CACHE_VERSION = "1"  # bump when a feature extractor's output changes


# ---- distribution helpers (no-ops in a single process) ---------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def gather_by_key(keys: list[str], tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """All ranks' (keys, tensors) concatenated and sorted by key: the same result for any number of ranks."""
    d = _dist()
    if d:
        parts: list[Any] = [None] * d.get_world_size()
        d.all_gather_object(parts, (keys, {k: v.cpu() for k, v in tensors.items()}))
        keys = [k for p in parts for k in p[0]]
        tensors = {name: torch.cat([p[1][name] for p in parts]) for name in tensors}
    if len(set(keys)) != len(keys):
        raise ValueError("evaluation: duplicate sample keys across ranks or within the split")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    idx = torch.tensor(order, dtype=torch.long)
    return [keys[i] for i in order], {k: v[idx] for k, v in tensors.items()}


def gather_samples(images: torch.Tensor, labels: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """Every rank's generated images and labels on rank 0, ordered by sample key (None on other ranks).

    In a single process the inputs are returned unchanged."""
    d = _dist()
    if not d:
        return images, labels
    tensors = {k: v for k, v in labels.items() if k != "key"}
    parts: list[Any] | None = [None] * d.get_world_size() if d.get_rank() == 0 else None
    d.gather_object((labels["key"], images, tensors), parts, dst=0)
    if parts is None:
        return None
    keys = [k for p in parts for k in p[0]]
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    out = {k: torch.cat([p[2][k] for p in parts])[order] for k in tensors}
    out["key"] = [keys[i] for i in order.tolist()]
    return torch.cat([p[1] for p in parts])[order], out


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank scalar over all ranks (the value itself in a single process)."""
    d = _dist()
    if not d:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    d.all_reduce(t)
    return float(t.item()) / d.get_world_size()


# ---- model and data ---------------------------------------------------------------------------------------
def load_export(run_dir: str | Path, ema_std: float | None = None) -> tuple[torch.nn.Module, Config, dict[str, int]]:
    """Build the model from run_dir/export (model.json + ema-<std>.safetensors, or model.safetensors for std 0)."""
    from phenoflow.modalities import image_network
    from phenoflow.train.checkpoint import (
        export_weights,
        load_safetensors,
        load_weights,
    )

    export = Path(run_dir) if (Path(run_dir) / "model.json").is_file() else Path(run_dir) / "export"  # or an export
    meta_path = export / "model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: train the run first (or pass a model)")
    meta = json.loads(meta_path.read_text())
    cfg = from_dict(meta.get("config", meta))
    vocab_sizes = {k: int(v) for k, v in meta.get("vocab_sizes", {}).items()}
    std = cfg.eval.ema_std if ema_std is None else ema_std
    wfile = export_weights(export, std)
    model = image_network(cfg, vocab_sizes)  # the MiT or the ADM U-Net (model.arch)
    state = load_safetensors(wfile)
    from phenoflow.model.molecule_adaptor import attach_from_state

    attach_from_state(model, cfg, state)  # a molecule adaptor run: table, mask and dose range are in the file
    # Non-persistent buffers (e.g. the fixed sin-cos position embedding) may be in an export; they are rebuilt.
    buffers = {k for k, _ in model.named_buffers()} - set(model.state_dict())
    state = {k: v for k, v in state.items() if k not in buffers}
    load_weights(model, state, wfile, built_from=str(meta_path))  # CheckpointError naming file, tensor, shapes
    return model, cfg, vocab_sizes


def _vocab_names(manifest: dict, group: str) -> list[str]:
    """Names of a label group's vocabulary in the shard manifest ("vocabs": {group: [names]})."""
    from phenoflow.data.vocab import Vocab

    vocabs = manifest.get("vocabs", manifest.get("vocabularies", {}))
    v = vocabs.get(group)
    return Vocab.from_json(v).names if v is not None else []


def label_names(manifest: dict) -> dict[str, list[str]]:
    """{group: names} of the label groups a samples file stores (LABEL_KEYS), from the manifest's vocabularies."""
    return {g: _vocab_names(manifest, g) for g in LABEL_KEYS}


def _select(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """Rows idx of a loader batch (tensors indexed, lists such as "key" picked)."""
    rows = torch.tensor(idx, dtype=torch.long)
    return {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in idx]) for k, v in batch.items()}


def _real_batches(cfg: Config, data_dir: Path, rank: int, world: int,
                  remap: dict | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scored, read): the eval split's samples (this rank's part) in manifest order.

    scored: the samples that are generated and scored: non-control images only unless eval.include_controls (the
    MiT RxRx1 protocol scores perturbed images only), at most eval.max_images of them overall.
    read: every batch read, controls included, unfiltered (the source of the counterfactual ControlPool).
    remap: {group: ids} translating the data's label ids to the model's by name (phenoflow.run_config.label_remap).
    """
    from phenoflow.data.loader import ShardLoader

    loader = ShardLoader(data_dir, cfg.eval.split, cfg.eval.batch_size, rank=rank, world_size=world,
                         num_workers=cfg.data.num_workers, seed=0, shuffle=False, drop_last=False, infinite=False,
                         backend=cfg.data.backend, bad_sample_policy=cfg.data.bad_sample_policy,
                         checksums=cfg.data.checksums)
    cap = cfg.eval.max_images // world if cfg.eval.max_images else 0  # per-rank share of the cap
    batches, read, n = [], [], 0
    for b in loader:
        if cap and n >= cap:
            break
        if remap:
            from phenoflow.run_config import apply_remap

            b = apply_remap(b, remap)
        read.append(b)
        idx = list(range(len(b["key"])))
        if not cfg.eval.include_controls:
            idx = [i for i in idx if not bool(b["is_control"][i])]
        if cap:
            idx = idx[:cap - n]
        if not idx:
            continue
        batches.append(b if len(idx) == len(b["key"]) else _select(b, idx))
        n += len(idx)
    if not batches:
        what = "samples" if cfg.eval.include_controls else "non-control samples (eval.include_controls=false)"
        raise ValueError(f"evaluation: split {cfg.eval.split!r} of {data_dir} yielded no {what} on rank {rank}")
    return batches, read


def _cache_key(data_dir: Path, cfg: Config, name: str) -> str:
    h = hashlib.sha256()
    h.update((Path(data_dir) / "manifest.json").read_bytes())
    # A capped subset is taken per rank (max_images // world from each rank's part), so it depends on the world size.
    world = rank_world()[1] if cfg.eval.max_images else 1
    controls = int(cfg.eval.include_controls)
    h.update(f"{CACHE_VERSION}|{cfg.eval.split}|{cfg.eval.max_images}|{world}|{controls}|{name}".encode())
    if name != "morphology":
        p = Path(weights_path(name, cfg.eval))
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def real_features(name: str, images: torch.Tensor, keys: list[str], cfg: Config, data_dir: Path,
                  cache_dir: Path, device: torch.device) -> torch.Tensor:
    """Real-set features (all ranks, sorted by key), read from / written to the cache."""
    from safetensors.torch import load_file

    from phenoflow.train.checkpoint import save_safetensors

    path = cache_dir / f"real_{name}_{_cache_key(data_dir, cfg, name)}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    local = extract(name, images, cfg.eval, device)
    _, g = gather_by_key(keys, {"f": local})
    feats = g["f"]
    if rank_world()[0] == 0:
        meta = {"feature_set": name, "split": cfg.eval.split, "include_controls": str(cfg.eval.include_controls)}
        save_safetensors({"features": feats}, path, metadata=meta)  # temp file, fsync, rename
    return feats


MORPH_CLIP = 10.0  # soft clip of morphology z-scores (metrics.standardize)


def _prepare(name: str, real: torch.Tensor, gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Morphology features of both sets z-scored with the real set's mean and std and soft-clipped at +-MORPH_CLIP
    (metrics.standardize); network features are used raw."""
    if name != "morphology":
        return real, gen
    mean, std = reference_scale(FeatureStats.from_features(real))
    return standardize(real, mean, std, MORPH_CLIP), standardize(gen, mean, std, MORPH_CLIP)


def compare(name: str, real: torch.Tensor, gen_local: torch.Tensor, gen_keys: list[str],
            kd_subsets: int = 100, kd_subset_size: int = 100) -> tuple[dict[str, float], torch.Tensor]:
    """FD and KD (x1000) of one feature set. real: all ranks' features; gen_local: this rank's features.

    Returns (metrics, the gathered generated features sorted by key, after the same preparation as `real`).
    """
    fd_name, kd_name = METRIC_NAMES[name]
    real_p, gen_p = _prepare(name, real, gen_local)
    stats_r = FeatureStats.from_features(real_p)
    stats_g = FeatureStats.from_features(gen_p).all_reduce()  # streamed statistics summed over ranks
    _, g = gather_by_key(gen_keys, {"f": gen_local})
    gen_all = _prepare(name, real, g["f"])[1]
    kd, kd_std = kernel_distance(real_p, gen_all, subsets=kd_subsets, subset_size=kd_subset_size)
    metrics = {fd_name: frechet_distance(stats_r, stats_g), kd_name: kd * KID_SCALE, kd_name + "_std": kd_std * KID_SCALE}
    return metrics, gen_all


def per_perturbation(name: str, real: torch.Tensor, real_pert: torch.Tensor, gen: torch.Tensor,
                     gen_pert: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """FD / KD (x1000) within each perturbation present with >= 2 images in both sets (features as prepared)."""
    fd_name, kd_name = METRIC_NAMES[name]
    out: dict[str, dict[str, float]] = {}
    for p in torch.unique(real_pert).tolist():
        r, g = real[real_pert == p], gen[gen_pert == p]
        if len(r) < 2 or len(g) < 2:
            continue
        kd, _ = kernel_distance(r, g, subsets=100, subset_size=100)
        label = names[p] if p < len(names) else str(p)
        out[label] = {"n_real": len(r), "n_generated": len(g), fd_name: frechet_distance(
            FeatureStats.from_features(r), FeatureStats.from_features(g)), kd_name: kd * KID_SCALE}
    return out


def _data_dir(cfg: Config, data_dir: str | Path | None) -> Path:
    """The shard folder: given, or prepared from cfg.data by rank 0 (synthetic data is written once) and shared."""
    rank = rank_world()[0]
    if data_dir is None and rank == 0:
        from phenoflow.data.prepare import prepare_data

        data_dir = prepare_data(cfg)
    d = _dist()
    if d:
        holder = [str(data_dir) if data_dir is not None else None]
        d.broadcast_object_list(holder, src=0)
        data_dir = holder[0]
    return Path(data_dir)


def _device(cfg: Config) -> torch.device:
    """train.device (auto: CUDA when available); on CUDA the current device (set per rank by the launcher)."""
    use_cuda = torch.cuda.is_available() if cfg.train.device == "auto" else cfg.train.device == "cuda"
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


class _Setup(NamedTuple):
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    data_dir: Path
    manifest: dict
    batches: list  # the rows to generate and score (controls left out unless eval.include_controls)
    controls: ControlPool | None  # counterfactual/control mode: every control read, whatever include_controls
    read: list | None = None  # every batch this rank read, controls included (the report's control images)


def check_mode(cfg: Config, mode: str) -> None:
    """Control mode samples a control -> perturbed model (Config A): refused for a run trained otherwise."""
    if mode == "control" and cfg.flow.coupling != "control":
        from phenoflow.errors import ConfigError

        raise ConfigError(f"mode control samples from control images + noise, as a flow.coupling=control run was "
                          f"trained; this run has flow.coupling={cfg.flow.coupling} (use --mode generate or "
                          f"counterfactual)")


def _setup(cfg: Config, run_dir: Path, model, data_dir, mode: str) -> _Setup:
    """What evaluate() and sample() share: rank, device, the model (default: the run's EMA export), the eval
    split's real batches of this rank and, in counterfactual and control mode, the pool of control images."""
    from phenoflow.data.shards import load_manifest

    check_mode(cfg, mode)
    rank, world = rank_world()
    device = _device(cfg)
    remap, names = None, {}
    own = model is None
    if own:
        model, _, _ = load_export(run_dir, cfg.eval.ema_std)  # before any data is written
    data_dir = _data_dir(cfg, data_dir)
    manifest = load_manifest(data_dir)
    if own:  # the model's vocabularies vs the data's, by name: reordered/subset names mapped, unknown refused
        from phenoflow.run_config import find_run, label_remap, run_vocabs

        names = run_vocabs(find_run(run_dir))
        remap = label_remap(names, manifest.get("vocabs", {}), f"the data in {data_dir}")
    model = model.to(device)
    batches, read = _real_batches(cfg, data_dir, rank, world, remap)
    if remap:  # label names as the model numbers them (grids, per-perturbation scores, samples files)
        manifest = {**manifest, "vocabs": {**manifest.get("vocabs", {}), **names}}
    controls = None
    if mode in ("counterfactual", "control"):
        controls = ControlPool()
        for b in read:
            controls.add_batch(b)
    return _Setup(rank, world, device, model, data_dir, manifest, batches, controls, read)


def evaluate(cfg: Config, run_dir: str | Path | None = None, model: torch.nn.Module | None = None,
             report_dir: str | Path | None = None, mode: str = "generate", seed: int = 0,
             progress: bool = True, data_dir: str | Path | None = None, model_source: dict | None = None) -> Path:
    """Generate for each w in cfg.eval.guidance, score against the eval split, write the report; returns its folder.

    model: a built model to evaluate as is (default: the run's exported EMA weights, eval.ema_std);
    model_source: with `model`, what its weights are for the report's provenance line ({"checkpoint": text,
    "ema_std": width, "samples_seen": n}, e.g. eval/sweep.py's EMA widths);
    data_dir: a shard folder (default: phenoflow.data.prepare.prepare_data(cfg)); report_dir: default run_dir/report.
    """
    run_dir = Path(run_dir or cfg.run_dir)
    report_dir = Path(report_dir or run_dir / "report")
    from_run = model is None  # the run's exported weights (the report names the checkpoint)
    s = _setup(cfg, run_dir, model, data_dir, mode)
    rank, world, device, model, data_dir, manifest, batches, controls = (
        s.rank, s.world, s.device, s.model, s.data_dir, s.manifest, s.batches, s.controls)
    d = _dist()
    pert_names = _vocab_names(manifest, "perturbation")
    extras = ReportExtras(cfg, run_dir, manifest, s.read, pert_names, from_run, model_source) if rank == 0 else None

    real_images = torch.cat([b["image"] for b in batches])
    real_keys = [k for b in batches for k in b["key"]]
    real_pert = torch.cat([b["perturbation"] for b in batches])
    _, gathered = gather_by_key(real_keys, {"p": real_pert})
    real_labels = gathered["p"]  # perturbation of every real image, in the (key-sorted) order of real features
    n_real = len(real_labels)

    features: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    real: dict[str, torch.Tensor] = {}
    for name in cfg.eval.features:
        try:
            real[name] = real_features(name, real_images, real_keys, cfg, data_dir, run_dir / "eval_cache", device)
        except FeatureUnavailable as e:
            skipped[name] = str(e)
            log.warning("feature set %s skipped: %s", name, e)
            continue
        features[name] = {"dim": int(real[name].shape[1])}

    sweep, grids = [], []
    for w in cfg.eval.guidance:
        t0 = time.perf_counter()
        gen_batches = extras.with_controls(batches) if extras is not None else batches  # + the report's controls
        gen, labels, nfe = generate(model, gen_batches, cfg.eval, w, device, seed=seed, mode=mode, controls=controls,
                                    progress=progress and rank == 0, control_noise=cfg.flow.control_noise)
        gen, labels, report_ctrl = extras.split(gen, labels) if extras is not None else (gen, labels, None)
        seconds = time.perf_counter() - t0
        nfe = mean_over_ranks(nfe)  # adaptive solvers: each rank's batches take their own number of steps
        tag = f"w{w:g}"
        gathered = gather_samples(gen, labels)
        if gathered is not None:  # rank 0: one file with every rank's images
            save_samples(report_dir / "samples" / f"{tag}.npz", *gathered, w=w, nfe=nfe, names=label_names(s.manifest))
        metrics: dict[str, float] = {}
        per_pert: dict[str, dict[str, float]] = {}
        for name in features:
            gen_feats = extract(name, gen, cfg.eval, device)
            m, gen_all = compare(name, real[name], gen_feats, labels["key"])
            metrics.update(m)
            if cfg.eval.per_perturbation:
                _, gp = gather_by_key(labels["key"], {"p": labels["perturbation"]})
                real_p = _prepare(name, real[name], gen_all[:0])[0]
                for pert, vals in per_perturbation(name, real_p, real_labels, gen_all, gp["p"], pert_names).items():
                    per_pert.setdefault(pert, {}).update(vals)
        row = {"w": w, "nfe": nfe, "forwards_per_nfe": 1 if w in (0.0, 1.0) else 2, "num_generated": n_real,
               "seconds": round(seconds, 2), "metrics": metrics}
        if per_pert:
            row["per_perturbation"] = per_pert
        sweep.append(row)
        if extras is not None:  # rank 0: control row, effects and means for the report (cheap)
            ctrl = extras.add(model, w, real_images, real_pert, gen, labels, device, seed, mode, controls, report_ctrl)
            rows = grid_rows(real_images, real_pert, gen, labels["perturbation"], pert_names, control=ctrl)
            grids.append(save_grid(rows, report_dir / f"grid_{tag}.png", title=f"w = {w:g}").name)
            log.info("w=%g NFE=%.1f %s", w, nfe, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    if rank == 0:
        results = {
            "run_dir": str(run_dir), "split": cfg.eval.split, "num_real": n_real, "mode": mode, "seed": seed,
            "include_controls": cfg.eval.include_controls,
            "solver": {"method": cfg.eval.solver, "rtol": cfg.eval.rtol, "atol": cfg.eval.atol,
                       "steps": cfg.eval.steps, "guidance_groups": list(cfg.eval.guidance_groups)},
            "world_size": world, "features": features, "features_skipped": skipped, "sweep": sweep,
            "grids": grids, "labels": list(LABEL_KEYS), **extras.results(),
        }
        write_report(report_dir, results)
    if d:
        d.barrier()
    return report_dir


def sample(cfg: Config, run_dir: str | Path | None = None, model: torch.nn.Module | None = None,
           out_dir: str | Path | None = None, mode: str = "generate", seed: int = 0, progress: bool = True,
           data_dir: str | Path | None = None) -> Path:
    """Generate one image per real image of the eval split for each w and save them (no metrics).

    As in evaluate(), control images are left out unless eval.include_controls (they still seed counterfactuals).

    Writes out_dir/w<w>.npz (gathered on rank 0 when distributed) and out_dir/grid_w<w>.png; returns out_dir.
    """
    run_dir = Path(run_dir or cfg.run_dir)
    out_dir = Path(out_dir or run_dir / "samples")
    s = _setup(cfg, run_dir, model, data_dir, mode)
    rank, device, model, batches, controls = s.rank, s.device, s.model, s.batches, s.controls
    pert_names = _vocab_names(s.manifest, "perturbation")
    real_images = torch.cat([b["image"] for b in batches])
    real_pert = torch.cat([b["perturbation"] for b in batches])
    for w in cfg.eval.guidance:
        gen, labels, nfe = generate(model, batches, cfg.eval, w, device, seed=seed, mode=mode, controls=controls,
                                    progress=progress and rank == 0, control_noise=cfg.flow.control_noise)
        tag = f"w{w:g}"
        gathered = gather_samples(gen, labels)
        if gathered is not None:  # rank 0: one file with every rank's images
            save_samples(out_dir / f"{tag}.npz", *gathered, w=w, nfe=nfe, names=label_names(s.manifest))
        if rank == 0:
            rows = grid_rows(real_images, real_pert, gen, labels["perturbation"], pert_names)
            save_grid(rows, out_dir / f"grid_{tag}.png", title=f"w = {w:g}")
            log.info("w=%g: %d images, NFE %.1f -> %s", w, gen.shape[0], nfe, out_dir)
    return out_dir
