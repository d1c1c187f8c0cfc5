"""What the report adds to the metrics (rank 0 only, cheap): control images, effects, per-perturbation means,
provenance.

Control images are not generated or scored by the MiT protocol (eval.include_controls=false); for the grids'
control row and for the effects table (perturbation against control) up to MAX_CONTROLS control images of the
eval split are generated per guidance strength, with the same sampler. They are not part of any metric.
With a fixed-step solver (euler, heun) they are appended to the last scored batch (`with_controls`, `split`): the
noise is drawn per sample key and every sample takes the same steps, so the scored images do not change and the
cost is MAX_CONTROLS more rows in one batch, no extra solve. An adaptive solver chooses its steps per batch, so
there they are generated in a separate solve (`add`). The effects' generated control means are averages over
those few images.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from phenoflow.eval import effects as fx

log = logging.getLogger(__name__)
MAX_CONTROLS = 8  # control images generated per w for the report (cheap: one small batch)


def _control_batches(read: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """The control rows of the loader batches `read`, at most `cap` of them, as loader batches."""
    out, n = [], 0
    for b in read:
        idx = [i for i in range(len(b["key"])) if bool(b["is_control"][i])][:cap - n]
        if not idx:
            continue
        rows = torch.tensor(idx, dtype=torch.long)
        out.append({k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in idx]) for k, v in b.items()})
        n += len(idx)
        if n >= cap:
            break
    return out


def export_samples_seen(export: Path) -> int | None:
    """Samples seen by the weights of an export folder (its model.json), None when it does not say."""
    try:
        return int(json.loads((Path(export) / "model.json").read_text())["samples_seen"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def provenance(cfg: Any, run_dir: Path, from_run: bool, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Which weights produced the report: checkpoint file, EMA width, samples seen (and of how many). source: what
    the caller says of a model it passed in (checkpoint text, ema_std, samples_seen), over the defaults."""
    from phenoflow.train.checkpoint import ema_filename

    out: dict[str, Any] = {"from_run": from_run, "ema_std": float(cfg.eval.ema_std),
                           "total_samples": int(cfg.train.total_samples), "batch_size": int(cfg.train.batch_size)}
    if not from_run:
        out["checkpoint"] = "a model passed in by the caller (not read from the run's export)"
        return {**out, **(source or {})}
    export = run_dir if (run_dir / "model.json").is_file() else run_dir / "export"
    std = cfg.eval.ema_std
    out["checkpoint"] = str(export / (ema_filename(std) if std else "model.safetensors"))
    seen = export_samples_seen(export)
    return out if seen is None else {**out, "samples_seen": seen}


class ReportExtras:
    """Collects, per guidance strength, the control row of the grid, the effects table and the morphology means."""

    def __init__(self, cfg: Any, run_dir: Path, manifest: dict, read: list[dict[str, Any]],
                 pert_names: list[str], from_run: bool, model_source: dict[str, Any] | None = None) -> None:
        self.cfg, self.pert_names = cfg, pert_names
        self.effects = fx.documented_effects(manifest)
        self.ctrl_batches = _control_batches(read or [], MAX_CONTROLS)  # generated: MAX_CONTROLS per w
        every = _control_batches(read or [], 10**9)  # real: every control image read (the effects' baseline)
        self.ctrl_real = torch.cat([b["image"] for b in every]) if every else None
        self.per_w: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {"provenance": provenance(cfg, Path(run_dir), from_run, model_source),
                                     "channels": list(manifest.get("channels", [])),
                                     "effects_tolerance": fx.TOLERANCE}

    def _name(self, i: int) -> str:
        return self.pert_names[i] if i < len(self.pert_names) else str(i)

    def with_controls(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The sweep's batches with the report's control rows appended to the last one (fixed-step solvers only,
        where that changes no scored image; see the module docstring)."""
        self._appended = 0
        fixed = str(self.cfg.eval.solver) in ("euler", "heun")
        if not (fixed and self.ctrl_batches and batches) or self.cfg.eval.include_controls:
            return batches
        last, extra = batches[-1], self.ctrl_batches
        try:
            merged = {k: (torch.cat([v] + [b[k] for b in extra]) if isinstance(v, torch.Tensor)
                          else list(v) + [x for b in extra for x in b[k]]) for k, v in last.items()}
        except (RuntimeError, KeyError, TypeError):
            return batches
        self._appended = sum(len(b["key"]) for b in extra)
        return batches[:-1] + [merged]

    def split(self, gen: torch.Tensor, labels: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any], Any]:
        """(scored images, their labels, the appended control images or None) of a with_controls generation."""
        n = getattr(self, "_appended", 0)
        if not n:
            return gen, labels, None
        return gen[:-n], {k: v[:-n] for k, v in labels.items()}, gen[-n:]

    def add(self, model: torch.nn.Module, w: float, real: torch.Tensor, real_pert: torch.Tensor,
            gen: torch.Tensor, gen_labels: dict[str, Any], device: torch.device, seed: int, mode: str,
            controls: Any, ctrl_gen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Generate this w's control images (unless the sweep did), measure; returns the grid's control row."""
        from phenoflow.eval.generate import generate

        gen_ctrl_mask = gen_labels["is_control"].bool()
        if bool(gen_ctrl_mask.any()):  # eval.include_controls: the sweep generated them
            ctrl_gen = gen[gen_ctrl_mask][:MAX_CONTROLS]
        elif ctrl_gen is not None:  # appended to the sweep's last batch (with_controls)
            pass
        elif self.ctrl_batches:
            ctrl_gen, _, _ = generate(model, self.ctrl_batches, self.cfg.eval, w, device, seed=seed, mode=mode,
                                      controls=controls, progress=False, control_noise=self.cfg.flow.control_noise)
        else:
            ctrl_gen = None
        real_names = [self._name(int(p)) for p in real_pert]
        gen_names = [self._name(int(p)) for p in gen_labels["perturbation"]]
        real_all, gen_all = real, gen
        if self.ctrl_real is not None and "control" not in real_names:
            real_all, real_names = torch.cat([real, self.ctrl_real]), real_names + ["control"] * len(self.ctrl_real)
        if ctrl_gen is not None and not bool(gen_ctrl_mask.any()):
            gen_all, gen_names = torch.cat([gen, ctrl_gen]), gen_names + ["control"] * len(ctrl_gen)
        entry: dict[str, Any] = {"w": w, "morphology_means": fx.morphology_means(real_all, real_names, gen_all,
                                                                                gen_names)}
        if self.effects is not None:
            entry["effects"] = fx.measure(self.effects, real_all, real_names, gen_all, gen_names)
        self.per_w.append(entry)
        if self.ctrl_real is None or ctrl_gen is None:
            return None
        return self.ctrl_real, ctrl_gen

    def results(self) -> dict[str, Any]:
        """The entries write_report reads: provenance, channels, per-w means and effects."""
        return {**self.info, "report_per_w": self.per_w, "documented_effects": self.effects is not None}
