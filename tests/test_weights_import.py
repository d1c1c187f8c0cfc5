"""`phenoflow weights import inception|dinov2 FILE` (issue 13, item 14): fake published-format files built from
randomly initialised networks with the published keys and shapes round-trip into the local format (same features),
and wrong files are refused naming the file: checksum mismatch, pickled code (never executed), bad keys or shapes.
Nothing is downloaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phenoflow.eval.dinov2 import VIT_L14, DINOv2, ViTShape, load_dinov2
from phenoflow.eval.inception import FIDInceptionV3, load_inception
from phenoflow.eval.weights import WeightsError
from phenoflow.eval.weights_import import PUBLISHED, import_weights, sha256_file

SMALL_VIT = ViTShape(patch_size=14, embed_dim=32, depth=2, num_heads=2, pos_grid=4, input_size=56)


def _phenoflow(*args: str, weights_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PHENOFLOW_WEIGHTS_DIR": str(weights_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "phenoflow", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 + (0.9 if name.endswith("running_var") else -0.1))
    return net.eval()


def _published_inception(tmp_path: Path) -> tuple[FIDInceptionV3, Path]:
    """A file in the published format: a plain torch.save'd state dict, torchvision key names, no
    num_batches_tracked (the 2019 port predates it)."""
    net = _randomised(FIDInceptionV3())
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / PUBLISHED["inception"].file_name
    torch.save(state, path)
    return net, path


def _images(n: int = 2, size: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_inception_import_round_trip_and_checksum(tmp_path, monkeypatch, capsys):
    net, src = _published_inception(tmp_path)
    wdir = tmp_path / "weights"
    # The fake is not the published file: its checksum is refused, naming the file and both digests.
    r = _phenoflow("weights", "import", "inception", str(src), weights_dir=wdir)
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(src) in r.stderr and PUBLISHED["inception"].sha256 in r.stderr and "--sha256" in r.stderr
    assert "Traceback" not in r.stderr and not wdir.exists()
    # A copy whose digest the user gives: imported into the weights folder.
    digest = sha256_file(src)
    r = _phenoflow("weights", "import", "inception", str(src), "--sha256", digest, weights_dir=wdir)
    assert r.returncode == 0, r.stderr[-3000:]
    out = wdir / "inception-2015-12-05.safetensors"
    assert f"imported inception: {out}" in r.stdout
    info = json.loads((wdir / "inception-2015-12-05.json").read_text())
    assert info["source_sha256"] == digest and info["checked"].startswith("sha256 (given with --sha256)")
    x = _images()
    with torch.no_grad():
        assert torch.equal(load_inception(out)(x), net(x))
    # Evaluation finds the imported file when eval.inception_weights is empty.
    from phenoflow.config import resolve
    from phenoflow.eval.features import weights_path

    monkeypatch.setenv("PHENOFLOW_WEIGHTS_DIR", str(wdir))
    cfg = resolve("demo", [])
    assert weights_path("inception", cfg.eval) == str(out)
    # ... and extracts features with it, showing progress (plain lines when stderr is not a terminal).
    from phenoflow.eval.features import extract

    monkeypatch.setenv("PHENOFLOW_PROGRESS_S", "0")
    capsys.readouterr()
    u8 = (x * 255).round().to(torch.uint8)
    with torch.no_grad():
        feats = extract("inception", u8, cfg.eval, batch_size=1)
    err = capsys.readouterr().err
    assert feats.shape == (2, 2048) and torch.allclose(feats.float(), net(x), atol=1e-4)
    assert "[inception features] 0/2 images" in err and "[inception features] 2/2 images" in err, err
    # A second import refuses to replace it unless --overwrite.
    r = _phenoflow("weights", "import", "inception", str(src), "--sha256", digest, weights_dir=wdir)
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = tmp_path / "dinov2_vitl14_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 1024), "x": Payload()}, src)
    r = _phenoflow("weights", "import", "dinov2", str(src), weights_dir=tmp_path / "w")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"weights file {src} refused" in r.stderr and "nothing from it was executed" in r.stderr
    assert not marker.exists() and not (tmp_path / "w").exists()


def test_dinov2_vitl14_keys_and_shapes_checked_strictly(tmp_path):
    """The real ViT-L/14 architecture against a published-format file (stride-0 tensors: right shapes, a few
    bytes on disk). No checksum is published for it, so a wrong shape or key must be caught by the strict check."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DINOv2(VIT_L14).state_dict().items()}
    good = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}
    src = tmp_path / "dinov2_vitl14_pretrain.pth"
    # A 224-px position grid (16x16 + 1) where ViT-L/14 pretrain has 37x37 + 1: refused naming key and file.
    torch.save({**good, "pos_embed": torch.zeros(()).expand(1, 257, 1024)}, src)
    r = _phenoflow("weights", "import", "dinov2", str(src), weights_dir=tmp_path / "w")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{src} is not the DINOv2 ViT-L/14 checkpoint" in r.stderr
    assert "pos_embed: file (1, 257, 1024), DINOv2 ViT-L/14 (1, 1370, 1024)" in r.stderr
    assert not (tmp_path / "w").exists()
    # A checkpoint with register tokens (dinov2_vitl14_reg4) and without mask_token: unexpected + missing keys.
    bad = {k: v for k, v in good.items() if k != "mask_token"}
    torch.save({**bad, "register_tokens": torch.zeros(()).expand(1, 4, 1024)}, src)
    with pytest.raises(WeightsError, match=r"1 missing keys \(e.g. \['mask_token'\]\); 1 unexpected keys "
                                           r"\(e.g. \['register_tokens'\]\)") as e:
        import_weights("dinov2", src, tmp_path / "w")
    assert str(src) in str(e.value)
    # Integer tensors where the network has floats are refused too.
    torch.save({**good, "norm.weight": torch.zeros((), dtype=torch.int64).expand(1024)}, src)
    with pytest.raises(WeightsError, match="not floating point"):
        import_weights("dinov2", src, tmp_path / "w")


def test_dinov2_round_trip_and_training_checkpoint_prefixes(tmp_path):
    """The import path end to end on a small ViT (same keys as ViT-L/14, small shapes): the local file gives the
    same features; a DINOv2 training checkpoint ({"teacher": {"backbone.*": ...}}) is unwrapped."""
    net = _randomised(DINOv2(SMALL_VIT))
    src = tmp_path / "dinov2_small.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, src)
    s = import_weights("dinov2", src, tmp_path / "w", shape=SMALL_VIT)
    assert s["checked"].startswith("no checksum is published") and s["sha256"] == sha256_file(src)
    x = _images(size=56)
    with torch.no_grad():
        assert torch.equal(load_dinov2(s["out"], SMALL_VIT)(x), net(x))
    # A wrong expected digest is refused before the file is even unpickled.
    with pytest.raises(WeightsError, match=f"{src}: sha256 .* differs from --sha256"):
        import_weights("dinov2", src, tmp_path / "w2", shape=SMALL_VIT, expected_sha256="0" * 64)
    assert not (tmp_path / "w2").exists()
