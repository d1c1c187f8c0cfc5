"""Engine switches in one process: activation checkpointing changes no number, the generated DeepSpeed
config follows our config and a user JSON overrides it key by key, bad settings fail naming the field."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W

from phenoflow.config import ConfigError, resolve
from phenoflow.train.engines import SingleEngine, build_engine, deepspeed_config


def one_step(ckpt: bool) -> tuple[dict, dict]:
    cfg = W.tiny_cfg("single")
    cfg.train.activation_checkpointing = ckpt
    cfg.model.proj_dropout = 0.2  # the recomputed forward must replay the same dropout mask
    eng = SingleEngine(cfg)
    model = eng.setup(W.make_model(cfg))
    torch.manual_seed(5)
    rec = W.train_step(eng, 0)
    return rec, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_is_exact():
    a, wa = one_step(False)
    b, wb = one_step(True)
    assert a["loss"] == b["loss"] and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"]
    assert all(torch.allclose(wa[n], wb[n], rtol=0, atol=1e-7) for n in wa)


def test_deepspeed_config_from_ours_and_user_override(tmp_path):
    cfg = resolve("mit-xl2-pretrain", ["train.grad_clip=0.25", "train.precision=bf16", "train.zero_stage=3",
                                       "train.cpu_offload=true"])
    ds = deepspeed_config(cfg, 32)
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.25
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert deepspeed_config(cfg, 16)["gradient_accumulation_steps"] == 2
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1e8}, "steps_per_print": 5}))
    cfg.train.deepspeed_config = str(user)
    ds = deepspeed_config(cfg, 32)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1e8 and ds["zero_optimization"]["stage"] == 3
    assert ds["steps_per_print"] == 5
    user.write_text("{not json")
    with pytest.raises(ValueError, match="train.deepspeed_config"):
        deepspeed_config(cfg, 32)


def test_bad_settings_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match="train.deepspeed_config"):
        resolve("demo", ["train.deepspeed_config=/nonexistent.json"])
    with pytest.raises(ConfigError, match="train.cpu_offload"):
        resolve("demo", ["train.cpu_offload=true"])
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="needs a launcher"):
        build_engine(resolve("demo", ["train.engine=ddp"]))
