"""evaluate() end to end on synthetic shards with a tiny model: report files, sweep rows, cache, export loading."""
import json
import re

import numpy as np
import pytest
import torch

from phenoflow.config import resolve, to_dict
from phenoflow.data.shards import write_shards
from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic
from phenoflow.eval.evaluate import evaluate, load_export, sample
from phenoflow.eval.generate import load_samples
from phenoflow.model.mit import build_model
from phenoflow.train.checkpoint import ema_filename, save_safetensors, write_json

VOCAB = {"perturbation": 5, "experiment": 2, "cell_type": 1}
SPEC = SyntheticSpec(image_size=16, channels=6, num_perturbations=4, num_experiments=2, num_cell_types=1)
N_VAL = 22
N_VAL_CONTROLS = sum(m["is_control"] for m in generate_synthetic(SPEC, N_VAL, "val")[1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    imgs, meta = [], []
    for split, n in (("train", 10), ("val", N_VAL)):
        i, m = generate_synthetic(SPEC, n, split)
        imgs.append(i)
        meta += m
    out = tmp_path_factory.mktemp("shards")
    write_shards(np.concatenate(imgs), meta, out, samples_per_shard=8)
    return out


def _cfg():
    return resolve("demo", ["data.image_size=16", "model.depth=2", "model.hidden_size=32", "model.num_heads=2",
                            "eval.solver=euler", "eval.steps=2", "eval.batch_size=8", "eval.guidance=[1,2]",
                            "train.device=cpu"])


def test_evaluate_writes_report_samples_and_cache(shards, tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    report = evaluate(cfg, tmp_path / "run", model=model, data_dir=shards, progress=False)
    js = json.loads((report / "metrics.json").read_text())
    n = N_VAL - N_VAL_CONTROLS  # control images are not scored by default (MiT RxRx1 protocol)
    assert 0 < N_VAL_CONTROLS < N_VAL and js["include_controls"] is False
    assert js["num_real"] == n and [r["w"] for r in js["sweep"]] == [1.0, 2.0]
    assert all(r["num_generated"] == n for r in js["sweep"])
    for row in js["sweep"]:
        assert row["nfe"] == 2 and row["metrics"]["FD_morph"] > 0 and "KD_morph" in row["metrics"]
    assert js["features"]["morphology"]["dim"] == 65
    md = (report / "metrics.md").read_text()
    assert "| w | NFE | FD_morph | KD_morph (x1000) |" in md and "z-scored with the real set" in md
    assert f"{n} real images (control images excluded" in md and "min(100, n) images" in md
    for f in ("guidance.png", "grid_w1.png", "grid_w2.png"):
        assert (report / f).stat().st_size > 0
    imgs, labels, meta = load_samples(report / "samples" / "w2.npz")
    assert imgs.shape == (n, 6, 16, 16) and len(set(labels["key"])) == n and meta["w"] == 2.0
    assert not labels["is_control"].any()
    assert [p.name for p in (report / "samples").iterdir()] == sorted(["w1.npz", "w2.npz"])  # no temp files
    cache = list((tmp_path / "run" / "eval_cache").glob("real_morphology_*.safetensors"))
    assert [p.name for p in cache[0].parent.iterdir()] == [cache[0].name]  # no temp files
    # A rerun reads the cached real features and reproduces the metrics exactly.
    cfg.eval.per_perturbation = True
    report2 = evaluate(cfg, tmp_path / "run", model=model, data_dir=shards, report_dir=tmp_path / "r2",
                       progress=False)
    js2 = json.loads((report2 / "metrics.json").read_text())
    assert js2["sweep"][0]["metrics"] == js["sweep"][0]["metrics"]
    per = js2["sweep"][1]["per_perturbation"]
    assert set(per) == {"gene_01", "gene_02", "gene_03", "gene_04"}
    assert sum(v["n_real"] for v in per.values()) == n and all(v["FD_morph"] > 0 for v in per.values())
    assert "## Per perturbation" in (report2 / "metrics.md").read_text()


def test_include_controls_generates_and_scores_every_image(shards, tmp_path):
    cfg = _cfg()
    cfg.eval.guidance, cfg.eval.steps = [1.0], 1
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    out = sample(cfg, tmp_path / "run", model=model, out_dir=tmp_path / "s0", data_dir=shards, progress=False)
    imgs, labels, _ = load_samples(out / "w1.npz")
    assert imgs.shape[0] == N_VAL - N_VAL_CONTROLS and not labels["is_control"].any()
    cfg.eval.include_controls = True
    out = sample(cfg, tmp_path / "run", model=model, out_dir=tmp_path / "s1", data_dir=shards, progress=False)
    imgs, labels, _ = load_samples(out / "w1.npz")
    assert imgs.shape[0] == N_VAL and int(labels["is_control"].sum()) == N_VAL_CONTROLS
    report = evaluate(cfg, tmp_path / "run", model=model, data_dir=shards, progress=False)
    js = json.loads((report / "metrics.json").read_text())
    assert js["include_controls"] is True and js["num_real"] == N_VAL and js["sweep"][0]["num_generated"] == N_VAL
    assert load_samples(report / "samples" / "w1.npz")[0].shape[0] == N_VAL
    assert f"{N_VAL} real images (control images included" in (report / "metrics.md").read_text()
    # the flag is part of the real-feature cache key: a default run next to it gets its own cache entry
    cfg.eval.include_controls = False
    js = json.loads((evaluate(cfg, tmp_path / "run", model=model, data_dir=shards, report_dir=tmp_path / "r0",
                              progress=False) / "metrics.json").read_text())
    assert js["num_real"] == N_VAL - N_VAL_CONTROLS
    assert len(list((tmp_path / "run" / "eval_cache").glob("real_morphology_*.safetensors"))) == 2


def test_evaluate_from_export_and_missing_weights(shards, tmp_path):
    cfg = _cfg()
    cfg.eval.max_images, cfg.eval.guidance = 10, [1.0]
    model = build_model(cfg, VOCAB)
    export = tmp_path / "run" / "export"
    with pytest.raises(FileNotFoundError, match="model.json does not exist"):
        load_export(tmp_path / "run")
    write_json({"config": to_dict(cfg), "vocab_sizes": VOCAB, "samples_seen": 0}, export / "model.json")
    with pytest.raises(FileNotFoundError, match=re.escape(ema_filename(cfg.eval.ema_std)) + " do not exist"):
        load_export(tmp_path / "run")
    save_safetensors(model.state_dict(), export / ema_filename(cfg.eval.ema_std))
    loaded, _, sizes = load_export(tmp_path / "run")
    assert sizes == VOCAB
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    report = evaluate(cfg, tmp_path / "run", data_dir=shards, progress=False)
    assert json.loads((report / "metrics.json").read_text())["num_real"] == 10
    bad = {k: v for k, v in model.state_dict().items() if "final_layer" not in k}
    save_safetensors(bad, export / ema_filename(cfg.eval.ema_std))
    with pytest.raises(ValueError, match="missing"):
        load_export(tmp_path / "run")


def test_cli_subcommands(shards, tmp_path, capsys):
    import argparse

    from phenoflow.eval.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    cfg = _cfg()
    cfg.eval.max_images = 8
    model = build_model(cfg, VOCAB)
    export = tmp_path / "run" / "export"
    write_json({"config": to_dict(cfg), "vocab_sizes": VOCAB}, export / "model.json")
    save_safetensors(model.state_dict(), export / ema_filename(cfg.eval.ema_std))
    common = ["--preset", "demo", "--run-dir", str(tmp_path / "run"), "--data-dir", str(shards),
              "data.image_size=16", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "eval.solver=euler",
              "eval.steps=1", "eval.max_images=8", "eval.guidance=[1.5]", "train.device=cpu"]
    args = parser.parse_args(["sample", "--out", str(tmp_path / "s")] + common)
    assert args.func(args) == 0 and (tmp_path / "s" / "w1.5.npz").is_file()
    args = parser.parse_args(["evaluate", "--mode", "counterfactual"] + common)
    assert args.func(args) == 0
    js = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert js["mode"] == "counterfactual" and js["num_real"] == 8 and js["sweep"][0]["nfe"] == 2
    args = parser.parse_args(["evaluate", "--dry-run"] + common)
    assert args.func(args) == 0 and "guidance" in capsys.readouterr().out


def test_evaluate_with_inception_features(shards, tmp_path):
    from phenoflow.eval.inception import FIDInceptionV3
    from phenoflow.eval.weights import save_state_dict

    torch.manual_seed(0)
    weights = save_state_dict(FIDInceptionV3(), tmp_path / "inception.safetensors")
    cfg = _cfg()
    cfg.eval.max_images, cfg.eval.guidance = 2, [1.0]  # 2 + 2 Inception forwards at 299 px
    cfg.eval.features = ["inception", "dinov2", "morphology"]
    cfg.eval.inception_weights = str(weights)
    report = evaluate(cfg, tmp_path / "run", model=build_model(cfg, VOCAB), data_dir=shards, progress=False)
    js = json.loads((report / "metrics.json").read_text())
    assert js["features"]["inception"]["dim"] == 2048 and "dinov2" in js["features_skipped"]
    m = js["sweep"][0]["metrics"]
    assert m["FID"] >= 0 and "KID" in m and "FD_morph" in m
    md = (report / "metrics.md").read_text()
    assert "| w | NFE | FID | KID (x1000) | FD_morph | KD_morph (x1000) |" in md
    assert "dinov2: not computed (eval.dinov2_weights is not set" in md
