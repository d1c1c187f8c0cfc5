"""Finetuning: a new run starts from another run's weights (docs/finetune.md).

`train.init_from` names a run folder, an export folder or a consolidated `latest.pt`; `train.init_ema` picks
the raw weights (0) or one EMA width of the source. When a run starts with no checkpoint of its own, the
trainer calls `init_from_checkpoint` before the first step: rank 0 reads the source, matches it to the new
model (below), writes `finetune.json` and `finetune.md` in the run folder, and every engine receives the
weights through its full-state path (`engine.load_full_state({"model": full})`), with fresh optimizer state
and a sample count of 0. From then on the run checkpoints and resumes like any other: a rerun resumes from its
own checkpoint and never reads the source again.

Trust boundary: the source is read only through safetensors (an export's `model.safetensors`,
`ema-<std>.safetensors`) or `torch.load(weights_only=True)` (a consolidated `latest.pt`), and JSON
(`vocab.json`, `manifest.json`, `model.json`); an engine-native folder (`checkpoints/native/`) is never read.
A file that pickles anything but tensors and plain containers is refused with an error naming the file and
the refused global; nothing in it runs.

Matching, tensor by tensor (parameters of the new model; its buffers are rebuilt by the new run):
  - same name and shape: copied ("loaded");
  - a label table (MiT `label_embedders.<group>.weight`, expression `...labels.<group>.table.weight`; one row
    per label plus the null row last): rows matched BY NAME between the source's and the new run's vocabulary
    of that group. Labels in both keep the source's row bit for bit; the null row is carried to the new
    table's last row; a NEW label's row is initialised to the source's NULL row (rule below); labels only in
    the source are dropped (listed);
  - a gene-axis tensor of an expression model (U-Net `gene_embed` (C, G); MLP `inp.weight` (W, G),
    `out.weight` (G, W), `out.bias` (G,)): positions matched by gene name between the source's and the new
    run's gene lists (manifest `genes`); a new gene's slice is the mean over the source's genes (`gene_embed`,
    `out.*`: a new gene starts as the average gene) or zero (`inp.weight`: a new gene's input does not move the
    hidden state at first);
  - in the new model only: kept at the new run's initialisation ("new tensors"); in the source only: dropped;
  - any other shape difference is an error naming each tensor and both shapes.

Init rule for new labels: the source's null row. Classifier-free training (label dropout) makes the null row
the embedding of "label unknown", so a new perturbation starts as the pretrained model's unconditional
prediction for its other labels (a model state it was trained on), and learns its own row from there; the
mean of the learned rows is an input the source never saw. Rows of new labels start equal, and separate as
soon as their data differ (each row gets only its own label's gradient).

Frozen base (`train.trainable`, `setup_trainable`): "adaln" trains only the MiT's adaLN modulation layers and
label tables, "adaptor" only the adaLN modulation layers and the molecule adaptor (`mol_adaptor.*`; the MiT
paper's finetuning of its molecule model, docs/molecules.md), "conditioning" only an expression model's
conditioning module (`cond.*`: time, label and dose embeddings); every other parameter gets
requires_grad=False before the optimizer is built. Frozen parameters carry zero Adam moments in the optimizer
state so that checkpoints keep the moments of the trained ones (exact resume).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phenoflow.errors import CheckpointError
from phenoflow.train.checkpoint import (
    WeightsMismatchError,
    ema_filename,
    load_safetensors,
    write_json,
)
from phenoflow.train.ema import std_key
from phenoflow.train.safe_load import UnsafeCheckpointError, refused_global

CONSOLIDATED_FORMAT = "phenoflow-consolidated-v1"  # = Trainer.CONSOLIDATED_FORMAT (no import: no circle)
TABLE_PATTERNS = (re.compile(r"(?:^|\.)label_embedders\.([^.]+)\.weight$"),
                  re.compile(r"(?:^|\.)labels\.([^.]+)\.table\.weight$"))
GENE_AXES = {"gene_embed": (1, "mean"), "inp.weight": (1, "zero"), "out.weight": (0, "mean"), "out.bias": (0, "mean")}
TRAINABLE = {"adaln": ("adaLN_modulation.", "label_embedders."), "conditioning": ("cond.",),
             "adaptor": ("adaLN_modulation.", "mol_adaptor.")}  # MiT paper section 5: base frozen but adaLN
NEW_LABEL_RULE = "the source table's null row"


# ---- the source ----------------------------------------------------------------------------------------------
@dataclass
class Source:
    path: Path                  # what init_from named
    kind: str                   # "export" | "consolidated"
    weights_file: Path          # the file the tensors came from
    weights: dict[str, torch.Tensor]
    which: str                  # "raw" | "ema-<std>"
    vocabs: dict[str, list[str]]
    genes: list[str] | None
    modality: str
    samples_seen: int
    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _load_torch(path: Path) -> dict:
    """torch.load(weights_only=True); a refused global is an UnsafeCheckpointError naming it and the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = refused_global(e)
        if named:
            raise UnsafeCheckpointError(f"train.init_from: {path} refused: it pickles more than tensors and plain "
                                        f"containers ({named}); nothing from it was executed") from e
        raise CheckpointError(f"train.init_from: cannot read {path}: not a phenoflow checkpoint or corrupt") from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"train.init_from: cannot read {path}: {type(e).__name__}: {first}") from e


