"""The U-Net (1D genes / 2D images) and MLP velocity fields and their conditioning (issue 11, item 2)."""
from __future__ import annotations

import statistics

import pytest
import torch

from phenoflow.flow.guidance import guided_velocity
from phenoflow.model.conditioning import Conditioning, multihot_to_ids
from phenoflow.model.expression import build_expression_model, build_unet2d
from phenoflow.model.unet import UNet

SMALL_1D = {"base_channels": 8, "channel_mult": (1, 2, 4), "num_res_blocks": 1, "norm_groups": 4}
SMALL_2D = {"base_channels": 16, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "head_channels": 16, "norm_groups": 8}
VOCAB = {"perturbation": 5, "cell_type": 3}


def _randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Make the zero-initialised layers non-zero so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _labels(B: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"perturbation": torch.randint(0, 5, (B,), generator=g), "cell_type": torch.randint(0, 3, (B,), generator=g)}


@pytest.mark.parametrize("G", [37, 500, 2001])
def test_gene_unet_shapes_odd_counts(G):
    m = build_expression_model("unet", G, VOCAB, **({} if G == 2001 else SMALL_1D)).eval()  # default at 2001
    x, t = torch.randn(3, G), torch.rand(3)
    assert m(x, t, _labels(3)).shape == (3, G)
    assert m(x, torch.tensor(0.5), {}).shape == (3, G)  # scalar t, no labels = unconditional
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(3, G + 1), t, {})


def test_gene_unet_default_parameter_count():
    """Close to the ~6M of the unofficial PRiMeFlow shape reference (base 32, mult 1,2,4,8)."""
    for G, lo, hi in ((2000, 5.5e6, 6.0e6), (5000, 5.6e6, 6.1e6)):
        n = sum(p.numel() for p in build_expression_model("unet", G, {"perturbation": 100}).parameters())
        assert lo < n < hi, (G, n)


@pytest.mark.parametrize("size", [(32, 32), (24, 24), (30, 26)])
def test_unet2d_shapes(size):
    m = build_unet2d(32, 3, VOCAB, **SMALL_2D).eval()
    assert m(torch.randn(2, 3, *size), torch.rand(2), _labels(2)).shape == (2, 3, *size)


def test_adm_defaults_build():
    m = build_unet2d(32, 3, {"perturbation": 10}, base_channels=32)
    kinds = [[type(b).__name__ for b in blocks] for blocks in m.down]
    assert len(kinds) == 11 and kinds[0] == ["ResBlock"] and kinds[3] == ["ResBlock", "AttentionBlock"]
    assert [type(b).__name__ for b in m.mid] == ["ResBlock", "AttentionBlock", "ResBlock"]
    assert m(torch.randn(1, 3, 32, 32), torch.rand(1), {}).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("dims", [1, 2])
def test_padding_does_not_leak(dims):
    """Output at real positions is the same whatever the padded positions hold and however many there are."""
    torch.manual_seed(0)
    if dims == 1:
        m, x = build_expression_model("unet", 37, VOCAB, **SMALL_1D), torch.randn(2, 37)
    else:
        m, x = build_unet2d(32, 3, VOCAB, **SMALL_2D, attention_levels=(1, 2)), torch.randn(2, 3, 30, 26)
    _randomize(m)
    m.eval()
    t, y = torch.rand(2), _labels(2)
    ref = m(x, t, y)
    x4 = x[:, None] if dims == 1 else x
    size = x4.shape[2:]
    for extra in (m.factor, 3 * m.factor):  # longer padding than needed, filled with garbage
        padded = tuple(-(-n // m.factor) * m.factor + extra for n in size)
        xp = torch.randn((2, x4.shape[1]) + padded) * 100
        xp[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)] = x4
        mask = torch.zeros((1, 1) + padded)
        mask[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)] = 1
        masks = [mask]
        for _ in range(m.levels - 1):
            masks.append(torch.nn.functional.max_pool1d(masks[-1], 2) if dims == 1
                         else torch.nn.functional.max_pool2d(masks[-1], 2))
        out = m.forward_padded(xp, masks, t, y)[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]
        torch.testing.assert_close(out[:, 0] if dims == 1 else out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "mlp", "unet2d"])
