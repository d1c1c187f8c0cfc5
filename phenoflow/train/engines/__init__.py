"""Engines, one file each: single (one device), ddp, deepspeed (ZeRO 1/2/3), fsdp2. `build_engine(cfg)` picks
one from train.engine; the trainer talks to nothing else about distribution (see single.py for the interface)."""
from __future__ import annotations

from phenoflow.train.engines.ddp import DDPEngine
from phenoflow.train.engines.deepspeed import DeepSpeedEngine, deepspeed_config
from phenoflow.train.engines.distributed import init_distributed
from phenoflow.train.engines.fsdp2 import FSDP2Engine
from phenoflow.train.engines.single import (
    OPT_KEYS,
    PieceView,
    SingleEngine,
    micro_and_accum,
    persistent_buffers,
)

ENGINES = {"single": SingleEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine, "fsdp2": FSDP2Engine}


def build_engine(cfg):
    if cfg.train.engine not in ENGINES:
        raise ValueError(f"train.engine={cfg.train.engine!r} is not one of {list(ENGINES)}")
    return ENGINES[cfg.train.engine](cfg)


__all__ = ["ENGINES", "OPT_KEYS", "DDPEngine", "DeepSpeedEngine", "FSDP2Engine", "PieceView", "SingleEngine",
           "build_engine", "deepspeed_config", "init_distributed", "micro_and_accum", "persistent_buffers"]
