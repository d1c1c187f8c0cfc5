"""DeepSpeed ZeRO 1/2/3 engine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from phenoflow.train.engines.distributed import _DistributedMixin
from phenoflow.train.engines.single import (
    SingleEngine,
    apply_activation_checkpointing,
    compile_blocks,
    micro_and_accum,
)


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
        self.rolled_back = False
        guard = self.guard_weights and self._guard_before()
        self.ds.step()  # clips to gradient_clipping, skips on a non-finite norm
        norm = self.ds.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        ok = bool(self.ds.was_step_applied()) and math.isfinite(norm)  # the same on every rank
        if guard and ok and not self._guard_after():
            self.rolled_back, ok = True, False
        return norm, ok

    def _master_tensors(self):
        """This rank's fp32 master pieces (views into DeepSpeed's flat fp32 partitions)."""
        return list(self.local_pieces("param").values())

    def _restore_compute_weights(self):
        """After a rollback of the fp32 masters: the module's compute weights (bf16, or DeepSpeed's own fp32
        copy) from the full restored weights. Only on that failure path: a gather and a broadcast."""
        names = [n for n, _ in self._param_list()]
        self.write_pieces("param", dict(zip(names, self._guard_copy)))  # ZeRO-3: through set_local_hp_param
        self._sync_compute_weights(self.broadcast_object(self.gather(dict(zip(names, self._guard_copy)))))

    def native_signature(self):
        return {"engine": self.name, "world_size": self.world_size, "zero_stage": self.stage}

    def _base_opt(self):
        return self.optimizer.optimizer  # the client Adam over the flat fp32 partitions

    def _link_optimizer_fragments(self):
        """ZeRO-1/2: each parameter's `_hp_mapping` finds its optimizer-state fragments only once DeepSpeed has
        linked them, which it does lazily at the end of its first optimizer step. load_checkpoint rebuilds the
        mappings without those links (and leaves the "linked" flag as it was), so between a native resume and
        the next step `get_hp_fragment("exp_avg")` fails (`'NoneType' is not iterable`: a finished run rerun
        saved before any step). Link them now when the optimizer state exists and a mapping lacks them."""
        if self.stage == 3 or not self._base_opt().state:
            return
        maps = [getattr(p, "_hp_mapping", None) for _, p in self._param_list()]
        if any(m is not None and m.optim_fragment is None for m in maps):
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    # pieces: ZeRO-1/2 hold fragments of the flat fp32 partition, ZeRO-3 a padded partition per parameter
    def local_pieces(self, kind="param"):
        key = None if kind == "param" else kind
        if key is not None and not self._base_opt().state:
            return {}
        if key is not None:
            self._link_optimizer_fragments()
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
        if key is not None:
            self._link_optimizer_fragments()
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
        """DeepSpeed's own files, read without running pickled code (phenoflow/train/safe_load.py): every .pt
        file of the tag folder is screened first (pickle opcodes only; all ranks refuse together, so none
        is left waiting in a collective of the load), then DeepSpeed loads with a checkpoint engine whose
        reads are torch.load(weights_only=True) with its few data classes allowed."""
        from phenoflow.train.safe_load import (
            UnsafeCheckpointError,
            deepspeed_safe_globals,
            deepspeed_safe_load,
            screen_torch_files,
        )

        ckpt_dir = Path(ckpt_dir)
        allowed = deepspeed_safe_globals()
        refusal = None
        try:
            screen_torch_files(sorted(ckpt_dir.glob("*.pt")), allowed)
        except RuntimeError as e:  # UnsafeCheckpointError / CheckpointError naming the file
            refusal = e
        if self.all_reduce_max(0.0 if refusal is None else 1.0) > 0:
            if refusal is not None:
                raise refusal
            raise UnsafeCheckpointError(f"another rank refused the DeepSpeed checkpoint in {ckpt_dir} (its error "
                                        f"names the file); nothing was loaded")
        with deepspeed_safe_load(self.ds, allowed):
            path, _ = self.ds.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")

    def state_dict(self):
        raise NotImplementedError("deepspeed: use save_native / full_state")
