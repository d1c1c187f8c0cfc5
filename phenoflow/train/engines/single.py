"""Engines: the one place that knows about distribution (one file per engine; this one holds the shared
interface and the single-device engine). The trainer calls only this interface.

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

import math
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
    # After each optimizer step, check that the weights are finite; a step that made them non-finite (a finite
    # gradient times an absurd learning rate) is undone from a copy of the weights taken before it, and
    # `rolled_back` says so. Cost: one copy and one fused norm of this rank's fp32 masters per step.
    guard_weights = True
    rolled_back = False

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
        """Clip, check finiteness, step. Returns (grad norm, stepped). A non-finite norm skips the step; a step
        that leaves non-finite weights is undone (see guard_weights) and counts as not stepped."""
        self._micro = 0
        self.rolled_back = False
        norm = self._clip(max_norm)
        ok = math.isfinite(norm)
        if ok:
            guard = self.guard_weights and self._guard_before()
            self.optimizer.step()
            if guard and not self._guard_after():
                self.rolled_back, ok = True, False
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok

    # ---- the weight guard: snapshot before a step, check after, restore if non-finite ------------------
    def _master_tensors(self) -> list[torch.Tensor]:
        """This rank's fp32 master tensors, in place (local shards of DTensors under fsdp2)."""
        out = []
        for _, p in self._param_list():
            t = p.detach()
            out.append(t.to_local() if hasattr(t, "to_local") else t)
        return out

    def _guard_before(self) -> bool:
        """Copy the masters into a buffer kept across steps (allocated once); the optimizer's step count too."""
        masters = self._master_tensors()
        if getattr(self, "_guard_copy", None) is None or len(self._guard_copy) != len(masters):
            self._guard_copy = [torch.empty_like(t) for t in masters]
        with torch.no_grad():
            torch._foreach_copy_(self._guard_copy, masters)
        self._guard_step = self.optimizer_step_count()
        return True

    def _all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every element is finite, on every rank: one fused L2 norm per tensor (NaN and inf propagate),
        one host sync, for sharded engines one all-reduce of a flag. A norm can also overflow for finite
        elements of 1e19 and more, so a non-finite norm is confirmed element-wise (only then)."""
        tensors = [t for t in tensors if t.numel()]
        bad = False
        if tensors:
            norms = torch._foreach_norm(tensors, 2.0)
            if not bool(torch.isfinite(torch.stack(norms).sum())):
                bad = any(not bool(torch.isfinite(t).all()) for t in tensors)
        if not self.replicated and self.world_size > 1:
            flag = torch.tensor(float(bad), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        return not bad

    def _guard_after(self) -> bool:
        """True if the weights are finite; otherwise restore the copy and the step count and return False."""
        masters = self._master_tensors()
        if self._all_finite(masters):
            return True
        with torch.no_grad():
            torch._foreach_copy_(masters, self._guard_copy)
        self._set_optimizer_step(self._guard_step)
        self._restore_compute_weights()
        return False

    def _restore_compute_weights(self) -> None:
        """Engines whose compute weights are a copy of the masters refresh it after a rollback."""

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
