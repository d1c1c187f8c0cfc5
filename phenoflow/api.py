"""The Python API: load a trained run (or an export folder) and generate by label NAME.

    import phenoflow
    m = phenoflow.load("runs/rxrx1")                       # a run folder or an export folder
    images = m.sample(perturbation="gene_01", experiment="exp_02", n=16, guidance=2.0)   # (16, H, W, C) uint8
    edited = m.counterfactual(control_images, perturbation="gene_01")                   # same shape as the input

Labels are given by name (the run's vocabularies, `m.vocabs`); an unknown name is a LabelError listing close
names the model knows. A label group that is not given is null (unconditional in that group), except a group
whose vocabulary has one name only (e.g. one cell type), which takes that name. Solver and tolerances default to
the run's eval section (dopri5 at rtol = atol = 1e-5); `solver="euler", steps=20` is much faster and coarser.
Noise is drawn from a generator seeded with `seed`, so a call is reproducible.

Expression runs (data.modality=expression): `m.sample(perturbation="G0013+G0030", cell_type="K562", n=100)`
returns a cells x genes float32 array of log1p expression (clamped to [0, the training data's maximum]) or, with
`as_anndata=True`, an AnnData with the gene names and the labels in obs; counterfactual is microscopy only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from phenoflow.config import Config
from phenoflow.errors import ConfigError
from phenoflow.run_config import (
    LabelError,
    RunRef,
    close_names,
    config_for_run,
    find_run,
    run_vocabs,
)

CONTROL = "control"


class Model:
    """A trained model with its config and label vocabularies; build with phenoflow.load()."""

    def __init__(self, net: torch.nn.Module, cfg: Config, vocabs: dict[str, list[str]], manifest: dict,
                 ref: RunRef, device: torch.device):
        self.net, self.config, self.vocabs, self.manifest, self.ref, self.device = net, cfg, vocabs, manifest, ref, device
        self.modality = cfg.data.modality
        self.groups = [g for g in vocabs if g != "gene"]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{g}: {len(v)}" for g, v in self.vocabs.items())
        return f"phenoflow.Model({self.ref.path}, {self.modality}, vocabularies {{{sizes}}})"

    # ---- labels ------------------------------------------------------------------------------------------
    def label_id(self, group: str, name: str) -> int:
        """The index of `name` in the model's `group` vocabulary; LabelError listing close names if unknown."""
        if group not in self.vocabs:
            raise LabelError(f"this model has no {group!r} labels (its label groups: {', '.join(self.groups)})")
        names = self.vocabs[group]
        if not isinstance(name, str):
            raise LabelError(f"{group}={name!r}: give the label's name (a string), e.g. {names[:3]}")
        try:
            return names.index(name)
        except ValueError:
            close = close_names(name, names)
            hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
            raise LabelError(f"unknown {group} {name!r}: not among the model's {len(names)} {group} names "
                             f"({hint}; all names: Model.vocabs[{group!r}])") from None

    def _ids(self, group: str, name: str | None, n: int) -> torch.Tensor:
        names = self.vocabs[group]
        if name is None:
            i = 0 if len(names) == 1 else len(names)  # the only name, else the null row (unconditional)
        else:
            i = self.label_id(group, name)
        return torch.full((n,), i, dtype=torch.long)

    def _perturbation_ids(self, name: str | None, n: int) -> torch.Tensor:
        if self.modality != "expression":
            return self._ids("perturbation", name, n)
        k = int(self.manifest.get("max_combination", self.config.expr.max_combination))
        names = self.vocabs["perturbation"]
        if name is None:
            row = [len(names)] + [-1] * (k - 1)
        else:
            sep = self.manifest.get("columns", {}).get("separator", self.config.expr.combination_sep)
            parts = [p for p in str(name).split(sep) if p]
            if len(parts) > k:
                raise LabelError(f"perturbation {name!r} has {len(parts)} components; the model takes at most {k}")
            row = [self.label_id("perturbation", p) for p in parts] + [-1] * (k - len(parts))
        return torch.tensor([row] * n, dtype=torch.long)

    def labels(self, n: int, perturbation: str | None = None, dose: float | None = None,
               **others: str | None) -> dict[str, torch.Tensor]:
        """The model's label tensors for n samples of one condition, from names."""
        unknown = sorted(set(others) - set(self.groups))
        if unknown:
            raise LabelError(f"unknown label group(s) {unknown}: this model's label groups are {self.groups}")
        out = {"perturbation": self._perturbation_ids(perturbation, n)}
        for g in self.groups:
            if g != "perturbation":
                out[g] = self._ids(g, others.get(g), n)
        if dose is not None or self.modality == "expression":
            out["dose"] = torch.full((n,), float(dose or 0.0), dtype=torch.float32)
        return out

    # ---- generation --------------------------------------------------------------------------------------
    def _solve(self, solver: str | None, steps: int | None) -> dict[str, Any]:
        e = self.config.eval
        return {"method": solver or e.solver, "rtol": e.rtol, "atol": e.atol, "steps": int(steps or e.steps)}

    def _shape(self) -> tuple[int, ...]:
        if self.modality == "expression":
            return (len(self.manifest["genes"]),)
        d = self.config.data
        return (d.channels, d.image_size, d.image_size)

    @torch.no_grad()
    def sample(self, perturbation: str | None = None, experiment: str | None = None, n: int = 16,
               guidance: float = 1.0, seed: int = 0, cell_type: str | None = None, dose: float | None = None,
               solver: str | None = None, steps: int | None = None, batch_size: int = 64,
               as_anndata: bool = False, **covariates: str | None):
        """n samples of one condition, labels by name. Microscopy: uint8 (n, H, W, C) numpy. Expression:
        float32 (n, genes) log1p numpy, or an AnnData with as_anndata=True. guidance w: 1 = none."""
        from phenoflow.flow.guidance import make_velocity_fn
        from phenoflow.flow.solvers import integrate

        if int(n) < 1:
            raise ConfigError(f"n={n}: the number of samples must be >= 1")
        names = {"cell_type": cell_type, **covariates}
        if self.modality != "expression":
            names["experiment"] = experiment
        elif experiment is not None:
            raise LabelError(f"experiment={experiment!r}: expression models take {self.groups}")
        labels = self.labels(int(n), perturbation, dose, **{k: v for k, v in names.items() if v is not None
                                                            or k in self.groups})
        gen = torch.Generator().manual_seed(int(seed))
        x0 = torch.randn(int(n), *self._shape(), generator=gen)
        groups = tuple(self.config.eval.guidance_groups)
        out = []
        for a in range(0, int(n), batch_size):
            lab = {k: v[a:a + batch_size].to(self.device) for k, v in labels.items()}
            x1, _ = integrate(make_velocity_fn(self.net, lab, float(guidance), groups),
                              x0[a:a + batch_size].to(self.device), 0.0, 1.0, **self._solve(solver, steps))
            out.append(x1.float().cpu())
        x = torch.cat(out)
        if self.modality == "expression":
            arr = x.clamp(0.0, self._upper()).numpy().astype(np.float32)
            return self._anndata(arr, perturbation, names, dose) if as_anndata else arr
        from phenoflow.eval.generate import decode

        return decode(x).permute(0, 2, 3, 1).contiguous().numpy()

    @torch.no_grad()
    def counterfactual(self, control_images, perturbation: str, experiment: str | None = None,
                       guidance: float = 1.0, cell_type: str | None = None, source: str = CONTROL,
                       solver: str | None = None, steps: int | None = None):
        """Each control image (uint8 (N, H, W, C) or (H, W, C)) as it would look under `perturbation`: solved
        back to noise with the source labels (`source`, default the control, same experiment), then forward with
        the target labels and guidance w. Returns uint8 of the input's shape."""
        from phenoflow.eval.generate import decode, encode
        from phenoflow.flow.guidance import make_velocity_fn
        from phenoflow.flow.solvers import counterfactual

        if self.modality == "expression":
            raise ConfigError("counterfactual() is for microscopy models; expression models sample from noise")
        imgs = np.asarray(control_images)
        single = imgs.ndim == 3
        imgs = imgs[None] if single else imgs
        c, h, w = self._shape()
        if imgs.ndim != 4 or imgs.shape[1:] != (h, w, c) or imgs.dtype != np.uint8:
            raise ConfigError(f"control_images: expected uint8 (N, {h}, {w}, {c}) or ({h}, {w}, {c}) (channels "
                              f"last, as sample() returns), got {imgs.dtype} {tuple(np.asarray(control_images).shape)}")
        n = imgs.shape[0]
        x = encode(torch.from_numpy(imgs).permute(0, 3, 1, 2)).to(self.device)
        src = {k: v.to(self.device) for k, v in self.labels(n, source, experiment=experiment, cell_type=cell_type).items()}
        tgt = {k: v.to(self.device) for k, v in self.labels(n, perturbation, experiment=experiment,
                                                              cell_type=cell_type).items()}
        groups = tuple(self.config.eval.guidance_groups)
        y, _ = counterfactual(make_velocity_fn(self.net, src, 1.0, groups),
                              make_velocity_fn(self.net, tgt, float(guidance), groups), x, **self._solve(solver, steps))
        out = decode(y.float().cpu()).permute(0, 2, 3, 1).contiguous().numpy()
        return out[0] if single else out

    # ---- expression helpers ------------------------------------------------------------------------------
    def _upper(self) -> float:
        from phenoflow.eval.expression.generate import PRIMEFLOW_CLAMP, train_max

        data = self.ref.run_dir / "data" if self.ref.run_dir else None
        if data is not None and (data / "manifest.json").is_file():
            return train_max(data, self.ref.run_dir / "eval_cache")
        return PRIMEFLOW_CLAMP

    def _anndata(self, x: np.ndarray, perturbation: str | None, names: dict, dose: float | None):
        import anndata
        import pandas as pd

        obs = pd.DataFrame({"condition": [perturbation or "null"] * len(x)},
                           index=pd.Index([f"gen_{i}" for i in range(len(x))], name="cell"))
        for g in self.groups:
            if g != "perturbation":
                v = names.get(g) or (self.vocabs[g][0] if len(self.vocabs[g]) == 1 else "null")
                obs[g] = [v] * len(x)
        obs["dose"] = float(dose or 0.0)
        return anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(self.manifest["genes"], name="gene")))


