"""A run folder is one self-contained thing (issue 13 items 1-4, 8, 10, 15), through the `phenoflow` command line:
evaluate/sample --run-dir take the run's saved config and vocabularies (conflicting overrides refused before any
work, data labels compared by name), train --run-dir resumes with the saved config (changes listed, refused ones
leave config.yaml untouched), finetuning takes the source run's config, exports honour the umask, help texts."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY = ["data.image_size=16", "data.channels=3", "data.train_images=64", "data.val_images=24",
        "data.samples_per_shard=64", "data.num_perturbations=3", "data.num_experiments=2", "model.size=tiny",
        "model.patch_size=4", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "train.batch_size=16",
        "train.total_samples=32", "train.log_every_samples=16", "train.ckpt_every_samples=32", "train.device=cpu",
        "train.precision=fp32", "eval.solver=euler", "eval.steps=2", "eval.guidance=[1]", "eval.batch_size=16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def pf(*args, cwd=None, umask=None) -> subprocess.CompletedProcess:
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "phenoflow", *map(str, args)], check=False, capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300, preexec_fn=pre)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 3-channel 16x16 run trained by `python -m phenoflow train` under umask 002."""
    out = tmp_path_factory.mktemp("runs")
    ok(pf("train", "--preset", "demo", *TINY, f"run.out_dir={out}", "run.name=r3", umask=0o002))
    return out / "r3"


def shards(folder: Path, channels=3, drop=(), extra=0) -> Path:
    """Synthetic shards like the run's data: another channel count, perturbations left out, or more of them."""
    from phenoflow.data.shards import write_shards
    from phenoflow.data.synthetic import SyntheticSpec, generate_synthetic

    spec = SyntheticSpec(image_size=16, channels=channels, num_perturbations=3 + extra, num_experiments=2,
                         num_cell_types=1)
    imgs, meta = [], []
    for split, n in (("train", 8), ("val", 40)):
        i, m = generate_synthetic(spec, n, split)
        keep = [j for j, r in enumerate(m) if r["perturbation"] not in drop]
        imgs.append(i[keep])
        meta += [m[j] for j in keep]
    write_shards(np.concatenate(imgs), meta, folder, samples_per_shard=64)
    return folder


def test_exports_honour_the_umask(run):
    files = [p for p in (run / "export").iterdir()] + [run / "checkpoints" / "latest.pt"]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert any(n.endswith(".safetensors") for n in modes) and set(modes.values()) == {0o664}, modes


def test_evaluate_and_sample_take_the_runs_config(run, tmp_path):
    """No --preset: the run's 3-channel config and its data, not the demo preset's 6-channel synthetic data."""
    r = ok(pf("evaluate", "--run-dir", run, "--report-dir", tmp_path / "rep"))
    js = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert js["num_real"] > 0 and "metrics.md" in r.stdout
    page = tmp_path / "rep" / "index.html"  # the CLI points to the page it wrote
    assert f"(as a web page: {page})" in r.stdout and page.is_file()
    assert json.loads((run / "data" / "manifest.json").read_text())["image_shape"] == [16, 16, 3]
    from phenoflow.eval.generate import load_samples

    imgs, labels, _ = load_samples(tmp_path / "rep" / "samples" / "w1.npz")
    vocab = json.loads((run / "vocab.json").read_text())["perturbation"]
    assert imgs.shape[1:] == (3, 16, 16)
    assert labels["perturbation_name"] == [vocab[i] for i in labels["perturbation"].tolist()]  # names stored


def test_conflicts_with_the_checkpoint_are_refused_before_work(run, tmp_path):
    r = pf("evaluate", "--run-dir", run, "--report-dir", tmp_path / "rep", "data.channels=6", "model.hidden_size=64")
    refused(r, "data.channels=6 (trained with 3)", "model.hidden_size=64 (trained with 32)")
    assert not (tmp_path / "rep").exists()
    refused(pf("sample", "--run-dir", tmp_path / "nothing"), "no such run folder")
    refused(pf("evaluate", "--run-dir", run, "--data-dir", shards(tmp_path / "six", channels=6)),
            "6-channel images", "takes 16x16 3-channel")