def test_zero_initialised_output(kind):
    m = (build_unet2d(32, 3, VOCAB, **SMALL_2D) if kind == "unet2d"
         else build_expression_model(kind, 37, VOCAB, **(SMALL_1D if kind == "unet" else {"width": 32})))
    x = torch.randn(4, 3, 24, 24) if kind == "unet2d" else torch.randn(4, 37)
    assert torch.equal(m(x, torch.rand(4), _labels(4)), torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditioning_acts_after_optimisation_steps(kind):
    """Step 1 moves only the zero-initialised output layer (every other gradient is zero at init, as the
    output layer is zero), so v != 0 but does not depend on labels yet; after step 2 FiLM changes v."""
    torch.manual_seed(0)
    m = build_expression_model(kind, 37, VOCAB, label_dropout=0.0,
                               **(SMALL_1D if kind == "unet" else {"width": 32}))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    x, t, y = torch.randn(8, 37), torch.rand(8), _labels(8)
    probe = torch.randn(2, 37), torch.full((2,), 0.5)
    outs = []
    for _ in range(2):
        loss = ((m(x, t, y) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            a = m(*probe, {"perturbation": torch.tensor([0, 0])})
            b = m(*probe, {"perturbation": torch.tensor([1, 1])})
        outs.append((a, b))
    assert outs[0][0].abs().max() > 0
    assert (outs[1][0] - outs[1][1]).abs().max() > 1e-5


def test_label_dropout_frequency_and_null_row():
    torch.manual_seed(0)
    cond = Conditioning(16, VOCAB, label_dropout={"perturbation": 0.3, "cell_type": 0.0}).train()
    emb = cond.labels["perturbation"]
    y = torch.randint(0, 5, (20000,))
    drop = torch.rand(20000) < cond.label_dropout["perturbation"]
    e, is_null = emb(y, drop)
    assert abs(is_null.float().mean().item() - 0.3) < 0.015
    assert torch.equal(e[is_null], emb.null_embedding().expand(int(is_null.sum()), -1))
    # Through the whole conditioning: the frequency of the null row in training mode.
    y = {"perturbation": torch.randint(0, 5, (20000,))}
    c_train = cond(torch.zeros(20000), y, 20000)
    c_null = cond.eval()(torch.zeros(20000), cond.null_labels(y), 20000)
    assert abs(torch.isclose(c_train, c_null, atol=1e-6).all(1).float().mean().item() - 0.3) < 0.015
    # Dropping everything (p = 1) equals the null row, for single ids and combinations alike.
    full = Conditioning(16, VOCAB, label_dropout=1.0).train()
    for ids in (torch.tensor([0, 4, 2]), torch.tensor([[0, 1], [3, -1], [2, 4]])):
        c = full(torch.zeros(3), {"perturbation": ids, "cell_type": torch.tensor([0, 1, 2])}, 3)
        ref = full.eval()(torch.zeros(3), {}, 3)
        full.train()
        torch.testing.assert_close(c, ref)


def test_combination_is_sum_of_components():
    torch.manual_seed(0)
    fixed = torch.randn(5, 7)
    for kwargs in ({}, {"fixed_embeddings": {"perturbation": fixed}},
                   {"fixed_embeddings": {"perturbation": fixed}, "learned_tables": False}):
        emb = Conditioning(16, VOCAB, **kwargs).labels["perturbation"]
        combo, _ = emb(torch.tensor([[1, 3, -1], [2, -1, -1], [-1, -1, -1], [5, 5, 5]]))
        single, _ = emb(torch.tensor([1, 3, 2]))
        torch.testing.assert_close(combo[0], single[0] + single[1])
        torch.testing.assert_close(combo[1], single[2])
        torch.testing.assert_close(combo[2], emb.null_embedding())  # no component: null
        torch.testing.assert_close(combo[3], emb.null_embedding())  # all components null
    ids = multihot_to_ids(torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]), 2)
    assert ids.tolist() == [[1, 3], [4, -1], [-1, -1]]
    with pytest.raises(ValueError, match="out of range"):
        emb(torch.tensor([6]))


def test_dose_follows_the_perturbation():
    cond = Conditioning(16, VOCAB, dose=True, dose_scale=0.1, dose_log=True).eval()
    y = {"perturbation": torch.tensor([1, 1]), "dose": torch.tensor([1.0, 10.0])}
    c = cond(torch.zeros(2), y, 2)
    assert not torch.allclose(c[0], c[1])
    cn = cond(torch.zeros(2), cond.null_labels(y), 2)  # null perturbation: dose ignored
    torch.testing.assert_close(cn[0], cn[1])
    torch.testing.assert_close(cn, cond(torch.zeros(2), {}, 2))


def test_guidance_with_combinations_and_dose():
    m = build_expression_model("unet", 37, VOCAB, dose=True, **SMALL_1D)
    _randomize(m)
    m.eval()
    x, t = torch.randn(3, 37), torch.rand(3)
    y = {"perturbation": torch.tensor([[0, 1], [2, -1], [3, 4]]), "dose": torch.ones(3)}
    v2 = guided_velocity(m, x, t, y, 2.0)
    v_c, v_n = m(x, t, y), m(x, t, m.null_labels(y))
    torch.testing.assert_close(v2, v_n + 2 * (v_c - v_n), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "mlp", "unet2d"])
