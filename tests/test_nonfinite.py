"""The non-finite guard: a non-finite loss or gradient skips the step (weights and EMA untouched), counts it
and logs it; after train.max_nonfinite_steps in a row the run stops with a clear message and a diagnostic
checkpoint. (Every distributed engine's skip is checked in tests/test_engine_equivalence.py.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import trainer_worker as TW

from phenoflow.config import resolve
from phenoflow.train.trainer import NonFiniteError, Trainer


class InfGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (0 * inf): a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Faulty(Trainer):
    """Injects a NaN loss at `nan_at` sample counts and a NaN gradient (finite loss) at `inf_grad_at`."""

    nan_at: frozenset[int] = frozenset()
    inf_grad_at: frozenset[int] = frozenset()
    from_step: int = 10**9

    def compute_loss(self, batch, gen):
        loss = super().compute_loss(batch, gen)
        s = self.samples_seen
        if s in self.nan_at or s >= self.from_step:
            return loss * float("nan")
        if s in self.inf_grad_at:
            w = next(self.model.parameters())
            return loss + 0 * InfGrad.apply(w.sum())
        return loss


def cfg(tmp_path, name, total, k):
    return resolve("demo", TW.TINY + [f"train.total_samples={total}", f"train.max_nonfinite_steps={k}",
                                      f"run.out_dir={tmp_path}", f"run.name={name}"])


def test_skips_are_counted_and_leave_weights_alone(tmp_path):
    torch.manual_seed(0)
    tr = Faulty(cfg(tmp_path, "skip", 16 * 6, 2))
    tr.nan_at, tr.inf_grad_at = frozenset({32}), frozenset({64})
    checks = []
    step = tr.train_step

    def watched(it):
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        ema = tr.ema.state_dict()
        out = step(it)
        if not out["stepped"]:
            same = all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())
            same_ema = all(torch.equal(ema[k][n], t) for k, a in tr.ema.state_dict().items() for n, t in a.items())
            checks.append((tr.samples_seen, same, same_ema))
        return out

    tr.train_step = watched
    tr.fit()
    assert checks == [(48, True, True), (80, True, True)]  # the steps that started at 32 and 64 samples
    ev = [json.loads(line) for line in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    skipped = [e for e in ev if e["event"] == "nonfinite"]
    assert [e["samples"] for e in skipped] == [48, 80] and all(e["in_row"] == 1 for e in skipped)
    assert ev[-1]["event"] == "end" and ev[-1]["nonfinite_total"] == 2
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_stops_after_k_in_a_row_with_a_diagnostic_checkpoint(tmp_path):
    torch.manual_seed(0)
    tr = Faulty(cfg(tmp_path, "stop", 16 * 8, 3))
    tr.from_step = 32
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row at 80 samples"):
        tr.fit()
    diag = tmp_path / "stop" / "checkpoints" / "nonfinite-diagnostic.pt"
    state = torch.load(diag, weights_only=True)
    assert state["samples_seen"] == 80 and state["nonfinite_total"] == 3
    # The diagnostic holds the last good weights (finite) in the consolidated format any engine can load.
    assert state["format"] == Trainer.CONSOLIDATED_FORMAT
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    ev = [json.loads(line) for line in (tmp_path / "stop" / "log.jsonl").read_text().splitlines()]
    assert [e["in_row"] for e in ev if e["event"] == "nonfinite"] == [1, 2, 3]


@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
def test_a_step_that_makes_weights_nonfinite_is_undone_and_stops_the_run(tmp_path, lr):
    torch.manual_seed(0)
    tr = TW.AbsurdLR(cfg(tmp_path, "lr", 16 * 8, 3))
    tr.bad_at, tr.lr = 48, lr
    with pytest.raises(NonFiniteError, match=r"step from 48 to 64 samples \(step 4\) made the weights non-finite"):
        tr.fit()
    # Stopped at once (not after max_nonfinite_steps), with the weights from before the bad step everywhere:
    # in the model, and in the diagnostic checkpoint.
    assert tr.samples_seen == 64
    assert all(torch.equal(p.detach(), tr.before_bad[n]) for n, p in tr.model.named_parameters())
    state = torch.load(tmp_path / "lr" / "checkpoints" / "nonfinite-diagnostic.pt", weights_only=True)
    assert state["samples_seen"] == 64
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["model"].keys() == tr.before_bad.keys()
    assert all(torch.equal(state["model"][n], tr.before_bad[n]) for n in state["model"])
    assert state["optimizer"]["step"] == 3  # the undone step is not counted
    ev = [json.loads(line) for line in (tmp_path / "lr" / "log.jsonl").read_text().splitlines()]
    bad = [e for e in ev if e["event"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["weights"] and bad[0]["samples"] == 64


@pytest.mark.slow
@pytest.mark.parametrize("tag", TW.NONFINITE_ENGINES)
def test_sharded_engines_undo_a_step_that_makes_weights_nonfinite(tmp_path_factory, tag):
    """The same under torchrun (2 CPU processes; tests/trainer_worker.py --nonfinite): fsdp2, ZeRO-2 and ZeRO-3."""
    out = sharded_nonfinite_runs(tmp_path_factory)
    res = json.loads((out / f"{tag}-lr.json").read_text())
    assert res["raised"] == [True, True], "every rank stops with NonFiniteError"
    assert "step from 48 to 64 samples (step 4) made the weights non-finite" in res["message"]
    before = torch.load(out / f"{tag}-lr-before.pt", weights_only=True)
    state = torch.load(out / f"{tag}-lr" / "checkpoints" / "nonfinite-diagnostic.pt", weights_only=True)
    assert state["samples_seen"] == 64 and state["model"].keys() == before.keys()
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.equal(state["model"][n], before[n]) for n in before)
    assert res["rank_weights_equal"] == [True, True]  # the compute weights on each rank are restored too


_SHARDED: dict = {}


def sharded_nonfinite_runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    if "out" not in _SHARDED:
        from test_engine_equivalence import torchrun

        out = tmp_path_factory.mktemp("nonfinite")
        torchrun("trainer_worker.py", str(out), "--nonfinite")
        _SHARDED["out"] = out
    return _SHARDED["out"]
