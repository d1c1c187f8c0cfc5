"""MiT: exact parameter count, the block equations against a direct re-computation, conditioning and nulls."""
import torch

from phenoflow.config import resolve
from phenoflow.model.flops import train_flops_per_image
from phenoflow.model.layers import rmsnorm
from phenoflow.model.mit import MIT_SIZES, MiT, MiTShape, build_model


def count(m):
    return sum(p.numel() for p in m.parameters())


def expected_mit_params(C, img, p, depth, D, heads, mlp_ratio, n_pert, n_exp, n_ct):
    """Independent count from the architecture description."""
    h = int(D * mlp_ratio)
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * h + h) + (h * D + D) + (D * 6 * D + 6 * D)
    skip = 2 * D * D + D
    embed = C * p * p * D + D
    time = 256 * D + D + D * D + D
    labels = (n_pert + 1 + n_exp + 1 + n_ct + 1) * D
    final = (D * 2 * D + 2 * D) + (D * p * p * C + p * p * C)
    return depth * block + (depth // 2) * skip + embed + time + labels + final


def test_mit_xl2_parameter_count_rxrx1():
    # RxRx1-shaped vocabularies: 1,139 perturbations (1,138 siRNAs + control), 51 experiments, 4 cell types.
    cfg = resolve("mit-xl2-rxrx1")
    m = build_model(cfg, {"perturbation": 1139, "experiment": 51, "cell_type": 4})
    assert count(m) == 712_235_544
    assert count(m) == expected_mit_params(6, 96, 2, 28, 1152, 16, 4.0, 1139, 51, 4)
    skips = sum(b.skip_linear.weight.numel() + b.skip_linear.bias.numel() for b in m.blocks if b.skip_linear is not None)
    assert skips == 14 * (2 * 1152 * 1152 + 1152)  # about 37M in the long skips


def test_h64_has_same_parameters_as_xl():
    cfg = resolve("mit-xl2-rxrx1")
    a = MiTShape(depth=2, hidden_size=1152, num_heads=16, num_perturbations=3)
    b = MiTShape(depth=2, hidden_size=1152, num_heads=18, num_perturbations=3)
    assert count(MiT(a)) == count(MiT(b))
    assert MIT_SIZES["XL-h64"][1] // MIT_SIZES["XL-h64"][2] == 64 and cfg.model.size == "XL"


def test_flop_model_matches_architecture_note():
    m = build_model(resolve("mit-xl2-rxrx1"), {"perturbation": 1139, "experiment": 51})
    tf = train_flops_per_image(m.shape) / 1e12
    assert 8.6 < tf < 8.8, tf


def tiny(**kw):
    s = {"image_size": 16, "in_channels": 6, "patch_size": 4, "depth": 4, "hidden_size": 32, "num_heads": 4,
         "num_perturbations": 5, "num_experiments": 2, "num_cell_types": 1, "proj_dropout": 0.0,
         "label_dropout": 0.0}
    s.update(kw)
    return MiT(MiTShape(**s))


def randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def labels(B):
    return {"perturbation": torch.arange(B) % 5, "experiment": torch.arange(B) % 2,
            "cell_type": torch.zeros(B, dtype=torch.long)}


def test_zero_init_output_is_zero():
    m = tiny()
    x = torch.randn(3, 6, 16, 16)
    assert torch.count_nonzero(m(x, torch.rand(3), labels(3))) == 0


def direct_forward(m, x, t, lab):
    """Re-computation of the documented equations with plain tensor ops."""
    h = m.patchify(x)
    c = m.t_embedder(t) + sum(m.label_embedders[g](lab[g]) for g in m.label_embedders)
    half, stack = len(m.blocks) // 2, []
    for i, blk in enumerate(m.blocks):
        if i >= half:
            s = stack.pop()
            z = torch.cat([h, s], -1)
            z = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
            h = z @ blk.skip_linear.weight.T + blk.skip_linear.bias
        mod = blk.adaLN_modulation[1](torch.nn.functional.silu(c))
        sm, cm, gm, sf, cf, gf = [u[:, None] for u in mod.chunk(6, -1)]
        n = rmsnorm(h) * (1 + cm) + sm
        qkv = blk.attn.qkv(n).reshape(n.shape[0], n.shape[1], 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / qkv.shape[-1] ** 0.5, -1) @ qkv[2]
        h = h + gm * blk.attn.proj(a.transpose(1, 2).reshape(h.shape))
        n = rmsnorm(h) * (1 + cf) + sf
        h = h + gf * blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(n), approximate="tanh"))
        if i < half:
            stack.append(h)
    sh, sc = m.final_layer.adaLN_modulation[1](torch.nn.functional.silu(c)).chunk(2, -1)
    return m.unpatchify(m.final_layer.linear(rmsnorm(h) * (1 + sc[:, None]) + sh[:, None]))


def test_forward_matches_direct_equations():
    m = randomize(tiny()).eval()
    x, t = torch.randn(3, 6, 16, 16), torch.rand(3)
    torch.testing.assert_close(m(x, t, labels(3)), direct_forward(m, x, t, labels(3)), rtol=1e-4, atol=1e-5)


def test_patchify_unpatchify_round_trip():
    m = tiny()
    x = torch.randn(2, 6, 16, 16)
    p = 4
    tokens = x.reshape(2, 6, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 6)
    assert torch.equal(m.unpatchify(tokens), x)


