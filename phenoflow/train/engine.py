"""Engines: the one place that knows about distribution. The trainer calls only this interface.

    single     one device (CPU or one GPU)
    ddp        torch DistributedDataParallel, one process per GPU (torchrun / deepspeed launcher env vars)
    deepspeed  DeepSpeed ZeRO stage 1, 2 or 3 (bf16 with fp32 master weights, optional CPU offload)
    fsdp2      torch.distributed.fsdp.fully_shard per MiT block, then the root (ZeRO-3-like sharding)

Every engine exposes: `device`, `amp_dtype`, `rank`, `world_size`, `is_main`, `setup(model)` (returns the
unwrapped module and builds `optimizer` and `forward_model`), `autocast()`, `backward(loss)`,
`step(max_norm) -> (grad_norm, stepped)`, `all_reduce_mean`, `barrier`, native checkpoints
(`save_native(dir)` / `load_native(dir)`, all ranks) and the *piece* interface used for EMA, export and
world-size-portable checkpoints:

    local_pieces(kind)   {name: this rank's fp32 part of parameter `name`}  (kind "param", "exp_avg", ...)
    gather(pieces)       {name: full fp32 tensor} on rank 0, None elsewhere        (collective)
    scatter(full)        {name: this rank's part} from full tensors (every rank holds `full`)
    write_pieces(kind, local)   set this rank's parts (fp32 masters / optimizer moments)

A piece is the flat slice [offset, offset + numel) of the flattened full parameter. Single/ddp hold whole
parameters (offset 0, replicated); fsdp2 holds a dim-0 row block of each parameter; ZeRO-1/2 hold the slice
of each parameter that falls in this rank's fp32 partition of the flat buffer (possibly empty); ZeRO-3 holds
the rank's padded partition of each parameter. Pieces are fp32 master values, never the bf16 compute copy.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from phenoflow.train.checkpoint import load_checkpoint, save_checkpoint

OPT_KEYS = ("exp_avg", "exp_avg_sq")  # Adam moments; `step` is carried as one integer


def micro_and_accum(cfg, world: int) -> tuple[int, int]:
    """(micro batch per rank, gradient-accumulation steps) from train.batch_size / micro_batch_size."""
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size // world
    if micro <= 0 or t.batch_size % (micro * world):
        raise ValueError(f"train.batch_size={t.batch_size} is not a multiple of micro batch {micro} x world size {world}")
    return micro, t.batch_size // (micro * world)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each MiT block in the backward pass (non-reentrant; dropout RNG state is replayed)."""
    from torch.utils.checkpoint import checkpoint

    for blk in model.blocks:
        fwd = blk.forward

        def ckpt_forward(*args, _fwd=fwd, **kw):
            return checkpoint(_fwd, *args, use_reentrant=False, **kw)

        blk.forward = ckpt_forward


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block in place (parameter names unchanged; hooks of sharding engines stay outside)."""
    for blk in model.blocks:
        blk.compile()


class SingleEngine:
    name = "single"
    rank, world_size, local_rank = 0, 1, 0
    replicated = True  # every rank holds whole parameters and optimizer states

    def __init__(self, cfg):
        self.cfg = cfg
        want = cfg.train.device
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        self.device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
        prec = cfg.train.precision
        self.amp_dtype = torch.bfloat16 if prec == "bf16" or (prec == "auto" and self.device.type == "cuda") else None
        self.micro_batch, self.accum_steps = micro_and_accum(cfg, self.world_size)
        self._micro = 0  # micro-batches since the last step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- set-up ---------------------------------------------------------------------------------------
    def _record_shapes(self, model: nn.Module) -> None:
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def _adam(self, params) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.Adam(params, lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model (fp32 master weights) to the device and build the optimizer."""
        self._record_shapes(model)
        self.model = model.to(self.device)
        t = self.cfg.train
        if t.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.optimizer = self._adam(self.model.parameters())
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        return self.model

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---- one step -------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self._micro += 1
        loss.backward()

    def _clip(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor (fsdp2): the norm is already reduced over ranks
            norm = norm.full_tensor()
        return float(norm)

    def step(self, max_norm: float) -> tuple[float, bool]:
        """Clip, check finiteness, step. Returns (grad norm, stepped). A non-finite norm skips the step."""
        self._micro = 0
        norm = self._clip(max_norm)
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok

    # ---- collectives ----------------------------------------------------------------------------------
    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_reduce_max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        """rank 0's Python object on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """Every rank's Python object, in rank order (collective)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def native_signature(self) -> dict:
        """What a native checkpoint depends on: resuming natively needs the same engine layout."""
        return {"engine": self.name, "world_size": self.world_size}

    # ---- pieces: this rank's fp32 parts of each parameter (see module docstring) ----------------------
    def _param_list(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.model.named_parameters())

    def local_pieces(self, kind: str = "param") -> dict[str, torch.Tensor]:
        """{name: this rank's fp32 part}; kind "param" or an Adam key. Optimizer state may be absent (-> {})."""
        out = {}
        for n, p in self._param_list():
            if kind == "param":
                out[n] = p.detach()
            else:
                st = self.optimizer.state.get(p, {})
                if kind not in st:
                    return {}
                out[n] = st[kind]
        return out

    def piece_offset(self, name: str, piece: torch.Tensor) -> int:
        return 0

    def gather(self, pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Full fp32 CPU tensors on rank 0 (None elsewhere). Names not in the model (buffers) are taken as
        replicated. Each tensor is assembled in a zero buffer and summed over ranks (pieces are disjoint)."""
        out = {}
        for name, piece in pieces.items():
            if name not in self.shapes or self.replicated:
                out[name] = piece.detach().float().cpu().clone()
                continue
            shape = self.shapes[name]
            flat = torch.zeros(math.prod(shape), dtype=torch.float32, device=self.device)
            off = self.piece_offset(name, piece)
            flat[off:off + piece.numel()] = piece.detach().reshape(-1).float()
            dist.reduce(flat, dst=0, op=dist.ReduceOp.SUM)
            if self.is_main:
                out[name] = flat.view(shape).cpu()
        return out if self.is_main else None

    def scatter(self, full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's parts of full tensors, shaped like the current local pieces `like`."""
        out = {}
        for name, ref in like.items():
            if name not in full:
                raise KeyError(f"checkpoint has no tensor {name!r}")
            t = full[name]
            if name in self.shapes and tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, model has {self.shapes[name]}")
            if name not in self.shapes or self.replicated:
                out[name] = t.to(ref.device, ref.dtype).reshape(ref.shape).clone()
                continue
            off = self.piece_offset(name, ref)
            out[name] = t.reshape(-1)[off:off + ref.numel()].to(ref.device, ref.dtype).reshape(ref.shape).clone()
        return out

    def _init_optimizer_state(self, step: int) -> None:
        """Create zero Adam state (torch.optim.Adam creates it lazily on the first step)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not self.optimizer.state.get(p):
                    self.optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                                               "exp_avg_sq": torch.zeros_like(p)}

    def _set_optimizer_step(self, step: int) -> None:
        for st in self.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"].fill_(float(step))
            elif "step" in st:
                st["step"] = step

    def optimizer_step_count(self) -> int:
        for st in self.optimizer.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def write_pieces(self, kind: str, local: dict[str, torch.Tensor]) -> None:
        cur = self.local_pieces(kind)
        with torch.no_grad():
            for n, t in local.items():
                cur[n].copy_(t)

    # ---- portable (consolidated) state: full fp32 tensors, any engine / world size ----------------------
    def full_state(self) -> dict | None:
        """{"model": {name: fp32}, "optimizer": {"step": n, key: {name: fp32}}} on rank 0 (collective)."""
        model = self.gather(self.local_pieces("param"))
        opt: dict = {"step": self.optimizer_step_count()}
        for key in OPT_KEYS:
            pieces = self.local_pieces(key)
            if pieces:
                opt[key] = self.gather(pieces)
        return {"model": model, "optimizer": opt} if self.is_main else None

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 model state dict (parameters + persistent buffers) on rank 0 (collective)."""
        full = self.gather(self.local_pieces("param"))
        if full is None:
            return None
        for name, b in persistent_buffers(self.model).items():
            full[name] = b.detach().cpu().clone()
        return full

    def load_full_state(self, state: dict) -> None:
        """Load full fp32 weights (and Adam moments when present) into this rank's parts (every rank)."""
        self.write_pieces("param", self.scatter(state["model"], self.local_pieces("param")))
        self._sync_compute_weights(state["model"])
        opt = state.get("optimizer") or {}
        if all(k in opt for k in OPT_KEYS):
            self._init_optimizer_state(int(opt["step"]))
            self._set_optimizer_step(int(opt["step"]))
            for key in OPT_KEYS:
                self.write_pieces(key, self.scatter(opt[key], self.local_pieces(key)))

    def _sync_compute_weights(self, full: dict[str, torch.Tensor]) -> None:
        """Engines whose compute weights are a separate low-precision copy refresh it here."""

    def ema_view(self) -> PieceView:
        """What the EMA averages: this rank's fp32 master pieces (local shards under ZeRO-3 / FSDP2)."""
        return PieceView(self)

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    # ---- native checkpoints (all ranks call) ----------------------------------------------------------
    def save_native(self, ckpt_dir: Path) -> None:
        if self.is_main:
            save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                            Path(ckpt_dir) / "engine.pt")

    def load_native(self, ckpt_dir: Path) -> None:
        state = load_checkpoint(Path(ckpt_dir) / "engine.pt", map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # Kept for callers of the first trainer version.
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        pass


class PieceView:
    """Duck-types the two module methods PowerFunctionEMA reads, over an engine's local fp32 pieces."""

    def __init__(self, engine: SingleEngine):
        self.engine = engine

    def named_parameters(self):
        return iter(self.engine.local_pieces("param").items())

    def named_buffers(self):
        return self.engine.model.named_buffers()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter pieces + persistent buffers (the EMA reads the keys to leave non-persistent buffers out)."""
        return {**self.engine.local_pieces("param"), **persistent_buffers(self.engine.model)}


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a module's state_dict holds, without building the state dict (cheap under ZeRO-3)."""
    out = {}
    for mod_name, mod in model.named_modules():
        for b_name, b in mod.named_buffers(recurse=False):
            if b_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{b_name}" if mod_name else b_name] = b
    return out


# --------------------------------------------------------------------------------------------------------
# Process groups from the launcher's environment (torchrun and the deepspeed launcher both set these).


def init_distributed(cfg) -> tuple[int, int, int, torch.device]:
    """init_process_group from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT: nccl on GPU, gloo on CPU."""
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
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if use_cuda else None)
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
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


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
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, checkpoint_id=str(Path(ckpt_dir) / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


# --------------------------------------------------------------------------------------------------------
# DeepSpeed.


def deepspeed_config(cfg, world: int) -> dict:
    """The DeepSpeed config generated from ours; train.deepspeed_config (a JSON file) overrides keys
    (nested dicts merged key by key)."""
    t = cfg.train
    micro, accum = micro_and_accum(cfg, world)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available() and t.device != "cpu")
    zero: dict = {"stage": t.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if t.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                     "stage3_gather_16bit_weights_on_model_save": False})
    if t.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        # bf16 model weights for compute, fp32 master weights in the optimizer, fp32 gradient accumulation.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"train.deepspeed_config={t.deepspeed_config}: cannot read JSON: {e}") from e
        if not isinstance(user, dict):
            raise ValueError(f"train.deepspeed_config={t.deepspeed_config}: expected a JSON object")
        ds = _merge(ds, user)
    return ds


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine(_DistributedMixin, SingleEngine):
    """DeepSpeed ZeRO 1/2/3 with a client torch.optim.Adam; clipping, overflow skipping and gradient
    accumulation are DeepSpeed's. Gradient accumulation: DeepSpeed counts micro-steps in its step(), so
    backward() calls it after every micro-batch but the last and step() after the last."""

    name = "deepspeed"
    replicated = False

    def __init__(self, cfg):
        self.cfg = cfg
        self._init_dist(cfg)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.ds_config = deepspeed_config(cfg, self.world_size)
        self.amp_dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else None
        self.stage = int(self.ds_config["zero_optimization"]["stage"])

    def setup(self, model):
        import deepspeed

        self._record_shapes(model)
        t = self.cfg.train
        model = model.to(self.device)
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if t.compile:
            compile_blocks(model)
        self._broadcast_module(model)
        opt = self._adam(model.parameters())
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        self.model = self.ds.module
        if self.amp_dtype is not None:
            # DeepSpeed casts parameters, not buffers, and runs forward with autocast off: the fixed position
            # table must share the weights' dtype for the whole forward to run in bf16.
            for b in self.model.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(self.amp_dtype)
        self.forward_model = self._forward
        return self.model

    def _forward(self, x, t, labels):
        # bf16 mode: the module itself is bf16 (fp32 masters live in the optimizer) and DeepSpeed's forward
        # does not autocast, so floating image inputs are cast to the weights' dtype here.
        if self.amp_dtype is not None:
            x = x.to(self.amp_dtype)
        return self.ds(x, t, labels)

    def backward(self, loss):
        self._micro += 1
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer already divides by the accumulation steps
        if self._micro < self.accum_steps:
            self.ds.step()  # a non-boundary micro-step: DeepSpeed only advances its counters

    def step(self, max_norm):
        self._micro = 0
        self.ds.step()  # clips to gradient_clipping, skips on a non-finite norm
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        ok = bool(self.ds.was_step_applied()) and math.isfinite(norm)
        return norm, ok

    def native_signature(self):
        return {"engine": self.name, "world_size": self.world_size, "zero_stage": self.stage}

    def _base_opt(self):
        return self.optimizer.optimizer  # the client Adam over the flat fp32 partitions

    # pieces: ZeRO-1/2 hold fragments of the flat fp32 partition, ZeRO-3 a padded partition per parameter
    def local_pieces(self, kind="param"):
        key = None if kind == "param" else kind
        if key is not None and not self._base_opt().state:
            return {}
        out = {}
        for n, p in self._param_list():
            if self.stage == 3:
                loc = self.optimizer.get_local_fp32_param(p, key).reshape(-1)
                off = self.rank * loc.numel()
                out[n] = loc[:max(0, min(loc.numel(), p.ds_numel - off))]
            elif getattr(p, "_hp_mapping", None) is not None:
                out[n] = p._hp_mapping.get_hp_fragment(key).reshape(-1)
            else:
                out[n] = torch.zeros(0, device=self.device)
        return out

    def piece_offset(self, name, piece):
        p = dict(self._param_list())[name]
        if self.stage == 3:
            return self.rank * p.partition_numel()
        m = getattr(p, "_hp_mapping", None)
        return m.lp_fragment_address.start if m is not None else 0

    def write_pieces(self, kind, local):
        key = None if kind == "param" else kind
        params = dict(self._param_list())
        with torch.no_grad():
            for n, t in local.items():
                p = params[n]
                if self.stage == 3:
                    full = torch.zeros(p.partition_numel(), dtype=torch.float32, device=self.device)
                    full[:t.numel()] = t.reshape(-1)
                    self.optimizer.set_local_hp_param(full, p, key)
                elif getattr(p, "_hp_mapping", None) is not None:
                    p._hp_mapping.get_hp_fragment(key).copy_(t.reshape(-1))

    def optimizer_step_count(self):
        for st in self._base_opt().state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def _init_optimizer_state(self, step):
        base = self._base_opt()
        for group in base.param_groups:
            for p in group["params"]:
                if not base.state.get(p):
                    base.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.optimizer._lazy_init_hp_params_optimizer_state()  # ZeRO-1/2: link per-parameter views

    def _set_optimizer_step(self, step):
        for st in self._base_opt().state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"].fill_(float(step))

    def _sync_compute_weights(self, full):
        """Copy the full weights into the compute parameters (bf16 or fp32 copy of the masters)."""
        import deepspeed

        params = self._param_list()
        with torch.no_grad():
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                    for n, p in params:
                        p.data.copy_(full[n].to(p.device, p.dtype))
            else:
                for n, p in params:
                    p.data.copy_(full[n].to(p.device, p.dtype))

    def save_native(self, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        self.ds.save_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, save_latest=False)

    def load_native(self, ckpt_dir):
        ckpt_dir = Path(ckpt_dir)
        path, _ = self.ds.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")

    def state_dict(self):
        raise NotImplementedError("deepspeed: use save_native / full_state")


ENGINES = {"single": SingleEngine, "ddp": DDPEngine, "deepspeed": DeepSpeedEngine, "fsdp2": FSDP2Engine}


def build_engine(cfg):
    if cfg.train.engine not in ENGINES:
        raise ValueError(f"train.engine={cfg.train.engine!r} is not one of {list(ENGINES)}")
    return ENGINES[cfg.train.engine](cfg)