def test_data_labels_are_compared_by_name(run, tmp_path):
    """Unknown names are refused naming them; a subset in another numbering is mapped to the model's ids by name."""
    refused(pf("evaluate", "--run-dir", run, "--data-dir", shards(tmp_path / "more", extra=2),
               "--report-dir", tmp_path / "x"), "gene_04", "gene_05", "not among the model's 4 names")
    assert not (tmp_path / "x").exists()
    data = shards(tmp_path / "fewer", drop=("gene_01",))  # data ids: control 0, gene_02 1, gene_03 2
    ok(pf("sample", "--run-dir", run, "--data-dir", data, "--out", tmp_path / "s"))
    from phenoflow.eval.generate import load_samples

    _, labels, _ = load_samples(tmp_path / "s" / "w1.npz")
    ids = dict(zip(labels["perturbation_name"], labels["perturbation"].tolist()))
    assert ids and set(ids) <= {"gene_02", "gene_03"} and all(ids[n] == int(n[-1]) for n in ids), ids


def test_sample_chosen_labels_and_count(run, tmp_path):
    r = ok(pf("sample", "--run-dir", run, "--perturbation", "gene_02", "--experiment", "exp_02", "-n", 5,
              "--out", tmp_path, "eval.guidance=[2]"))
    assert "gene_02_w2.npz" in r.stdout
    with np.load(tmp_path / "gene_02_w2.npz") as z:
        assert z["images"].shape == (5, 3, 16, 16) and z["images"].dtype == np.uint8
        assert list(z["perturbation_name"]) == ["gene_02"] * 5 and list(z["experiment_name"]) == ["exp_02"] * 5
    assert (tmp_path / "gene_02_w2.png").stat().st_size > 0
    refused(pf("sample", "--run-dir", run, "--perturbation", "gene2", "-n", 2), "unknown perturbation 'gene2'",
            "gene_02")


def test_train_run_dir_resumes_with_the_saved_config(run, tmp_path):
    saved = (run / "config.yaml").read_bytes()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    r = pf("train", "--run-dir", run, "model.depth=4", "train.lr=0.01", "train.total_samples=64")
    refused(r, "model.depth: 2 -> 4", "train.lr: 0.001 -> 0.01", "nothing was written")
    assert "train.total_samples: 32" not in r.stderr  # allowed changes are not among the refused
    assert (run / "config.yaml").read_bytes() == saved and sorted(p.relative_to(run) for p in run.rglob("*")) == before
    refused(pf("train", "--run-dir", tmp_path / "empty"), "no run to resume", "--preset")
    r = ok(pf("train", "--run-dir", run, "train.total_samples=48"))  # no preset, no other override
    assert "changed train.total_samples: 32 -> 48" in r.stderr
    start = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
             if '"start"' in line][-1]
    assert start["resumed"] and start["samples_seen"] == 32
    assert "total_samples: 48" in (run / "config.yaml").read_text() and "channels: 3" in (run / "config.yaml").read_text()


def test_finetune_takes_the_source_runs_config(run):
    r = ok(pf("train", f"train.init_from={run}", "run.name=ft", "train.total_samples=16", "--dry-run"))
    assert "channels: 3" in r.stdout and "image_size: 16" in r.stdout and "hidden_size: 32" in r.stdout
    refused(pf("train", f"train.init_from={run}", f"run.out_dir={run.parent}", "--dry-run"), "its own run.name")


def test_python_m_help_and_no_abbreviations(run):
    r = ok(pf("sample", "--help"))
    _usage, desc = r.stdout.split("\n\n")[:2]
    assert desc.startswith("Generate from a trained run") and "argparse" not in r.stdout
    assert "(default: 0)" in r.stdout  # --seed
    r = ok(pf("plan", "--help"))
    assert "number of nodes in the cluster (default: 4)" in " ".join(r.stdout.split())
    assert "GPUs in each node" in r.stdout
    refused(pf("plan", "--nodes", "0"), "--nodes=0 must be > 0")  # on stderr, exit 2, no traceback
    r = ok(pf("evaluate", "--run-dir", run, "--split", "train", "--dry-run"))
    assert "split: train" in r.stdout
    r = pf("evaluate", "--run-dir", run, "--spl", "train", "--dry-run")
    assert r.returncode == 2 and "unrecognized arguments: --spl" in r.stderr
