"""FSDP2 engine (torch.distributed.fsdp.fully_shard)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from phenoflow.train.engines.distributed import _DistributedMixin
from phenoflow.train.engines.single import (
    SingleEngine,
    apply_activation_checkpointing,
    compile_blocks,
)


class FSDP2Engine(_DistributedMixin, SingleEngine):
    """fully_shard per MiT block, then the root: parameters, gradients and Adam states sharded on dim 0
    (ZeRO-3-like); bf16 compute with fp32 sharded masters and fp32 gradient reduce-scatter."""

    name = "fsdp2"
    replicated = False

    def __init__(self, cfg):
        self.cfg = cfg
        self._init_dist(cfg)

    def setup(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._record_shapes(model)
        model = model.to(self.device)
        t = self.cfg.train
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if t.compile:
            compile_blocks(model)
        self._broadcast_module(model)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32) if self.amp_dtype else \
            MixedPrecisionPolicy()
        for blk in model.blocks:
            fully_shard(blk, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        self.model = model
        self.optimizer = self._adam(self.model.parameters())
        self.forward_model = self.model
        return self.model

    def _dim0_block(self, name: str) -> tuple[int, int]:
        d0 = self.shapes[name][0] if self.shapes[name] else 1
        chunk = -(-d0 // self.world_size)  # torch.chunk sizes
        return min(self.rank * chunk, d0), math.prod(self.shapes[name][1:])

    def local_pieces(self, kind: str = "param") -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self._param_list():
            t = p if kind == "param" else self.optimizer.state.get(p, {}).get(kind)
            if t is None:
                return {}
            out[n] = t.detach().to_local() if kind == "param" else t.to_local()
        return out

    def piece_offset(self, name, piece):
        row0, row = self._dim0_block(name)
        return row0 * row

    def _init_optimizer_state(self, step):
        for p in self.model.parameters():
            if not self.optimizer.state.get(p):
                self.optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}

    def save_native(self, ckpt_dir):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(Path(ckpt_dir) / "dcp"))

    def load_native(self, ckpt_dir):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        from phenoflow.errors import CheckpointError
        from phenoflow.train.safe_load import (
            dcp_safe_planner,
            dcp_safe_reader,
            load_dcp_metadata,
        )

        # DCP pickles .metadata by design and reads it (and the optimizer's non-tensor entries) with full
        # pickle: every rank first reads it with the restricted unpickler (a planted global is refused on every
        # rank before any collective), then DCP loads through a reader and planner that do the same.
        path = Path(ckpt_dir) / "dcp"
        load_dcp_metadata(path / ".metadata")
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optimizer": osd}
        try:
            dcp.load(state, checkpoint_id=str(path), storage_reader=dcp_safe_reader(path),
                     planner=dcp_safe_planner(path))
        except CheckpointException as e:  # DCP gathers every rank's failure: re-raise ours as it was
            for failure in e.failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, CheckpointError):
                    raise inner from e
            raise
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
