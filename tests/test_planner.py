"""`phenoflow plan` against a hand computation for a small MiT, and its activation model against the bytes
autograd actually saves."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from phenoflow.cli import main
from phenoflow.model.flops import train_flops_per_image
from phenoflow.model.mit import MiT, MiTShape
from phenoflow.train import planner

# depth 2, width 32, 16 px / patch 4 (16 tokens), 3 channels, vocabularies 3 / 2 / 1.
SHAPE = MiTShape(image_size=16, in_channels=3, patch_size=4, depth=2, hidden_size=32, num_heads=2,
                 num_perturbations=3, num_experiments=2, num_cell_types=1, proj_dropout=0.0)


def hand_params() -> int:
    D = 32
    embed = 3 * 4 * 4 * D + D  # patch conv
    time = (256 * D + D) + (D * D + D)  # sinusoid -> Linear -> SiLU -> Linear
    labels = (3 + 1) * D + (2 + 1) * D + (1 + 1) * D  # one null row per table
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + (D * 6 * D + 6 * D)
    merge = 2 * D * D + D  # Linear(2D -> D) of the second-half block
    final = (D * 2 * D + 2 * D) + (D * 4 * 4 * 3 + 4 * 4 * 3)
    return embed + time + labels + 2 * block + merge + final


def test_parameter_count():
    assert hand_params() == 54736
    assert planner.count_params(SHAPE) == hand_params()


def test_memory_and_communication_by_hand():
    P, N = hand_params(), 4
    m = planner.memory_per_gpu("zero2", P, N, n_ema=2)
    assert m == {"weights": 2 * P, "grads": 4 * P / 4, "optimizer": 12 * P / 4, "ema": 8 * P / 4, "gathered": 0}
    m = planner.memory_per_gpu("ddp", P, N, n_ema=2)
    assert sum(m.values()) == (4 + 4 + 8 + 8) * P
    m = planner.memory_per_gpu("zero3", P, N, n_ema=1, offload=True, block_params=100)
    assert m == {"weights": 2 * P / 4, "grads": P, "optimizer": 0.0, "ema": P, "gathered": 400}
    with pytest.raises(ValueError, match="offload"):
        planner.memory_per_gpu("fsdp2", P, N, 1, offload=True)
    assert planner.comm_bytes_per_gpu("ddp", P, N)["backward"] == 2 * 0.75 * 4 * P
    z3 = planner.comm_bytes_per_gpu("zero3", P, N)
    assert z3["forward"] == 0.75 * 2 * P and z3["backward"] == 0.75 * 4 * P
    assert sum(planner.comm_bytes_per_gpu("fsdp2", P, N).values()) == 0.75 * (2 + 2 + 4) * P
    assert sum(planner.comm_bytes_per_gpu("zero1", P, 1).values()) == 0.0


def test_activation_formula_by_hand_and_against_autograd():
    # Hand: per block (32 + 4 r) D T, + 8 D T for the one merge block, + 16 D T outside the blocks.
    T, D = 16, 32
    assert planner.activation_bytes_per_sample(SHAPE, False) == 2 * 48 * D * T + 8 * D * T + 16 * D * T
    assert planner.activation_bytes_per_sample(SHAPE, True) == 2 * 4 * D * T + 48 * D * T + 8 * D * T + 16 * D * T
    # Measured: bytes of the tensors autograd saves (unique storages, minus bf16 weight copies) for a
    # 64-token, width-64 model under bf16 autocast.
    shape = MiTShape(image_size=32, in_channels=3, patch_size=4, depth=4, hidden_size=64, num_heads=4,
                     num_perturbations=3, num_experiments=2, num_cell_types=1, proj_dropout=0.0, label_dropout=0.0)
    model = MiT(shape)
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B = 4
    x = torch.randn(B, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, torch.rand(B), {"perturbation": torch.zeros(B, dtype=torch.long)})
    weights = 2 * sum(p.numel() for p in model.parameters())
    measured = (sum(seen.values()) - weights) / B
    predicted = planner.activation_bytes_per_sample(shape, False)
    assert abs(measured - predicted) / predicted < 0.15, (measured, predicted)


def test_efficiency_by_hand():
    P = hand_params()
    c = planner.Cluster(nodes=1, gpus_per_node=4, gpu_mem_gib=1.0, nvlink_gbps=1e-3, link_efficiency=1.0,
                        peak_flops=1e9, mfu=0.5, overlap_cost=0.0)
    rows = {r.engine: r for r in planner.plan(SHAPE, c, global_batch=8, micro_batch=2)}
    bw = 1e-3 * 1e9  # 1 MB/s: communication dominates
    compute = 2 * train_flops_per_image(SHAPE) / (1e9 * 0.5)
    bwd = compute * 2 / 3
    ddp = rows["ddp"]
    assert ddp.compute_s == pytest.approx(compute)
    t_ar = 2 * 0.75 * 4 * P / bw
    assert ddp.exposed_s == pytest.approx(max(0, t_ar - bwd) + 25e6 / bw)
    assert ddp.efficiency == pytest.approx(compute / (compute + ddp.exposed_s))
    z1 = rows["zero1"]
    assert z1.exposed_s == pytest.approx(0.75 * 4 * P / bw)  # reduce-scatter (bf16) + all-gather (bf16), exposed
    # Memory total = states + activations of one micro-batch of 2; 1 GiB fits this model, 1 KiB does not.
    assert ddp.total == pytest.approx(24 * P + 2 * planner.activation_bytes_per_sample(SHAPE, False))
    assert all(r.fits for r in rows.values())
    small = planner.Cluster(nodes=1, gpus_per_node=4, gpu_mem_gib=2**-20)
    text = planner.format_plan(planner.plan(SHAPE, small, 8, 2), SHAPE, small, 8, 2, False)
    assert "DOES NOT FIT" in text


def test_plan_command_for_mit_xl2_on_32_gpus():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--preset", "mit-xl2-pretrain", "--mfu-sweep", "0.19"]) == 0
    text = out.getvalue()
    assert "710.9M parameters" in text and "4 x 8 GPUs" in text and "DOES NOT FIT" not in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip().startswith("zero2")}
    assert float(rows["zero2"][-1].rstrip("%")) >= 90.0
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["plan", "--nodes", "0"]) == 2
