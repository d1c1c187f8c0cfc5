"""Engines: the one place that knows about distribution. The trainer calls only this interface.

`SingleEngine` runs on one device (CPU or one GPU). Distributed engines (ddp, deepspeed, fsdp2) implement
the same methods; `build_engine(cfg)` picks one from `train.engine`.
"""
from __future__ import annotations

import math

import torch


class SingleEngine:
    name = "single"
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, cfg):
        self.cfg = cfg
        want = cfg.train.device
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        self.device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
        prec = cfg.train.precision
        self.amp_dtype = torch.bfloat16 if prec == "bf16" or (prec == "auto" and self.device.type == "cuda") else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model (fp32 master weights) to the device and build the optimizer."""
        self.model = model.to(self.device)
        t = self.cfg.train
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                          weight_decay=t.weight_decay)
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        return self.model

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float) -> tuple[float, bool]:
        """Clip, check finiteness, step. Returns (grad norm, stepped). A non-finite norm skips the step."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        pass


def build_engine(cfg):
    if cfg.train.engine == "single":
        return SingleEngine(cfg)
    raise NotImplementedError(f"train.engine={cfg.train.engine!r} is not available in this build")