def _run_manifest(run: Path, config: dict) -> dict | None:
    """A run folder's data manifest (JSON): its export's copy, its own data folder, or its shard folder."""
    shards = (config.get("data") or {}).get("shards") or ""
    for m in (run / "export" / "manifest.json", run / "data" / "manifest.json",
              Path(shards) / "manifest.json" if shards else None):
        if m is not None and m.is_file():
            return _json(m)
    return None


def _tensors(obj, where: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"train.init_from: {where} holds no state dict of tensors")
    return dict(obj)


def read_source(init_from: str | Path, ema: float = 0.0) -> Source:
    """The weights, vocabularies and genes of a run folder, an export folder or a consolidated latest.pt."""
    p = Path(init_from)
    if not p.exists():
        raise CheckpointError(f"train.init_from={str(p)!r} does not exist (a run folder, an export folder or a "
                              f"consolidated checkpoints/latest.pt)")
    if p.is_dir() and (p / "model.json").is_file():
        return _read_export(p, p, ema)
    if p.is_dir() and (p / "checkpoints" / "latest.pt").is_file():
        return _read_consolidated(p, p / "checkpoints" / "latest.pt", ema)
    if p.is_dir() and (p / "export" / "model.json").is_file():
        return _read_export(p, p / "export", ema)
    if p.is_file():
        return _read_consolidated(p, p, ema)
    raise CheckpointError(f"train.init_from={str(p)!r}: no checkpoints/latest.pt, export/model.json or model.json "
                          f"in it (engine-native folders such as checkpoints/native/ are never read)")


def _read_export(named: Path, out: Path, ema: float) -> Source:
    meta = _json(out / "model.json")
    config = meta.get("config") or {}
    wfile = out / (ema_filename(ema) if ema else "model.safetensors")
    if ema and not wfile.is_file():
        have = sorted(f.name for f in out.glob("ema-*.safetensors"))
        raise CheckpointError(f"train.init_ema={ema}: {out} has no {wfile.name} (it has {have})")
    weights = load_safetensors(wfile)
    man = _json(out / "manifest.json") if (out / "manifest.json").is_file() else None
    if man is None or "vocabs" not in man:
        raise CheckpointError(f"train.init_from: {out / 'manifest.json'} is missing or has no vocabs: the label "
                              f"rows cannot be matched by name")
    return Source(named, "export", wfile, weights, f"ema-{std_key(ema)}" if ema else "raw", man["vocabs"],
                  man.get("genes"), (config.get("data") or {}).get("modality", "microscopy"),
                  int(meta.get("samples_seen", -1)))