def load(path: str | Path, ema_std: float | None = None, device: str | None = None,
         overrides: list[str] | None = None) -> Model:
    """A Model from a run folder (runs/NAME) or an export folder (model.json + weights). ema_std: which EMA width
    to load (default the run's eval.ema_std; 0 = raw weights); device: "cpu", "cuda" (default: CUDA if present);
    overrides: dotted config overrides (e.g. ["eval.solver=heun"]); a conflict with the checkpoint is an error."""
    ref = find_run(path)
    if ref.export_dir is None:
        raise ConfigError(f"{ref.path} has no export (export/model.json): the run has not finished training; "
                          f"rerun `phenoflow train --run-dir {ref.path}` to finish or export it")
    cfg = config_for_run(ref, overrides)
    std = cfg.eval.ema_std if ema_std is None else float(ema_std)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.data.modality == "expression":
        from phenoflow.eval.expression.generate import load_expression_export

        net, _, manifest = load_expression_export(ref.export_dir, std)
    else:
        import json

        from phenoflow.eval.evaluate import load_export

        net, _, _ = load_export(ref.export_dir, std)
        mpath = ref.export_dir / "manifest.json"
        manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    vocabs = run_vocabs(ref)
    if not vocabs:
        raise ConfigError(f"{ref.path}: no label vocabularies (export/manifest.json or vocab.json) to map names")
    return Model(net.to(dev).eval(), cfg, vocabs, manifest, ref, dev)
