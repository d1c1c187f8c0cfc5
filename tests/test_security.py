"""No code runs from a checkpoint or weights file (issue 10, item 1; the trust boundary in docs/distributed.md).

Each entry point that reads a file gets a `__reduce__` payload (tests/engine_worker.py Planted: unpickled
with full pickle it runs exec, which creates a marker file) and must refuse it with an error naming the file,
the marker never appearing:

1. the consolidated checkpoint (checkpoints/latest.pt) on resume, and the per-rank trainer-rankNNNNN.pt;
2. the single engine's native engine.pt;
3. DeepSpeed native resume (mp_rank_00_model_states.pt / ZeRO-3 model states, rank 1's optimizer states,
   and DeepSpeed's own load_checkpoint under the scoped guard without the screening): real 2-process CPU
   gloo runs under torchrun, ZeRO-2 and ZeRO-3;
4. FSDP2 native resume: the DCP .metadata pickle and a non-tensor DCP entry in a .distcp file (same launch);
5. feature-network weights (Inception-v3 / DINOv2, .pth / .pt / a pickle named .safetensors);
6. evaluation of an export (a pickle named model.safetensors), the real-feature cache, samples .npz;
7. every other deserialisation in the code base (a static scan: torch.load with weights_only=True, no
   pickle outside the restricted unpickler, np.load without allow_pickle, DeepSpeed and DCP loads through
   the guards).
After the refusals the clean native checkpoints still load and repeat the next step exactly.
"""
from __future__ import annotations

import ast
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W
import trainer_worker as TW
from engine_worker import Planted
from test_engine_equivalence import REPO, torchrun

from phenoflow.config import to_dict
from phenoflow.errors import CheckpointError
from phenoflow.train.checkpoint import load_checkpoint, save_checkpoint

# ---- 1, 2: phenoflow's own checkpoints ---------------------------------------------------------------------


def test_consolidated_resume_refuses_planted_code(tmp_path):
    from phenoflow.train.trainer import Trainer

    cfg = TW.config(tmp_path, "planted", "single", 0, TW.TOTAL)
    trainer = Trainer(cfg)
    marker = tmp_path / "ran"
    latest = cfg.run_dir / "checkpoints" / "latest.pt"
    save_checkpoint({"format": Trainer.CONSOLIDATED_FORMAT, "samples_seen": 64, "planted": Planted(marker)}, latest)
    with pytest.raises(RuntimeError, match=r"latest\.pt") as err:  # CheckpointError is a RuntimeError
        trainer.try_resume()
    assert "exec" in str(err.value), err.value
    assert not marker.exists(), "code planted in latest.pt ran on resume"


def test_trainer_rank_state_refuses_planted_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trainer-rank00000.pt"
    save_checkpoint({"samples_seen": 64, "loader": {"planted": Planted(marker)}}, path)
    with pytest.raises(RuntimeError, match=r"trainer-rank00000\.pt"):  # CheckpointError is a RuntimeError
        load_checkpoint(path)
    assert not marker.exists()


def test_single_engine_native_refuses_planted_code(tmp_path):
    from phenoflow.train.engines import SingleEngine

    eng = SingleEngine(W.tiny_cfg("single", run_dir=str(tmp_path / "run")))
    eng.setup(W.make_model(eng.cfg))
    W.train_step(eng, 0)
    native = tmp_path / "native"
    native.mkdir()
    eng.save_native(native)
    state = torch.load(native / "engine.pt", weights_only=True)
    marker = tmp_path / "ran"
    state["planted"] = Planted(marker)
    torch.save(state, native / "engine.pt")
    with pytest.raises(RuntimeError, match=r"engine\.pt"):
        eng.load_native(native)
    assert not marker.exists()