def _read_consolidated(named: Path, ckpt: Path, ema: float) -> Source:
    state = _load_torch(ckpt)
    if not isinstance(state, dict) or state.get("format") != CONSOLIDATED_FORMAT:
        raise CheckpointError(f"train.init_from: {ckpt} is not a consolidated phenoflow checkpoint")
    config = state.get("config") or {}
    if ema:
        emas = state.get("ema") or {}
        if std_key(ema) not in emas:
            raise CheckpointError(f"train.init_ema={ema}: {ckpt} tracks EMA widths {sorted(emas)}")
        weights = _tensors(emas[std_key(ema)], ckpt)
    else:
        weights = _tensors(state.get("model"), ckpt)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    man = _run_manifest(run, config)
    vocab_file = run / "vocab.json"
    vocabs = _json(vocab_file) if vocab_file.is_file() else (man or {}).get("vocabs")
    if vocabs is None:
        raise CheckpointError(f"train.init_from: no {vocab_file} (nor a manifest) beside {ckpt}: the label rows "
                              f"cannot be matched by name")
    return Source(named, "consolidated", ckpt, weights, f"ema-{std_key(ema)}" if ema else "raw", vocabs,
                  (man or {}).get("genes"), (config.get("data") or {}).get("modality", "microscopy"),
                  int(state.get("samples_seen", -1)))


# ---- matching ------------------------------------------------------------------------------------------------
def table_group(name: str) -> str | None:
    for pat in TABLE_PATTERNS:
        m = pat.search(name)
        if m:
            return m.group(1)
    return None


def gene_axis(name: str) -> tuple[int, str] | None:
    for suffix, rule in GENE_AXES.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def remap_rows(src: torch.Tensor, cur: torch.Tensor, src_names: list[str], names: list[str]) -> tuple[torch.Tensor, dict]:
    """A label table (n + 1, D) for `names` from the source's table for `src_names` (null row last)."""
    idx = {n: i for i, n in enumerate(src_names)}
    out = cur.detach().clone()
    null = src[-1].to(out.dtype)
    kept, new = [], []
    for i, n in enumerate(names):
        if n in idx:
            out[i] = src[idx[n]].to(out.dtype)
            kept.append(n)
        else:
            out[i] = null
            new.append(n)
    out[-1] = null
    wanted = set(names)
    dropped = [n for n in src_names if n not in wanted]
    return out, {"kept": len(kept), "new": len(new), "dropped": len(dropped), "new_names": new,
                 "dropped_names": dropped, "kept_names": kept}


def remap_genes(src: torch.Tensor, cur: torch.Tensor, src_genes: list[str], genes: list[str], axis: int,
                rule: str) -> torch.Tensor:
    idx = {g: i for i, g in enumerate(src_genes)}
    pos = [i for i, g in enumerate(genes) if g in idx]
    one = list(src.shape)
    one[axis] = 1
    fill = src.float().mean(dim=axis, keepdim=True) if rule == "mean" else torch.zeros(one)
    out = fill.expand(cur.shape).clone().to(cur.dtype)
    if pos:
        out.index_copy_(axis, torch.tensor(pos), src.index_select(axis, torch.tensor([idx[genes[i]] for i in pos])).to(cur.dtype))
    return out


