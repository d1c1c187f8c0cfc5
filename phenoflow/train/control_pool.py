"""The per-covariate control pool of the control -> perturbed flow (flow.coupling=control, the MiT paper's
Config A; PRiMeFlow's control -> perturbed variant for expression).

The source of training sample i is a control sample of the same condition group plus Gaussian noise:
    x0_i = c_i + flow.control_noise * z_i,   c_i ~ Uniform(controls of the training split in group(i))
(with flow.control_noise_prob < 1 the noise term is kept for each sample with that probability, CellFlux's
augmentation; z_i is drawn first, then the keep mask, from the same step generator)
where group(i) is the sample's ids in the modality's control groups (Modality.control_groups: images
experiment and cell type; expression every covariate and the dataset). c_i goes through the modality's batch
transform like x1 (images: encode, flips, dequantisation; expression: the log1p row).

How the pool is filled: once, at start, an index of every usable control sample of the train split (global
sample ids, grouped by condition) is built from the shards' label tables (no payload is read; shards without a
table, images written before tables existed, are read once through their json members). Each step draws its
controls uniformly, with replacement, from the step generator (derived from seed, rank and samples seen) and
reads them through the loader's own sample reader (the same integrity checks and bad-sample policy). The draw is
therefore a pure function of the step: there is no stream position to carry. The pool's checkpointed state is
what would otherwise differ after a rerun: the index's fingerprint (groups, number of controls; a mismatch on
resume is an error) and, with data.bad_sample_policy=skip, the control samples found unreadable (left out of
their group for the rest of the run, the step's draw redone from the step generator). A target group without
any control is an error at start naming the group.

Controls as targets: control samples stay in the data batch (x1) and are paired with an independently drawn
control of their group (possibly themselves): the batch keeps its fixed shape (no empty or ragged micro-batch,
the same work on every rank) and the model learns the control condition as the transport of the control
distribution onto itself, the baseline a counterfactual with perturbation=control should reproduce.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phenoflow.data.errors import DataError, ShardError
from phenoflow.data.loader import ShardLoader
from phenoflow.data.vocab import LABEL_GROUPS
from phenoflow.flow.couplings import control_source

log = logging.getLogger("phenoflow.train")
STATE_VERSION = 1
MAX_REDRAWS = 100  # skip policy: redraws of one step whose draw hit unreadable controls


class ControlPool:
    """Index of the train split's control samples per condition group; draws and reads a control batch.

    groups: label groups that define "the same condition" (e.g. ("experiment", "cell_type")).
    """

    def __init__(self, data_dir: str | Path, groups: Sequence[str], split: str = "train",
                 bad_sample_policy: str = "error", checksums: str = "first_pass"):
        self.groups = tuple(groups)
        if not self.groups:
            raise DataError("flow.coupling=control: the modality names no control groups")
        # A reader over the split (no DataLoader, no order of its own): batches are read by global sample id.
        self.reader = ShardLoader(data_dir, split, 1, shuffle=False, drop_last=False, infinite=False,
                                  bad_sample_policy=bad_sample_policy, checksums=checksums)
        ds = self.ds = self.reader.dataset
        self.split, self.folder = split, Path(data_dir)
        missing = [g for g in self.groups if g not in ds.vocabs]
        if missing:
            raise DataError(f"{data_dir}: control group(s) {missing} are not label groups of the data "
                            f"(groups: {list(ds.vocabs)})")
        self.dims = tuple(len(ds.vocabs[g]) for g in self.groups)
        ctrl_ids, ctrl_codes, target_codes = self._scan()
        order = np.lexsort((ctrl_ids, ctrl_codes))
        self._all_ids, self._all_codes = ctrl_ids[order], ctrl_codes[order]
        self.num_controls = len(self._all_ids)
        lacking = np.setdiff1d(target_codes, self._all_codes)
        if len(lacking):
            names = "; ".join(self.describe(int(c)) for c in lacking[:10])
            more = f" (and {len(lacking) - 10} more)" if len(lacking) > 10 else ""
            have = len(np.unique(self._all_codes))
            raise DataError(f"flow.coupling=control: {len(lacking)} condition group(s) of split {split!r} in "
                            f"{data_dir} have samples but no control sample to start from: {names}{more} "
                            f"({have} group(s) have controls; groups are {list(self.groups)}). Add controls "
                            f"for them, leave those samples out, or train with flow.coupling=independent")
        self.excluded: set[int] = set()
        self._rebuild()

    # ---- the index ------------------------------------------------------------------------------------
    def _columns(self) -> list[int]:
        """Column of each control group in a label table's `lab` array (images: LABEL_GROUPS; expression:
        the groups after the perturbation)."""
        table_groups = list(self.ds.groups[1:]) if hasattr(self.ds, "groups") else list(LABEL_GROUPS)
        return [table_groups.index(g) for g in self.groups]

    def _scan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(control sample ids, their group codes, the distinct group codes of non-control samples)."""
        ds, cols = self.ds, self._columns()
        ids, codes, targets = [], [], []
        for s, rec in enumerate(ds.records):
            table = ds._index(s)[3]
            if table is not None:
                lab, ctrl, ok = table.lab[:, cols], np.asarray(table.ctrl, bool), np.asarray(table.ok, bool)
            else:  # images written before label tables: the json members, read once
                lab, ctrl, ok = self._scan_json(s, cols)
            code = np.ravel_multi_index(tuple(lab[ok].T), self.dims) if len(lab) else np.zeros(0, np.int64)
            g = np.flatnonzero(ok) + int(ds.starts[s])
            c = ctrl[ok]
            ids.append(g[c])
            codes.append(code[c])
            targets.append(np.unique(code[~c]))
        cat = (lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64))
        return cat(ids), cat(codes), np.unique(cat(targets))

    def _scan_json(self, s: int, cols: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ds, name = self.ds, self.ds.records[s]["name"]
        n = int(ds.counts[s])
        lab, ctrl, ok = np.zeros((n, len(cols)), np.int64), np.zeros(n, bool), np.ones(n, bool)
        log.warning("%s: shard %s has no label table: its samples are read once to find the controls "
                    "(`phenoflow data labels %s` writes the tables)", self.folder, name, self.folder)
        for j in range(n):
            try:
                labels, _, c = ds._labels(ds.read(int(ds.starts[s]) + j, s)[1], name)
            except ShardError:
                if ds.policy == "error":
                    raise
                ok[j] = False
                continue
            lab[j], ctrl[j] = np.asarray(labels)[cols], c
        return lab, ctrl, ok

    def _rebuild(self) -> None:
        keep = ~np.isin(self._all_ids, np.fromiter(self.excluded, np.int64, len(self.excluded)))
        self.ids, codes = self._all_ids[keep], self._all_codes[keep]
        self.codes, self.start, self.count = np.unique(codes, return_index=True, return_counts=True)

    def describe(self, code: int) -> str:
        """A group code as its label names, e.g. "experiment='exp_01', cell_type='HUVEC'"."""
        ids = np.unravel_index(code, self.dims)
        return ", ".join(f"{g}={self.ds.vocabs[g][int(i)]!r}" for g, i in zip(self.groups, ids))

    def group_codes(self, batch: dict[str, Any]) -> np.ndarray:
        """The group code of every sample of a loader batch."""
        lab = [np.asarray(torch.as_tensor(batch[g]).cpu().numpy(), np.int64) for g in self.groups]
        return np.ravel_multi_index(tuple(lab), self.dims)

    # ---- drawing ---------------------------------------------------------------------------------------
    def draw(self, codes: np.ndarray, gen: torch.Generator | None) -> np.ndarray:
        """One control sample id per group code, uniform within the group, from `gen` (one float64 per row)."""
        dev = gen.device if gen is not None else None
        u = torch.rand(len(codes), generator=gen, device=dev, dtype=torch.float64).cpu().numpy()
        pos = np.searchsorted(self.codes, codes)
        pos = np.minimum(pos, max(len(self.codes) - 1, 0))
        found = (len(self.codes) > 0) & (self.codes[pos] == codes) if len(codes) else np.zeros(0, bool)
        if not np.all(found):
            code = int(codes[np.flatnonzero(~found)[0]])
            why = " (its controls were all unreadable and skipped)" if self.excluded else ""
            raise DataError(f"flow.coupling=control: no control sample for {self.describe(code)}{why}")
        pick = np.minimum((u * self.count[pos]).astype(np.int64), self.count[pos] - 1)
        return self.ids[self.start[pos] + pick]

    def read(self, ids: np.ndarray) -> tuple[dict[str, Any], list[str]]:
        """The samples with these global ids as one loader batch (rows in the order of `ids`), and the messages
        of those skipped as unreadable (bad_sample_policy=skip)."""
        ds = self.ds
        ds._order, ds.batch_size = (-1, np.asarray(ids, np.int64)), len(ids)  # batch (-1, 0) = these ids
        out = ds.fetch((-1, 0), None)
        skipped = out.pop("_skipped", None) or []
        return ds.to_batch(out, None), skipped

    def sample(self, batch: dict[str, Any], gen: torch.Generator | None) -> dict[str, Any]:
        """A control batch for a data batch: row i is a control of row i's group (every field as the loader's)."""
        codes = self.group_codes(batch)
        for _ in range(MAX_REDRAWS):
            ids = self.draw(codes, gen)
            out, skipped = self.read(ids)
            if not skipped:
                return out
            bad = self._unread(ids, out["key"])
            for msg in skipped:
                log.warning("control pool: skipped an unreadable control sample (left out of its group for the "
                            "rest of the run): %s", msg)
            self.excluded.update(bad)
            self._rebuild()
        raise DataError(f"flow.coupling=control: {MAX_REDRAWS} draws in a row hit unreadable control samples "
                        f"({len(self.excluded)} left out so far)")

    def _unread(self, ids: np.ndarray, keys: list[str]) -> list[int]:
        have = set(keys)
        ds, bad = self.ds, []
        for g in ids.tolist():
            s = int(np.searchsorted(ds.starts, g, side="right") - 1)
            if ds._index(s)[1][g - int(ds.starts[s])] not in have:
                bad.append(int(g))
        return bad

    def source(self, cfg: Any, modality: Any, batch: dict[str, Any], gen: torch.Generator,
               device: torch.device) -> torch.Tensor:
        """x0 for a data batch: the modality's transform of a same-group control batch, plus control noise."""
        controls = self.sample(batch, gen)
        c, _ = modality.batch_to_flow(cfg, controls, gen, device)
        return control_source(c.float(), cfg.flow.control_noise, gen, getattr(cfg.flow, "control_noise_prob", 1.0))

    # ---- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "groups": list(self.groups), "split": self.split,
                "num_controls": int(self.num_controls), "excluded": sorted(self.excluded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, mine in (("groups", list(self.groups)), ("split", self.split), ("num_controls", self.num_controls)):
            if k in state and state[k] != mine:
                raise DataError(f"control pool state was saved with {k}={state[k]!r}, the data now gives "
                                f"{mine!r}: exact resume needs the same training data")
        self.excluded = {int(g) for g in state.get("excluded", [])}
        self._rebuild()

    def load_states(self, states: list[dict[str, Any]] | None, rank: int, world_size: int) -> None:
        """From a consolidated checkpoint's per-rank states: this rank's own at the same world size, else the
        union of every rank's unreadable controls (a resume at another world size draws differently anyway)."""
        if not states:
            return
        if len(states) == world_size:
            self.load_state_dict(states[rank])
            return
        union = sorted({int(g) for st in states for g in st.get("excluded", [])})
        self.load_state_dict({**states[0], "excluded": union})


def build_control_pool(cfg: Any, modality: Any, data_dir: str | Path, manifest: dict) -> ControlPool:
    """The pool of a training run (flow.coupling=control): the modality's control groups on the train split."""
    return ControlPool(data_dir, modality.control_groups(manifest), "train",
                       bad_sample_policy=cfg.data.bad_sample_policy, checksums=cfg.data.checksums)
