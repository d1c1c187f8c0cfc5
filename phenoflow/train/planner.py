"""`phenoflow plan`: per-GPU memory, gradient communication and scaling efficiency of a preset on a cluster.

Memory per GPU, P parameters, N data-parallel ranks, bytes per parameter (Adam: fp32 master + m + v = 12):

    engine      weights (compute)   gradients       optimizer (+ masters)   EMA (k widths, fp32)
    ddp         4 P  (fp32 masters, autocast)  4 P   8 P  (m, v)            4 k P
    zero1       2 P  (bf16)          4 P (fp32 accum)  12 P / N             4 k P / N
    zero2       2 P                  4 P / N           12 P / N             4 k P / N
    zero3       2 P / N              4 P / N           12 P / N             4 k P / N
    fsdp2       4 P / N (fp32 sharded masters)  4 P / N  8 P / N            4 k P / N
ZeRO-3 and FSDP2 also hold the gathered bf16 weights of the blocks in flight (two blocks: current + prefetch).
CPU offload (deepspeed) moves the optimizer column to host memory. The EMA keeps this rank's fp32 pieces of
the master weights (phenoflow.train.engines), so it shards with the optimizer.

Activations per sample, T tokens of width D, MLP ratio r, eager PyTorch under bf16 autocast with an
O(T) attention kernel (flash / memory-efficient SDPA), counted with saved-tensor hooks on our block:
    block                 (32 + 4 r) D T bytes  (fp32 residual stream and norms, bf16 matmul inputs)
    + skip-merge block    8 D T                 (fp32 rmsnorm of the 2D concatenation)
    + projection dropout  1 D T                 (bool mask)
    outside the blocks    about 16 D T          (patch embedding, final layer)
With per-block activation checkpointing only each block's fp32 input (4 D T) is kept, plus one block's full
activations while it is recomputed.

Gradient communication per step, bytes each GPU sends (ring collectives, (N - 1) / N factor):
    ddp          all-reduce of fp32 gradients          2 (N-1)/N * 4 P     overlapped with backward (buckets)
    zero1        reduce-scatter grads + all-gather bf16 weights  (N-1)/N * (g + 2) P  both after backward
    zero2        the same volume; the reduce-scatter overlaps backward, the all-gather follows the step
    zero3/fsdp2  all-gather weights in forward and again in backward + reduce-scatter grads
                 (N-1)/N * (2 + 2 + g) P; prefetching overlaps them with forward and backward compute
g = bytes per reduced gradient element: 2 for DeepSpeed (its default communication dtype is the bf16 model
dtype), 4 for FSDP2 (reduce_dtype=fp32). Time = bytes / bandwidth, with the bandwidth of the slowest link a
GPU's traffic crosses: NVLink inside a node, the node's InfiniBand NICs shared by its GPUs across nodes.
Bandwidth: NCCL runs one ring per NIC across nodes, so the bus bandwidth is min(NVLink per GPU, the node's
total NIC bandwidth) x link efficiency (defaults: 360 and 8 x 50 GB/s, 0.8 -> 288 GB/s).
Step compute = images per GPU per step x training FLOP per image / (peak x MFU); backward = 2/3 of it
(3/4 with checkpointing, which adds one forward). Exposed communication = what exceeds the compute it
overlaps + what runs after backward + the part nothing can overlap (first block's weights, last gradient
bucket) + overlap_cost (0.1) x the overlapped time (NCCL kernels share SMs and memory bandwidth).
Scaling efficiency = compute / (compute + exposed): throughput per GPU against the same per-GPU work on
one GPU with no communication.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from phenoflow.model.flops import H100_BF16_PEAK_FLOPS, train_flops_per_image
from phenoflow.model.mit import MiT, MiTShape, model_shape

GiB = 2**30
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp2")


@dataclass
class Cluster:
    nodes: int = 4
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    nvlink_gbps: float = 360.0  # NCCL bus bandwidth inside a node (GB/s per GPU); H100 SXM NVLink 4 ~360-450
    ib_gbps_per_node: float = 400.0  # 8 x 400 Gb/s NICs (one per GPU) = 400 GB/s per node
    link_efficiency: float = 0.8  # achieved / nominal for large collectives
    overlap_cost: float = 0.1  # fraction of overlapped communication time that still slows compute (SM sharing)
    peak_flops: float = H100_BF16_PEAK_FLOPS
    mfu: float = 0.19  # the paper's implied MFU by the full FLOP count (ARCHITECTURE.md section 6)
    headroom: float = 0.9  # usable fraction of GPU memory (CUDA context, allocator fragmentation)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def bandwidth(self) -> float:
        """Ring bus bandwidth (bytes/s each GPU sends). Across nodes NCCL runs one ring per NIC: each ring
        crosses each node boundary once, so a NIC carries 1/gpus_per_node of a GPU's ring traffic and the bus
        bandwidth is min(NVLink per GPU, the node's total NIC bandwidth)."""
        bw = self.nvlink_gbps
        if self.nodes > 1:
            bw = min(bw, self.ib_gbps_per_node)
        return bw * 1e9 * self.link_efficiency


def count_params(shape: MiTShape) -> int:
    """Exact parameter count, from a meta-device model (no memory)."""
    import torch

    with torch.device("meta"):
        model = MiT(shape)
    return sum(p.numel() for p in model.parameters())


def activation_bytes_per_sample(shape: MiTShape, checkpointing: bool) -> float:
    T, D, L, r = shape.num_tokens, shape.hidden_size, shape.depth, shape.mlp_ratio
    per_block = (32 + 4 * r) * D * T + (1 * D * T if shape.proj_dropout > 0 else 0)
    merges = L // 2 if shape.long_skip else 0
    outside = 16 * D * T
    if checkpointing:
        return L * 4 * D * T + per_block + 8 * D * T + outside
    return L * per_block + merges * 8 * D * T + outside


def memory_per_gpu(engine: str, P: int, N: int, n_ema: int, offload: bool = False,
                   block_params: int = 0) -> dict[str, float]:
    """Bytes per GPU of weights, gradients, optimizer states, EMA and gathered weights (see the table above)."""
    if engine == "ddp":
        m = {"weights": 4 * P, "grads": 4 * P, "optimizer": 8 * P, "ema": 4 * n_ema * P, "gathered": 0}
    elif engine == "zero1":
        m = {"weights": 2 * P, "grads": 4 * P, "optimizer": 12 * P / N, "ema": 4 * n_ema * P / N, "gathered": 0}
    elif engine == "zero2":
        m = {"weights": 2 * P, "grads": 4 * P / N, "optimizer": 12 * P / N, "ema": 4 * n_ema * P / N, "gathered": 0}
    elif engine == "zero3":
        m = {"weights": 2 * P / N, "grads": 4 * P / N, "optimizer": 12 * P / N, "ema": 4 * n_ema * P / N,
             "gathered": 2 * 2 * block_params}
    elif engine == "fsdp2":
        m = {"weights": 4 * P / N, "grads": 4 * P / N, "optimizer": 8 * P / N, "ema": 4 * n_ema * P / N,
             "gathered": 2 * 2 * block_params}
    else:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if offload:
        if not engine.startswith("zero"):
            raise ValueError("CPU offload is a DeepSpeed (zero1/2/3) option")
        m["optimizer"] = 0.0
    return m


def comm_bytes_per_gpu(engine: str, P: int, N: int) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step, split by when they can overlap compute."""
    f = (N - 1) / N if N > 1 else 0.0
    if engine == "ddp":
        return {"backward": 2 * f * 4 * P, "forward": 0.0, "exposed_after": 0.0}
    g = 4 if engine == "fsdp2" else 2
    if engine == "zero1":
        return {"backward": 0.0, "forward": 0.0, "exposed_after": f * (g + 2) * P}
    if engine == "zero2":
        return {"backward": f * g * P, "forward": 0.0, "exposed_after": f * 2 * P}
    return {"backward": f * (2 + g) * P, "forward": f * 2 * P, "exposed_after": 0.0}


@dataclass
class Row:
    engine: str
    memory: dict[str, float]
    activations: float
    total: float
    fits: bool
    comm_bytes: float
    comm_s: float
    exposed_s: float
    compute_s: float
    efficiency: float


def plan(shape: MiTShape, cluster: Cluster, global_batch: int, micro_batch: int, n_ema: int = 2,
         checkpointing: bool = False, offload: bool = False, engines=ENGINES) -> list[Row]:
    P, N = count_params(shape), cluster.world
    if global_batch % N:
        raise ValueError(f"global batch {global_batch} is not divisible by {N} GPUs")
    per_gpu = global_batch // N
    micro = min(micro_batch or per_gpu, per_gpu)
    import torch

    with torch.device("meta"):
        block_params = sum(p.numel() for p in MiT(shape).blocks[-1].parameters())
    act = activation_bytes_per_sample(shape, checkpointing) * micro
    compute = per_gpu * train_flops_per_image(shape) / (cluster.peak_flops * cluster.mfu)
    if checkpointing:
        compute *= 4 / 3
    bwd = compute * (3 / 4 if checkpointing else 2 / 3)
    fwd = compute - bwd
    bw = cluster.bandwidth()
    rows = []
    for e in engines:
        mem = memory_per_gpu(e, P, N, n_ema, offload and e.startswith("zero"), block_params)
        total = sum(mem.values()) + act
        c = comm_bytes_per_gpu(e, P, N)
        t = {k: v / bw for k, v in c.items()}
        # Not hidden: what exceeds the compute it overlaps, what runs after backward, the first block's weights
        # (zero3/fsdp2) or the last gradient bucket (25 MB, ddp/zero2) that nothing can overlap, and a fraction
        # of the overlapped time (communication kernels share SMs and memory bandwidth with compute).
        first = 2 * block_params / bw if e in ("zero3", "fsdp2") else 25e6 / bw if e in ("ddp", "zero2") else 0.0
        hidden = min(t["forward"], fwd) + min(t["backward"], bwd)
        exposed = (max(0.0, t["forward"] - fwd) + max(0.0, t["backward"] - bwd) + t["exposed_after"]
                   + (first if cluster.world > 1 else 0.0) + cluster.overlap_cost * hidden)
        rows.append(Row(e, mem, act, total, total <= cluster.headroom * cluster.gpu_mem_gib * GiB,
                        sum(c.values()), sum(t.values()), exposed, compute, compute / (compute + exposed)))
    return rows


def format_plan(rows: list[Row], shape: MiTShape, cluster: Cluster, global_batch: int, micro: int,
                checkpointing: bool) -> str:
    P = count_params(shape)
    head = (f"MiT depth {shape.depth} width {shape.hidden_size} patch {shape.patch_size} at {shape.image_size}px x "
            f"{shape.in_channels}ch: {P / 1e6:.1f}M parameters, {shape.num_tokens} tokens, "
            f"{train_flops_per_image(shape) / 1e12:.2f} TFLOP per training image\n"
            f"cluster {cluster.nodes} x {cluster.gpus_per_node} GPUs ({cluster.gpu_mem_gib:.0f} GiB, usable "
            f"{cluster.headroom:.0%}), ring bandwidth {cluster.bandwidth() / 1e9:.0f} GB/s per GPU; global batch "
            f"{global_batch} = {cluster.world} x {global_batch // cluster.world} per GPU (micro {micro}); "
            f"activation checkpointing {'on' if checkpointing else 'off'}; MFU {cluster.mfu:.0%}\n")
    cols = ("engine", "weights", "grads", "optim", "ema", "gathered", "activ", "total GiB", "fits",
            "comm GB", "comm ms", "exposed ms", "compute ms", "efficiency")
    lines = [head, "  ".join(f"{c:>10}" for c in cols)]
    for r in rows:
        m = r.memory
        vals = [r.engine] + [f"{m[k] / GiB:.2f}" for k in ("weights", "grads", "optimizer", "ema", "gathered")] + [
            f"{r.activations / GiB:.2f}", f"{r.total / GiB:.2f}", "yes" if r.fits else "NO",
            f"{r.comm_bytes / 1e9:.2f}", f"{1e3 * r.comm_s:.1f}", f"{1e3 * r.exposed_s:.1f}",
            f"{1e3 * r.compute_s:.1f}", f"{100 * r.efficiency:.1f}%"]
        lines.append("  ".join(f"{v:>10}" for v in vals))
    bad = [r.engine for r in rows if not r.fits]
    if bad:
        lines.append(f"DOES NOT FIT: {', '.join(bad)} (reduce train.micro_batch_size, turn on "
                     f"train.activation_checkpointing, or use a higher ZeRO stage / CPU offload)")
    return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
    c = Cluster()
    p.add_argument("--nodes", type=int, default=c.nodes)
    p.add_argument("--gpus-per-node", type=int, default=c.gpus_per_node)
    p.add_argument("--gpu-mem", type=float, default=c.gpu_mem_gib, help="GiB per GPU")
    p.add_argument("--nvlink-gbps", type=float, default=c.nvlink_gbps, help="GB/s per GPU inside a node")
    p.add_argument("--ib-gbps", type=float, default=c.ib_gbps_per_node, help="GB/s per node across nodes")
    p.add_argument("--link-efficiency", type=float, default=c.link_efficiency)
    p.add_argument("--mfu", type=float, default=c.mfu, help="assumed model FLOP utilisation for step time")
    p.add_argument("--mfu-sweep", default="0.19,0.3,0.4,0.5", help="also print efficiency at these MFUs")


def cluster_from_args(args) -> Cluster:
    for name in ("nodes", "gpus_per_node", "gpu_mem", "nvlink_gbps", "ib_gbps", "mfu", "link_efficiency"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    return Cluster(args.nodes, args.gpus_per_node, args.gpu_mem, args.nvlink_gbps, args.ib_gbps,
                   args.link_efficiency, mfu=args.mfu)


def run(cfg, args) -> str:
    cluster = cluster_from_args(args)
    shape = model_shape(cfg, {"perturbation": cfg.model.num_perturbations or cfg.data.num_perturbations,
                              "experiment": cfg.model.num_experiments or cfg.data.num_experiments,
                              "cell_type": cfg.model.num_cell_types or cfg.data.num_cell_types})
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size // cluster.world
    out = []
    for ckpt in (False, True):
        rows = plan(shape, cluster, t.batch_size, micro, len(t.ema_stds), ckpt, t.cpu_offload)
        out.append(format_plan(rows, shape, cluster, t.batch_size, micro, ckpt))
    sweep = [float(x) for x in args.mfu_sweep.split(",") if x]
    if sweep:
        lines = ["scaling efficiency by assumed MFU (no checkpointing):",
                 "  ".join(f"{e:>8}" for e in ("mfu",) + ENGINES)]
        for m in sweep:
            c = Cluster(**{**cluster.__dict__, "mfu": m})
            rows = plan(shape, c, t.batch_size, micro, len(t.ema_stds), False, t.cpu_offload)
            lines.append("  ".join([f"{m:>8.2f}"] + [f"{100 * r.efficiency:>7.1f}%" for r in rows]))
        out.append("\n".join(lines))
    return "\n\n".join(out)