def adapt(src: Source, target: dict[str, torch.Tensor], vocabs: dict[str, list[str]], genes: list[str] | None,
          buffers: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """The new model's full parameters from the source's (module doc); (weights, report)."""
    out: dict[str, torch.Tensor] = {}
    rep: dict = {"loaded": [], "resized": {}, "genes": None, "new_tensors": [], "dropped_tensors": [],
                 "buffers_not_loaded": []}
    conflicts, gene_tensors = [], []
    for name, cur in target.items():
        s = src.weights.get(name)
        if s is None:
            out[name] = cur.detach().clone()
            rep["new_tensors"].append(name)
            continue
        g = table_group(name)
        if (g is not None and g in vocabs and g in src.vocabs and s.ndim == 2 and cur.ndim == 2
                and s.shape[1] == cur.shape[1] and s.shape[0] == len(src.vocabs[g]) + 1
                and cur.shape[0] == len(vocabs[g]) + 1):
            out[name], info = remap_rows(s, cur, list(src.vocabs[g]), list(vocabs[g]))
            rep["resized"][g] = {"tensor": name, **info}
            continue
        ax = gene_axis(name) if genes and src.genes and list(genes) != list(src.genes) else None
        if ax is not None and s.ndim == cur.ndim and s.shape[ax[0]] == len(src.genes) and \
                cur.shape[ax[0]] == len(genes) and all(s.shape[d] == cur.shape[d] for d in range(s.ndim) if d != ax[0]):
            out[name] = remap_genes(s, cur, list(src.genes), list(genes), *ax)
            gene_tensors.append(name)
            continue
        if tuple(s.shape) != tuple(cur.shape):
            conflicts.append(f"{name}: source {tuple(s.shape)} vs new model {tuple(cur.shape)}")
            continue
        out[name] = s.to(cur.dtype).clone()
        rep["loaded"].append(name)
    if conflicts:
        raise WeightsMismatchError(f"train.init_from: {src.weights_file} does not fit the new model: tensors of "
                                   f"different shapes that no finetuning rule resizes (label tables are matched "
                                   f"by vocabulary, gene axes by gene name): {'; '.join(conflicts)}")
    if not rep["loaded"] and not rep["resized"] and not gene_tensors:
        raise WeightsMismatchError(f"train.init_from: no tensor of {src.weights_file} matches the new model "
                                   f"(another architecture or modality?)")
    for name in sorted(set(src.weights) - set(target)):
        (rep["buffers_not_loaded"] if name in buffers else rep["dropped_tensors"]).append(name)
    if gene_tensors:
        have = set(genes)
        src_set = set(src.genes)
        rep["genes"] = {"tensors": gene_tensors, "kept": sum(g in src_set for g in genes),
                        "new": sum(g not in src_set for g in genes),
                        "dropped": sum(g not in have for g in src.genes),
                        "new_names": [g for g in genes if g not in src_set],
                        "dropped_names": [g for g in src.genes if g not in have],
                        "rule": {n: GENE_AXES[k][1] for n in gene_tensors for k in GENE_AXES
                                 if n == k or n.endswith("." + k)}}
    return out, rep


# ---- the frozen base -----------------------------------------------------------------------------------------
def freeze(model: torch.nn.Module, trainable: str) -> torch.nn.Module:
    """requires_grad=False on every parameter outside train.trainable's set ("all": none frozen)."""
    if trainable == "all":
        return model
    keep = TRAINABLE[trainable]
    hits = 0
    for name, p in model.named_parameters():
        train = any(name.startswith(k) or f".{k}" in name for k in keep)
        p.requires_grad_(train)
        hits += train
    if not hits:
        raise CheckpointError(f"train.trainable={trainable!r}: the model has no parameter in {list(keep)}")
    return model


def _keep_frozen_moments(optimizer: torch.optim.Optimizer, frozen: list[torch.nn.Parameter]) -> None:
    """After each step, frozen parameters hold zero Adam moments and the trained ones' step count, so the
    engine's checkpoint (which keeps moments only when every parameter has them) stays exact."""
    frozen_ids = {id(p) for p in frozen}

    def hook(opt, *_):
        step = next((st["step"] for p, st in opt.state.items() if id(p) not in frozen_ids and "step" in st), None)
        if step is None:
            return
        for p in frozen:
            st = opt.state.get(p)
            if not st:
                opt.state[p] = {"step": step.clone() if torch.is_tensor(step) else step,
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            elif torch.is_tensor(st["step"]):
                st["step"].copy_(step)
            else:
                st["step"] = step

    optimizer.register_step_post_hook(hook)


def setup_trainable(engine, model: torch.nn.Module, trainable: str) -> torch.nn.Module:
    """Freeze by train.trainable, then engine.setup (which builds the optimizer); returns the set-up model."""
    model = engine.setup(freeze(model, trainable))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if frozen:
        _keep_frozen_moments(engine.optimizer, frozen)
    return model


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    n = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        n["trainable" if p.requires_grad else "frozen"] += p.numel()
    return n


# ---- the trainer's entry point -------------------------------------------------------------------------------
def init_from_checkpoint(trainer) -> dict | None:
    """Load train.init_from into a new run (every rank calls; rank 0 reads and writes the report)."""
    cfg, eng = trainer.cfg, trainer.engine
    target = eng.full_model_state()  # collective: the new run's initial weights on rank 0
    payload = None
    if eng.is_main:
        try:
            src = read_source(cfg.train.init_from, cfg.train.init_ema)
            if src.modality != cfg.data.modality:
                raise CheckpointError(f"train.init_from: {src.path} is a {src.modality} run; this run is "
                                      f"data.modality={cfg.data.modality}")
            params = {n: t for n, t in target.items() if n in eng.shapes}
            buffers = tuple(n for n in target if n not in eng.shapes)
            vocabs = {g: list(v) for g, v in trainer.manifest["vocabs"].items() if g in trainer.vocab_sizes}
            full, rep = adapt(src, params, vocabs, trainer.manifest.get("genes"), buffers)
            rep = {"source": str(src.path), "source_kind": src.kind, "weights_file": str(src.weights_file),
                   "weights": src.which, "source_samples_seen": src.samples_seen, "modality": src.modality,
                   "new_label_rule": NEW_LABEL_RULE, "trainable": cfg.train.trainable,
                   "parameters": parameter_counts(trainer.model), **rep}
            write_report(rep, trainer.run_dir)
            payload = (full, rep)
        except Exception as e:  # noqa: BLE001 - every rank stops with rank 0's error (re-raised below)
            payload = e
    payload = eng.broadcast_object(payload)
    if isinstance(payload, BaseException):
        if eng.is_main:
            raise payload
        raise CheckpointError(f"train.init_from failed on rank 0: {payload}")
    full, rep = payload
    eng.load_full_state({"model": full})  # weights only: optimizer state starts fresh
    return rep


def write_report(rep: dict, run_dir: Path) -> None:
    write_json(rep, run_dir / "finetune.json")
    lines = [f"# Finetuning: started from {rep['source']}", "",
             (f"- weights: {rep['weights']} from `{rep['weights_file']}` ({rep['source_kind']}, "
              f"{rep['source_samples_seen']} samples seen)"),
             f"- loaded unchanged: {len(rep['loaded'])} tensors",
             f"- new label rows initialised to {rep['new_label_rule']}",
             (f"- trainable: {rep['trainable']} ({rep['parameters']['trainable']} trainable, "
              f"{rep['parameters']['frozen']} frozen parameters)"), "", "## Label tables (matched by name)", "",
             "| group | tensor | kept | new | dropped | new labels | dropped labels |", "|---|---|---|---|---|---|---|"]

    def names(xs):
        return ", ".join(xs[:20]) + (f" ... (+{len(xs) - 20})" if len(xs) > 20 else "")

    for g, r in rep["resized"].items():
        lines.append(f"| {g} | `{r['tensor']}` | {r['kept']} | {r['new']} | {r['dropped']} | {names(r['new_names'])} "
                     f"| {names(r['dropped_names'])} |")
    if rep["genes"]:
        gr = rep["genes"]
        lines += ["", "## Gene axis (matched by gene name)", "",
                  "- tensors: " + ", ".join(f"`{t}` ({gr['rule'][t]})" for t in gr["tensors"]),
                  f"- genes kept {gr['kept']}, new {gr['new']}, dropped {gr['dropped']}",
                  f"- new: {names(gr['new_names'])}", f"- dropped: {names(gr['dropped_names'])}"]
    lines += ["", "## Tensors", "", f"- new (kept at this run's initialisation): {rep['new_tensors'] or 'none'}",
              f"- dropped (only in the source): {rep['dropped_tensors'] or 'none'}",
              f"- source buffers not loaded (rebuilt by this run): {rep['buffers_not_loaded'] or 'none'}", ""]
    tmp = run_dir / f".finetune.md.tmp{os.getpid()}"
    tmp.write_text("\n".join(lines))
    tmp.replace(run_dir / "finetune.md")