def test_gradient_reaches_every_parameter(kind):
    torch.manual_seed(0)
    cond = {"label_dropout": 0.5, "dose": True, "fixed_embeddings": {"perturbation": torch.randn(5, 7)}}
    vocab = {"perturbation": 5, "cell_type": 3, "dataset": 2}
    if kind == "unet2d":
        m, x = build_unet2d(32, 3, vocab, **SMALL_2D, **cond), torch.randn(16, 3, 24, 24)
    elif kind == "unet":
        m, x = build_expression_model("unet", 37, vocab, **SMALL_1D, attention_levels=(2,), **cond), torch.randn(16, 37)
    else:
        m, x = build_expression_model("mlp", 37, vocab, width=32, **cond), torch.randn(16, 37)
    _randomize(m)
    B = x.shape[0]
    y = {"perturbation": torch.randint(-1, 5, (B, 2)), "cell_type": torch.randint(0, 3, (B,)),
         "dataset": torch.randint(0, 2, (B,)), "dose": torch.rand(B)}
    y["perturbation"][:, 0] = torch.randint(0, 5, (B,))
    m.train()(x, torch.rand(B), y).pow(2).mean().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, dead


def test_unet_learns_conditional_toy_flow():
    """Two perturbations with different gene means: conditional flow matching, loss falls > 3x in 200
    steps, and the model uses the label (swapping labels raises the loss)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        G, B = 37, 32
        mu = torch.randn(2, G) * 1.5
        m = build_expression_model("unet", G, {"perturbation": 2}, label_dropout=0.0,
                                   base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)
        opt = torch.optim.Adam(m.parameters(), 3e-3)

        def batch():
            y = torch.randint(0, 2, (B,))
            x1, x0, t = mu[y] + 0.1 * torch.randn(B, G), torch.randn(B, G), torch.rand(B)
            return t[:, None] * x1 + (1 - t[:, None]) * x0, t, y, x1 - x0

        losses = []
        for _ in range(200):
            xt, t, y, u = batch()
            loss = ((m(xt, t, {"perturbation": y}) - u) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        first, last = statistics.mean(losses[:10]), statistics.mean(losses[-20:])
        assert first / last > 3, (first, last)
        with torch.no_grad():
            xt, t, y, u = batch()
            right = ((m(xt, t, {"perturbation": y}) - u) ** 2).mean()
            wrong = ((m(xt, t, {"perturbation": 1 - y}) - u) ** 2).mean()
        assert wrong > 2 * right, (right, wrong)
    finally:
        torch.set_num_threads(threads)


def test_compile_fullgraph_aot_eager():
    torch.manual_seed(0)
    m = build_expression_model("unet", 37, VOCAB, **SMALL_1D)
    _randomize(m)
    m.eval()
    x, t = torch.randn(2, 37), torch.rand(2)
    y = {"perturbation": torch.tensor([[1, 2], [3, -1]]), "cell_type": torch.tensor([0, 2])}
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, y), m(x, t, y))


def test_builder_errors():
    with pytest.raises(ValueError, match="kind"):
        build_expression_model("transformer", 10, VOCAB)
    with pytest.raises(ValueError, match="num_genes"):
        UNet(1, VOCAB)
    with pytest.raises(ValueError, match="rows"):
        build_expression_model("mlp", 10, VOCAB, fixed_embeddings={"perturbation": torch.randn(4, 3)})