def test_labels_condition_and_null_rows():
    m = randomize(tiny()).eval()
    x, t = torch.randn(4, 6, 16, 16), torch.rand(4)
    lab = labels(4)
    other = dict(lab, perturbation=(lab["perturbation"] + 1) % 5)
    assert not torch.allclose(m(x, t, lab), m(x, t, other))
    nulled = m.null_labels(lab, ("perturbation",))
    assert (nulled["perturbation"] == 5).all() and torch.equal(nulled["experiment"], lab["experiment"])
    # A missing group means its null row.
    no_pert = {k: v for k, v in lab.items() if k != "perturbation"}
    torch.testing.assert_close(m(x, t, no_pert), m(x, t, nulled))


def test_label_dropout_rate_in_training():
    m = tiny(label_dropout=0.15).train()
    torch.manual_seed(0)
    lab = torch.zeros(20000, dtype=torch.long)
    emb = m.label_embedders["perturbation"]
    with torch.no_grad():
        emb.weight.zero_()
        emb.weight[5] = 1.0  # the null row
        c = m.embed_labels({"perturbation": lab, "experiment": lab, "cell_type": lab}, 20000, "cpu")
    rate = (c[:, 0] > 0.5).float().mean().item()
    assert abs(rate - 0.15) < 0.015


def test_out_of_range_label_is_an_error():
    m = tiny()
    bad = labels(2)
    bad["experiment"] = torch.tensor([0, 7])
    try:
        m(torch.randn(2, 6, 16, 16), torch.rand(2), bad)
    except ValueError as e:
        assert "experiment" in str(e)
    else:
        raise AssertionError("out-of-range label accepted")


def test_data_prediction_returns_the_linear_path_velocity():
    """model.prediction=data: the head's output is x1_hat and the model returns (x1_hat - x_t) / max(1 - t, 0.05)
    (on the linear path x_t = (1 - t) x0 + t x1 that is x1 - x0 when x1_hat = x1)."""
    from phenoflow.model.mit import DATA_T_EPS

    vel = randomize(tiny()).eval()
    dat = tiny(prediction="data").eval()
    dat.load_state_dict(vel.state_dict())
    x, t = torch.randn(4, 6, 16, 16), torch.tensor([0.0, 0.3, 0.97, 1.0])
    head = vel(x, t, labels(4))  # the same weights: what the data model's head outputs
    want = (head - x) / (1 - t).clamp_min(DATA_T_EPS).view(4, 1, 1, 1)
    torch.testing.assert_close(dat(x, t, labels(4)), want, rtol=1e-5, atol=1e-5)


def test_data_prediction_config_is_checked():
    import pytest

    from phenoflow.errors import ConfigError

    assert resolve("demo", ["model.prediction=data"]).model.prediction == "data"
    assert build_model(resolve("demo", ["model.prediction=data"]), {"perturbation": 4}).shape.prediction == "data"
    with pytest.raises(ConfigError, match="model.prediction"):
        resolve("demo", ["model.prediction=noise"])
    with pytest.raises(ConfigError, match="linear path"):
        resolve("demo", ["model.prediction=data", "flow.path=vp"])
    with pytest.raises(ConfigError, match="linear path"):
        resolve("expression-demo", ["model.prediction=data"])


def test_output_conv_head_after_unpatchify():
    """model.output_conv=K: the final layer gives K channels per pixel, then Conv3x3 -> SiLU -> Conv3x3 to the
    image channels. Checked against a direct computation from the final layer's output; the head starts at 0 and
    still trains (the zero-initialised final layer gets a gradient through the convolutions); the FLOP model
    counts it; a pixel's output depends on the neighbouring patch's head values (the seam the head exists for)."""
    import torch.nn.functional as F

    from phenoflow.model.flops import forward_macs

    m0 = tiny(output_conv=8)
    x, t = torch.randn(2, 6, 16, 16), torch.rand(2)
    out = m0(x, t, labels(2))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised final layer, zero biases
    y = m0(x, t, labels(2))
    (y - x).square().mean().backward()
    assert m0.final_layer.linear.weight.grad.abs().sum() > 0  # not a dead head
    m = randomize(tiny(output_conv=8)).eval()
    seen = {}
    m.final_layer.register_forward_hook(lambda mod, inp, o: seen.__setitem__("z", o))
    got = m(x, t, labels(2))
    z = m.unpatchify(seen["z"])
    assert z.shape == (2, 8, 16, 16)
    c1, c2 = m.output_conv.conv1, m.output_conv.conv2
    want = F.conv2d(F.silu(F.conv2d(z, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    z2 = z.clone()
    z2[:, :, 4:8, 4:8] += 1.0  # one patch's head values (patch 4)
    moved = (m.output_conv(z2) - m.output_conv(z)).abs().sum(1)[0]
    assert moved[4:8, 3].min() > 0 and moved[4:8, 8].min() > 0 and moved[4:8, 10].max() == 0  # reach: 2 pixels
    macs, base = forward_macs(m.shape), forward_macs(tiny().shape)
    assert macs["output_conv"] == 16 * 16 * 9 * (8 * 8 + 8 * 6) and base["output_conv"] == 0
    assert macs["embed_final"] - base["embed_final"] == 16 * 32 * (16 * 8 - 16 * 6)  # N D p^2 (K - C)


def test_output_conv_config_is_checked():
    import pytest

    from phenoflow.errors import ConfigError

    assert build_model(resolve("demo", ["model.output_conv=16"]), {"perturbation": 4}).output_conv is not None
    with pytest.raises(ConfigError, match="model.output_conv"):
        resolve("demo", ["model.output_conv=-1"])
    with pytest.raises(ConfigError, match="model.output_conv"):
        resolve("demo", ["model.arch=unet", "model.output_conv=8", "model.prediction=velocity"])