# ---- 3, 4: DeepSpeed and FSDP2 native resume (2 processes, gloo) -------------------------------------------
PLANT = "deepspeed:2:model+optim1+direct,deepspeed:3:model+optim1,fsdp2:0:metadata+bytes"
EXPECT = {  # target -> (file named in the error, what the error says was refused)
    "deepspeed:2:model": ("mp_rank_00_model_states.pt", "exec"),
    "deepspeed:2:optim1": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "exec"),
    "deepspeed:2:direct": ("mp_rank_00_model_states.pt", "GLOBAL exec"),
    "deepspeed:3:model": ("zero_pp_rank_0_mp_rank_00_model_states.pt", "exec"),
    "deepspeed:3:optim1": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "exec"),
    "fsdp2:0:metadata": ("dcp/.metadata", "builtins.exec"),
    "fsdp2:0:bytes": (".distcp", "optimizer.param_groups.0.lr"),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("planted")
    torchrun("engine_worker.py", str(out), f"plant={PLANT}")
    return [json.loads((out / f"plant-rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("target", list(EXPECT))
def test_native_resume_refuses_planted_code(planted, target):
    fname, refused = EXPECT[target]
    for rank, res in enumerate(planted):
        rec = res[target]
        assert not rec["ran"], f"{target}: the planted payload ran on resume (rank {rank})"
        assert rec["error"] is not None, f"{target}: rank {rank} loaded the planted checkpoint without error"
        assert rec["error"].startswith("UnsafeCheckpointError"), rec["error"]
        assert fname in rec["error"] and refused in rec["error"], rec["error"]
        if "after" in rec:  # DeepSpeed: the scoped guard left nothing behind
            assert rec["after"] == ["TorchCheckpointEngine", None], rec["after"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["deepspeed:2", "deepspeed:3", "fsdp2:0"])
def test_clean_native_checkpoint_still_resumes(planted, engine):
    for res in planted:
        rec = res[f"{engine}:clean"]
        assert rec["again"] == pytest.approx(rec["expect"], rel=1e-6, abs=0), rec


# ---- 5: feature-network weights ---------------------------------------------------------------------------
def _inception(path):
    from phenoflow.eval.inception import load_inception

    return load_inception(path)


def _dinov2(path):
    from phenoflow.eval.dinov2 import ViTShape, load_dinov2

    return load_dinov2(path, ViTShape(patch_size=14, embed_dim=32, depth=1, num_heads=4, pos_grid=4, input_size=56))


@pytest.mark.parametrize("net", ["inception", "dinov2"])
@pytest.mark.parametrize("kind", [".pth", ".pt", "pickle-as.safetensors"])
def test_feature_weights_refuse_planted_code(tmp_path, net, kind):
    from phenoflow.eval.weights import WeightsError

    marker = tmp_path / "ran"
    path = tmp_path / ("weights" + kind.split("-as")[-1])
    payload = {"state_dict": {"w": torch.zeros(2), "planted": Planted(marker)}}
    if kind.startswith("pickle"):
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(WeightsError, match=re.escape(str(path))) as err:
        (_inception if net == "inception" else _dinov2)(path)
    if not kind.startswith("pickle"):
        assert "exec" in str(err.value), err.value  # the refused global is named
    assert not marker.exists()


# ---- 6: evaluation of an export and the evaluation caches ---------------------------------------------------
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_export_evaluation_refuses_a_pickle_named_safetensors(tmp_path, writer):
    from phenoflow.eval.evaluate import load_export
    from phenoflow.train.checkpoint import write_json

    run = tmp_path / "run"
    cfg = W.tiny_cfg("single", run_dir=str(run))
    write_json({"config": to_dict(cfg), "vocab_sizes": W.VOCAB, "samples_seen": 8}, run / "export" / "model.json")
    marker = tmp_path / "ran"
    wfile = run / "export" / "model.safetensors"
    payload = {"x_embedder.weight": Planted(marker)}
    if writer == "pickle":
        wfile.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, wfile)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_export(run, ema_std=0)
    assert not marker.exists()


def test_eval_caches_and_samples_refuse_pickles(tmp_path):
    from phenoflow.eval.generate import load_samples
    from phenoflow.eval.metrics import FeatureStats

    marker = tmp_path / "ran"
    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(pickle.dumps({"count": Planted(marker)}))
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error: the point is that nothing runs
        FeatureStats.load(stats)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((1, 3, 4, 4), np.uint8), key=np.array([Planted(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_samples(samples)
    assert not marker.exists()


# ---- 7: every other deserialisation in the code base -------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_static_scan_every_deserialisation_is_safe():
    """torch.load only with weights_only=True; pickle only in the restricted unpickler; np.load never with
    allow_pickle=True; YAML only through safe loaders; DeepSpeed's load_checkpoint only inside
    deepspeed_safe_load; dcp.load only with the safe reader and planner."""
    bad, seen = [], {"torch.load": 0, "ds.load_checkpoint": 0, "dcp.load": 0}
    files = [p for d in ("phenoflow", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py")]
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        guarded = set()
        for node in ast.walk(tree):  # calls inside `with deepspeed_safe_load(...)`
            if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call) and
                                                  _dotted(i.context_expr.func).endswith("deepspeed_safe_load")
                                                  for i in node.items):
                guarded |= {id(c) for c in _calls(node)}
        for call in _calls(tree):
            name, where = _dotted(call.func), f"{rel}:{call.lineno}"
            if name in ("torch.load", "torch.serialization.load"):
                seen["torch.load"] += 1
                if not _const(_kw(call, "weights_only"), True):
                    bad.append(f"{where}: {name} without weights_only=True")
            elif name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") and \
                    name.split(".")[-1] in ("load", "loads", "Unpickler", "open"):
                if rel != "phenoflow/train/safe_load.py":
                    bad.append(f"{where}: {name} (unpickling outside phenoflow/train/safe_load.py)")
            elif name in ("np.load", "numpy.load"):
                if _const(_kw(call, "allow_pickle"), True):
                    bad.append(f"{where}: np.load with allow_pickle=True")
            elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                bad.append(f"{where}: {name}")
            elif name == "yaml.load":
                loader = _kw(call, "Loader")
                if loader is None or _dotted(loader).split(".")[-1] in ("Loader", "UnsafeLoader", "FullLoader"):
                    bad.append(f"{where}: yaml.load without a safe Loader")
            elif name.endswith("ds.load_checkpoint"):
                seen["ds.load_checkpoint"] += 1
                if id(call) not in guarded:
                    bad.append(f"{where}: DeepSpeed load_checkpoint outside deepspeed_safe_load")
            elif name == "dcp.load":
                seen["dcp.load"] += 1
                if _kw(call, "storage_reader") is None or _kw(call, "planner") is None:
                    bad.append(f"{where}: dcp.load without the safe storage_reader and planner")
    assert not bad, "unsafe deserialisation:\n" + "\n".join(bad)
    assert all(seen.values()), f"the scan found no call of some kind (renamed?): {seen}"


def test_restricted_unpickler_refuses_every_other_global(tmp_path):
    """The DCP metadata unpickler resolves nothing outside its allow-list, whatever the payload's module."""
    import os
    import subprocess

    from phenoflow.train.safe_load import UnsafeCheckpointError, load_dcp_metadata

    marker = tmp_path / "ran"
    for fn in (exec, eval, os.system, getattr, subprocess.call, torch.load, torch.save):
        f = tmp_path / ".metadata"
        f.write_bytes(pickle.dumps(_Call(fn, marker)))
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to unpickle the global"):
            load_dcp_metadata(f)
    assert not marker.exists()


class _Call:
    def __init__(self, fn, marker):
        self.fn, self.marker = fn, marker

    def __reduce__(self):
        return (self.fn, (f"open({str(self.marker)!r}, 'w').close()",))
