"""Process groups from the launcher's environment (torchrun and the deepspeed launcher both set these) and
the parts every multi-process engine shares."""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from phenoflow.train.engines.single import micro_and_accum
from phenoflow.train.watchdog import start_watchdog, stop_watchdog


def init_distributed(cfg) -> tuple[int, int, int, torch.device]:
    """init_process_group from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT: nccl on GPU, gloo on CPU.

    Failure detection (docs/distributed.md): collectives time out after train.collective_timeout_s (a rank that
    is alive but never joins), and the peer watchdog (phenoflow/train/watchdog.py) ends every rank within
    train.peer_timeout_s of another rank's death."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"train.engine={cfg.train.engine} needs a launcher (torchrun or deepspeed); "
                           f"environment variables {missing} are not set")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if use_cuda:  # an NCCL error or timeout ends the process instead of leaving it blocked
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if use_cuda else None,
                                timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        start_watchdog(rank, world, cfg.train.peer_timeout_s)
    return rank, world, local, device


class _DistributedMixin:
    def _init_dist(self, cfg) -> None:
        self.rank, self.world_size, self.local_rank, self.device = init_distributed(cfg)
        prec = cfg.train.precision
        self.amp_dtype = torch.bfloat16 if prec == "bf16" or (prec == "auto" and self.device.type == "cuda") else None
        self.micro_batch, self.accum_steps = micro_and_accum(cfg, self.world_size)
        self._micro = 0

    def barrier(self) -> None:
        dist.barrier()

    def _broadcast_module(self, model: nn.Module) -> None:
        """Rank 0's initial weights everywhere before sharding (each rank shards its own copy)."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

    def close(self) -> None:
        """End of the run. While an exception propagates (close() runs in a `finally`) there is no barrier:
        a peer may be dead, and waiting for it is what the watchdog exists to avoid."""
        exc = sys.exc_info()[1]
        if dist.is_initialized():
            if exc is None:
                dist.barrier()
            stop_watchdog(exc)  # after a failed collective: names the dead rank(s) and their node
            dist.destroy_process_group()
