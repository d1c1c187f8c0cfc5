"""The whole MiT (tiny size) on both kernel paths: same outputs and gradients, dropout statistics in the
model, checkpoints interchangeable. CPU runs the Triton path under TRITON_INTERPRET=1."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from phenoflow.config import resolve
from phenoflow.kernels.testing import max_err
from phenoflow.model import mit

VOCAB = {"perturbation": 5, "experiment": 3, "cell_type": 2}


def build(kernels: str, proj_dropout: float = 0.0, size: str = "tiny", image: int = 28):
    """Tiny MiT on 28x28x6 with patch 4: 49 tokens (odd), 4 blocks, width 128, 4 heads; long skips on."""
    cfg = resolve("demo", [f"model.kernels={kernels}", f"model.proj_dropout={proj_dropout}", "model.label_dropout=0",
                           f"model.size={size}", f"data.image_size={image}"])
    torch.manual_seed(0)
    model = mit.build_model(cfg, VOCAB)
    with torch.no_grad():  # leave the zero init: every branch (adaLN, gates, final layer) must carry signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(B=3, image=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, image, image, generator=g)
    t = torch.rand(B, generator=g)
    labels = {k: torch.randint(0, n + 1, (B,), generator=g) for k, n in VOCAB.items()}
    return x, t, labels


def out_and_grads(model, x, t, labels, seed=2):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, t, labels)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_triton_path_matches_torch_path_fp32():
    ref, fused = build("torch"), build("triton")
    fused.load_state_dict(ref.state_dict())
    ref.train(), fused.train()
    x, t, labels = batch()
    o_ref, g_ref = out_and_grads(ref, x, t, labels)
    o_fused, g_fused = out_and_grads(fused, x, t, labels)
    assert o_ref.abs().max() > 1e-2, "the test model should produce a non-trivial output"
    torch.testing.assert_close(o_fused, o_ref, rtol=1e-4, atol=1e-5)
    assert g_ref.keys() == g_fused.keys()
    for name in g_ref:
        scale = g_ref[name].abs().max().item()
        assert scale > 0, f"{name}: zero gradient on the torch path (test model degenerate)"
        assert max_err(g_fused[name], g_ref[name]) <= 1e-4 * scale + 1e-7, name


def test_triton_path_bf16_within_twice_torch_bf16_error():
    ref32 = build("torch")
    x, t, labels = batch()
    with torch.no_grad():
        o32 = ref32.eval()(x, t, labels)
        errs = {}
        for k in ("torch", "triton"):
            m = build(k)
            m.load_state_dict(ref32.state_dict())
            m = m.to(torch.bfloat16).eval()
            errs[k] = max_err(m(x.bfloat16(), t, labels), o32)
    assert errs["triton"] <= 2 * errs["torch"] + 1e-3 * o32.abs().max().item(), errs


def test_checkpoint_loads_across_paths(tmp_path):
    a = build("triton").eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b = build("torch").eval()
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    missing, unexpected = b.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    x, t, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, labels), b(x, t, labels), rtol=1e-4, atol=1e-5)
    # and back: a torch-path checkpoint into a triton-path model
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(path))
    c = build("triton").eval()
    c.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(c(x, t, labels), b(x, t, labels), rtol=1e-4, atol=1e-5)


def test_projection_dropout_in_model(monkeypatch):
    """Triton path in training: the attention branch is dropped at rate p, reproducibly per seed; eval = no drop."""
    p = 0.25
    model = build("triton", proj_dropout=p).train()
    calls = []
    real = mit.gated_residual

    def spy(x, y, gate, p_, kernels):
        out = real(x, y, gate, p_, kernels)
        if p_ > 0:
            calls.append((x.detach(), y.detach(), gate.detach(), out.detach()))
        return out

    monkeypatch.setattr(mit, "gated_residual", spy)
    x, t, labels = batch()
    torch.manual_seed(3)
    o1 = model(x, t, labels)
    assert len(calls) == len(model.blocks), "one dropout call per block"
    dropped = total = 0
    for xi, yi, gi, oi in calls:
        live = (gi[:, None] * yi).abs() > 1e-6  # elements whose branch value is not ~0
        dropped += ((oi == xi) & live).sum().item()
        total += live.sum().item()
    rate = dropped / total
    assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / total), f"drop rate {rate:.4f} vs p={p} over {total}"
    torch.manual_seed(3)
    assert torch.equal(model(x, t, labels), o1), "same seed, same masks"
    assert not torch.equal(model(x, t, labels), o1), "next step, new masks"
    model.eval()
    ref = build("torch", proj_dropout=p).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, labels), ref(x, t, labels), rtol=1e-4, atol=1e-5)


def saved_activation_bytes(model, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded) in one forward."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in kept.items() if ptr not in params)


def test_fused_path_keeps_fewer_activations():
    """The fused ops keep no normalised, modulated, concatenated or mask tensors: in a bf16 model (as DeepSpeed
    runs it) the triton path keeps well under the torch path's activation bytes (about 30% less measured)."""
    x, t, labels = batch()
    kept = {}
    for k in ("torch", "triton"):
        m = build(k, proj_dropout=0.1).to(torch.bfloat16).train()
        kept[k] = saved_activation_bytes(m, x.bfloat16(), t.bfloat16(), labels)
    assert kept["triton"] < 0.8 * kept["torch"], kept


def test_xl_h64_has_xl_parameter_count():
    shapes = {s: mit.MIT_SIZES[s] for s in ("XL", "XL-h64")}
    assert shapes["XL"][:2] == shapes["XL-h64"][:2] and 1152 // shapes["XL-h64"][2] == 64
    counts = {}
    for s in shapes:  # count on the meta device: no memory
        cfg = resolve("mit-xl2-rxrx1", [f"model.size={s}"])
        with torch.device("meta"):
            counts[s] = sum(p.numel() for p in mit.build_model(cfg, VOCAB).parameters())
    assert counts["XL"] == counts["XL-h64"]


@pytest.mark.gpu
def test_paths_match_cuda_bf16():
    torch.manual_seed(0)
    x, t, labels = [v.cuda() if torch.is_tensor(v) else {k: w.cuda() for k, w in v.items()} for v in batch(B=4)]
    ref32 = build("torch").cuda().eval()
    with torch.no_grad():
        o32 = ref32(x, t, labels)
        errs = {}
        for k in ("torch", "triton"):
            m = build(k).cuda()
            m.load_state_dict(ref32.state_dict())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                errs[k] = max_err(m.eval()(x, t, labels), o32)
    assert errs["triton"] <= 2 * errs["torch"] + 1e-3 * o32.abs().max().item(), errs
