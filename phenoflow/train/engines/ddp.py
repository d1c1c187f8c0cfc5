"""DistributedDataParallel engine."""
from __future__ import annotations

import contextlib

from phenoflow.train.engines.distributed import _DistributedMixin
from phenoflow.train.engines.single import (
    SingleEngine,
    apply_activation_checkpointing,
    compile_blocks,
)


class DDPEngine(_DistributedMixin, SingleEngine):
    """DistributedDataParallel: gradients all-reduced (bucketed, overlapped with backward) on the last
    micro-batch; earlier micro-batches accumulate locally under no_sync()."""

    name = "ddp"
    replicated = True

    def __init__(self, cfg):
        self.cfg = cfg
        self._init_dist(cfg)

    def setup(self, model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self._record_shapes(model)
        self.model = model.to(self.device)
        t = self.cfg.train
        if t.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if t.compile:
            compile_blocks(self.model)
        self.ddp = DDP(self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                       gradient_as_bucket_view=True)
        self.optimizer = self._adam(self.model.parameters())
        self.forward_model = self._forward
        return self.model

    def _forward(self, *args, **kw):
        # Skip the all-reduce on all but the last micro-batch of a step.
        last = self._micro + 1 >= self.accum_steps
        ctx = contextlib.nullcontext() if last else self.ddp.no_sync()
        with ctx:
            return self.ddp(*args, **kw)

    def backward(self, loss):
        last = self._micro + 1 >= self.accum_steps
        self._micro += 1
        ctx = contextlib.nullcontext() if last else self.ddp.no_sync()
        with ctx:
            loss.backward()
