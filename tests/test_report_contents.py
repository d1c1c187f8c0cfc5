"""The evaluation report's contents: loss curve, control row, channel legend, per-perturbation and effects tables,
provenance, human number formats and the HTML page (a tiny run trained for 50 steps, evaluated from its export)."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from phenoflow.config import resolve
from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic
from phenoflow.eval import effects as fx
from phenoflow.eval.evaluate import evaluate
from phenoflow.eval.grids import GAP, PAD, grid_rows, save_grid
from phenoflow.eval.project import DEFAULT_WEIGHTS
from phenoflow.eval.report import write_report
from phenoflow.train.trainer import train

P = 5  # perturbations besides the control: one of each documented kind
TINY = ["data.image_size=16", "data.train_images=256", "data.val_images=64", "data.samples_per_shard=128",
        f"data.num_perturbations={P}", "data.num_experiments=2", "model.size=tiny", "model.patch_size=4",
        "model.depth=2", "model.hidden_size=32", "train.batch_size=32", "train.lr=1e-3",
        "train.log_every_samples=320", "train.ckpt_every_samples=100000", "train.total_samples=1600",
        "eval.solver=euler", "eval.steps=3", "eval.guidance=[1,2]", "eval.batch_size=64", "train.device=cpu"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = resolve("demo", TINY + [f"run.out_dir={out}", "run.name=tiny"])
    train(cfg)
    return evaluate(cfg, cfg.run_dir, progress=False)


def _md(report):
    return (report / "metrics.md").read_text()


def _table(md, first_header):
    """The rows (lists of cells) of the first Markdown table whose header starts with first_header."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + first_header + " |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_loss_curve(report):
    js = json.loads((report / "metrics.json").read_text())
    assert js["loss_plot"] == "loss.png" and Image.open(report / "loss.png").size[0] > 100
    assert "## Training loss" in _md(report) and "![training loss](loss.png)" in _md(report)


def test_grid_has_a_control_row_first(report):
    # Tiles of 16 px are enlarged to 64; the header is 20 px plus 14 for the title; rows: control + P perturbations.
    im = np.asarray(Image.open(report / "grid_w1.png").convert("RGB"))
    assert im.shape[0] == 34 + (P + 1) * (64 + PAD)
    first_gen_tile = im[34:34 + 64, -(64 + PAD) * 4:]
    assert (first_gen_tile < 250).any()  # generated control images drawn, not blank tiles
    real, gen = torch.zeros(3, 6, 8, 8), torch.ones(3, 6, 8, 8)
    labels = torch.tensor([1, 2, 2])
    rows = grid_rows(real, labels, gen, labels, ["control", "a", "b"], control=(real[:2] - 1, gen[:1]))
    assert list(rows) == ["control", "a", "b"] and rows["control"][0].shape[0] == 2
    assert list(grid_rows(real, labels, gen, labels, ["control", "a", "b"])) == ["a", "b"]
    png = save_grid(rows, report / "g.png", k=2)
    assert Image.open(png).size[1] == 20 + 3 * (64 + PAD) and GAP > 0


def test_channel_legend(report):
    md = _md(report)
    assert "Channel colours: 6 channels are projected to RGB with the CellFlux weights" in md
    rows = _table(md, "channel")
    assert [r[1] for r in rows] == ["DNA", "ER", "actin", "RNA", "mito", "golgi_membrane"]
    assert [r[2] for r in rows] == ["(" + ", ".join(f"{x:g}" for x in w) + ")" for w in DEFAULT_WEIGHTS]
    assert rows[0][3] == "#0000ff" and rows[3][3] == "#008080"
    assert Image.open(report / "channels.png").size[1] >= 6 * 16


def test_per_perturbation_table(report):
    md = _md(report)
    assert "## Per perturbation" in md
    rows = _table(md, "perturbation | n real | n generated")
    names = [r[0] for r in rows]
    assert sorted(names) == ["control"] + [f"gene_{k:02d}" for k in range(1, P + 1)]
    js = json.loads((report / "metrics.json").read_text())
    assert sum(int(r[1]) for r in rows if r[0] != "control") == js["num_real"]
    assert all(re.fullmatch(r"[\d.,]+ / [\d.,]+", r[3]) for r in rows)  # nucleus area real / generated


def test_effects_table_has_a_row_per_documented_effect(report):
    md = _md(report)
    assert "## Documented effects: real against generated" in md and "within 50% of ln(real)" in md
    rows = _table(md, "perturbation | documented effect")
    assert [r[0] for r in rows] == [f"gene_{k:02d}" for k in range(1, P + 1)]
    assert [r[1] for r in rows] == ["nuclear radius x1.35", "nuclear aspect ratio x1.8", "cytoplasm radius x1.35",
                                    "ER (ch1) intensity x1.6", "texture amplitude x2"]
    assert all(re.fullmatch(r"x\d+\.\d\d", r[3]) and re.fullmatch(r"x\d+\.\d\d", r[4]) for r in rows)
    assert all(r[5] == "yes" or r[5].startswith(("no", "not measurable")) for r in rows)
    assert re.search(r"### w = 1: \d of 5 reproduced", md)


