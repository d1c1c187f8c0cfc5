"""Feature networks (FID Inception-v3, DINOv2 ViT-L/14) with random weights: architecture, save/load, errors."""
import pytest
import torch

from phenoflow.config import resolve
from phenoflow.eval.dinov2 import VIT_L14, DINOv2, ViTShape, load_dinov2, num_params
from phenoflow.eval.features import FeatureUnavailable, extract
from phenoflow.eval.inception import (
    FIDInceptionV3,
    _avg_pool_tf,
    load_inception,
    resize_bilinear_tf1,
)
from phenoflow.eval.weights import WeightsError, save_state_dict


def test_tf1_bilinear_resize_against_direct_formula():
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7) ** 1.5
    y = resize_bilinear_tf1(x, 9)
    for i in range(9):  # TF1, align_corners=False: source coordinate = dst * in / out, clamped neighbour
        for j in range(9):
            sy, sx = i * 5 / 9, j * 7 / 9
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 6)
            fy, fx = sy - y0, sx - x0
            want = ((1 - fy) * ((1 - fx) * x[..., y0, x0] + fx * x[..., y0, x1])
                    + fy * ((1 - fx) * x[..., y1, x0] + fx * x[..., y1, x1]))
            torch.testing.assert_close(y[..., i, j], want, rtol=1e-5, atol=1e-3)
    sq = torch.rand(1, 3, 6, 6)
    torch.testing.assert_close(resize_bilinear_tf1(sq, 6), sq)  # same size: identity


def _randomize_bn(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    _randomize_bn(net)
    path = save_state_dict(net, tmp_path_factory.mktemp("w") / "inception.safetensors")
    return net, path


def test_inception_architecture_and_round_trip(inception_file, tmp_path):
    net, path = inception_file
    trunk = sum(p.numel() for k, p in net.named_parameters() if not k.startswith("fc."))
    assert trunk == 21_785_568  # torchvision Inception-v3 without aux head and fc: 27,161,264 - 3,326,696 - 2,049,000
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in net.state_dict() and net.fc.out_features == 1008
    rgb = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        want = net(rgb)
        assert want.shape == (1, 2048) and torch.isfinite(want).all() and want.std() > 0
        assert torch.equal(load_inception(path)(rgb), want)
    pth = save_state_dict(net, tmp_path / "inception.pth")  # torch format, read with weights_only=True
    loaded = load_inception(pth).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in net.state_dict().items())
    # TF-style average pool: padding is left out of the mean, so a constant map stays constant at the border.
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(_avg_pool_tf(ones), ones)
    assert net.Mixed_7b.pool == "avg" and net.Mixed_7c.pool == "max"


def test_weight_errors_name_the_problem(inception_file, tmp_path):
    net, _ = inception_file
    with pytest.raises(WeightsError, match="does not exist"):
        load_inception(tmp_path / "nope.safetensors")
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_6b.")}, tmp_path / "part.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(e\.g\. \['Mixed_6b"):
        load_inception(tmp_path / "part.pth")
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(1000, 2048)
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys.*extra\.weight.*shape mismatches.*fc\.weight"):
        load_inception(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_inception(tmp_path / "junk.pth")


SMALL = ViTShape(patch_size=14, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, pos_grid=4, input_size=56)


def test_dinov2_vit_l14_shape_and_keys():
    with torch.device("meta"):
        net = DINOv2(VIT_L14)
    assert sum(p.numel() for p in net.parameters()) == num_params(VIT_L14) == 304_368_640
    keys = set(net.state_dict())
    for k in ("cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.23.attn.qkv.weight",
              "blocks.0.ls1.gamma", "blocks.0.mlp.fc2.bias", "norm.weight"):
        assert k in keys
    assert net.pos_embed.shape == (1, 1 + 37 * 37, 1024)


def test_dinov2_small_round_trip_and_attention(tmp_path):
    torch.manual_seed(0)
    net = DINOv2(SMALL).eval()
    for blk in net.blocks:  # non-trivial layer scales
        blk.ls1.gamma.data.uniform_(0.5, 1.5)
        blk.ls2.gamma.data.uniform_(0.5, 1.5)
    assert sum(p.numel() for p in net.parameters()) == num_params(SMALL)
    rgb = torch.rand(3, 3, 20, 24)
    with torch.no_grad():
        want = net(rgb)
        assert want.shape == (3, 32) and torch.isfinite(want).all()
        path = save_state_dict(net, tmp_path / "dino.safetensors")
        assert torch.equal(load_dinov2(path, SMALL)(rgb), want)
        # At the native grid the position embedding is used as is; on another grid it is resampled to it.
        assert net.position_embedding(4, 4) is net.pos_embed
        assert net.position_embedding(2, 3).shape == (1, 7, 32)
        # Attention equals the explicit softmax(q k^T / sqrt(d)) v.
        attn, x = net.blocks[0].attn, torch.randn(2, 5, 32)
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
        ref = ((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
        torch.testing.assert_close(attn(x), attn.proj(ref))
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_dinov2(path, ViTShape(embed_dim=32, depth=2, num_heads=4, pos_grid=5, input_size=56))


def test_extract_needs_configured_local_weights(tmp_path):
    # (extract through the config with real network weights runs in test_eval_evaluate's inception test)
    cfg = resolve("demo", [f"eval.inception_weights={tmp_path / 'absent.pth'}"])
    imgs = torch.randint(0, 256, (2, 6, 16, 16), dtype=torch.uint8)
    with pytest.raises(WeightsError, match="absent.pth does not exist"):
        extract("inception", imgs, cfg.eval)
    with pytest.raises(FeatureUnavailable, match="eval.dinov2_weights is not set"):
        extract("dinov2", imgs, cfg.eval)
    assert extract("morphology", imgs, cfg.eval).shape == (2, 65)


@pytest.mark.gpu
def test_networks_on_gpu_match_cpu(inception_file):
    net, _ = inception_file
    rgb = torch.rand(2, 3, 40, 40)

    def rel(a, b):  # TF32 convolutions / matmuls on the GPU: compare in relative norm
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        cpu = net(rgb)
        gpu = net.cuda()(rgb.cuda()).cpu()
        net.cpu()
        assert rel(gpu, cpu) < 1e-2
        vit = DINOv2(SMALL).eval()
        assert rel(vit.cuda()(rgb.cuda()).cpu(), vit.cpu()(rgb)) < 1e-2