def test_effect_measurement_and_verdict():
    spec = SyntheticSpec(image_size=32, channels=6, num_perturbations=8, num_experiments=2)
    imgs, meta = generate_synthetic(spec, 9 * 40, "val")
    x = torch.from_numpy(np.asarray(imgs))
    x = x.permute(0, 3, 1, 2) if x.shape[-1] == 6 else x
    names = [m["perturbation"] for m in meta]
    manifest = {"source": {"kind": "synthetic", "spec": spec.to_dict()}}
    effects = fx.documented_effects(manifest)
    assert [e["kind"] for e in effects][:5] == list(fx.FEATURE_OF)
    rows = fx.measure(effects, x, names, x, names)  # generated = real: every measurable effect reproduced
    by = {r["perturbation"]: r for r in rows}
    for p in ("gene_01", "gene_02", "gene_03", "gene_04", "gene_06", "gene_07", "gene_08"):  # up, then down
        r = by[p]
        assert (r["real_ratio"] - 1) * r["direction"] > 0.1, r  # the real images show the documented change
        assert r["reproduced"] == "yes"
    assert fx.documented_effects({"source": {"kind": "cellflux"}}) is None
    assert fx.verdict(1, 1.5, 1.4) == "yes" and fx.verdict(1, 1.5, 0.9) == "no (wrong direction)"
    assert fx.verdict(1, 1.5, 1.05) == "no (too weak)" and fx.verdict(-1, 0.5, 0.1) == "no (too strong)"
    assert fx.verdict(1, 0.98, 1.3).startswith("not measurable")


def test_provenance_line(report):
    md = _md(report)
    line = next(line for line in md.splitlines() if line.startswith("Model: "))
    assert "EMA width 0.05" in line and "ema-0.0500.safetensors" in line
    assert "after 1,600 samples seen (50 steps of 32) of train.total_samples 1,600" in line
    js = json.loads((report / "metrics.json").read_text())
    assert js["provenance"]["samples_seen"] == 1600 and js["provenance"]["from_run"] is True


def test_html_page_references_existing_files(report):
    page = (report / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") >= 5
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert {"loss.png", "guidance.png", "channels.png", "grid_w1.png", "grid_w2.png"} <= set(srcs)
    for s in srcs:
        assert not s.startswith("/") and (report / s).is_file(), s
    for h in re.findall(r"^## (.+)$", _md(report), flags=re.MULTILINE):
        assert f"<h2>{h}</h2>" in page
    assert "<th>documented effect</th>" in page and "http" not in page  # self-contained


def test_no_dict_reprs_and_integer_nfe(report, tmp_path):
    md = _md(report)
    assert "{" not in md and "}" not in md
    assert "Sampler: euler, 3 steps; guidance on perturbation." in md
    assert [r[1] for r in _table(md, "w | NFE")] == ["3", "3"]
    results = {"run_dir": "r", "split": "val", "num_real": 10,
               "solver": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "steps": 0, "guidance_groups": []},
               "features": {"morphology": {"dim": 65}}, "features_skipped": {},
               "sweep": [{"w": 1.5, "nfe": 37.6, "metrics": {"FD_morph": 12345.6, "KD_morph": 0.5}}]}
    md2 = (write_report(tmp_path, results) / "metrics.md").read_text()
    assert "| 1.500 | 38 | 12,346 | 0.500 |" in md2 and "Sampler: dopri5, rtol 1e-05, atol 1e-05." in md2
    assert "{" not in md2 and "Model: not recorded." in md2


def test_report_controls_leave_scored_images_unchanged(tmp_path):
    """The report's control rows ride in the sweep's last batch (fixed-step solver): same scored images, same NFE."""
    from phenoflow.eval.generate import generate
    from phenoflow.eval.report_extras import MAX_CONTROLS, ReportExtras
    from phenoflow.model.mit import build_model

    cfg = resolve("demo", TINY)
    torch.manual_seed(0)
    model = build_model(cfg, {"perturbation": P + 1, "experiment": 2, "cell_type": 1})
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # a non-zero velocity field

    def batch(n, pert, start):
        return {"image": torch.randint(0, 255, (n, 6, 16, 16), dtype=torch.uint8),
                "perturbation": torch.full((n,), pert), "experiment": torch.arange(n) % 2,
                "cell_type": torch.zeros(n, dtype=torch.long), "dose": torch.zeros(n),
                "is_control": torch.full((n,), pert == 0), "key": [f"k{start + i:04d}" for i in range(n)]}

    scored = [batch(5, 1, 0), batch(3, 2, 10)]
    read = [batch(6, 0, 100), batch(6, 0, 200)]
    extras = ReportExtras(cfg, tmp_path, {}, read, ["control"] + [f"gene_{k:02d}" for k in range(1, P + 1)], False)
    merged = extras.with_controls(scored)
    assert [len(b["key"]) for b in merged] == [5, 3 + MAX_CONTROLS]
    gen, labels, nfe = generate(model, merged, cfg.eval, 2.0)
    gen, labels, ctrl = extras.split(gen, labels)
    ref, ref_labels, ref_nfe = generate(model, scored, cfg.eval, 2.0)
    assert torch.equal(gen, ref) and labels["key"] == ref_labels["key"] and nfe == ref_nfe
    assert ctrl.shape == (MAX_CONTROLS, 6, 16, 16)
    row = extras.add(model, 2.0, torch.cat([b["image"] for b in scored]), torch.tensor([1] * 5 + [2] * 3), gen,
                     labels, torch.device("cpu"), 0, "generate", None, ctrl)
    assert row[0].shape[0] == 12 and torch.equal(row[1], ctrl)  # every real control read; MAX_CONTROLS generated
    ctrl_means = extras.results()["report_per_w"][0]["morphology_means"]["control"]
    assert ctrl_means["n_real"] == 12 and ctrl_means["n_generated"] == MAX_CONTROLS
