"""Run a study: plan its units, train what is not finished, evaluate what is not evaluated, write the report.

Layout of study_dir (= out_dir/name):
    study.json                the spec as run (rewritten on every start)
    runs/<variant>-s<seed>/   ordinary run folders (train, resume, export as `phenoflow train` does)
    evals/<variant>-s<seed>/  the evaluation report of that run with the variant's mode and solver
                              (metrics.json, grids, samples) + study_eval.json (what was evaluated)
    status.json               per unit: done | failed (message) | unsupported (message)
    report.md, report.json    phenoflow.study.report

Every unit's state is on disk: a training unit is finished when its export's model.json records samples_seen >=
train.total_samples (skipped: no trainer is built, no log line written); otherwise the trainer resumes the run
folder from its checkpoint. An evaluation unit is done when study_eval.json matches its settings and the run's
export. So a killed study resumes where it stopped when rerun.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phenoflow.config import Config, parse_overrides, to_dict, update, validate
from phenoflow.errors import ConfigError, PhenoflowError
from phenoflow.study.spec import PROTOCOL_FIELDS, Study, Variant

log = logging.getLogger("phenoflow.study")


@dataclass
class Unit:
    kind: str  # train | eval
    variant: str
    seed: int
    cfg: Config
    error: str = ""  # a config the code base refuses (e.g. an architecture not wired for this modality)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.variant}-s{self.seed}"


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def _raw_config(study: Study, v: Variant, seed: int) -> Config:
    """resolve() without its validation (a refused variant still shows its model and flow in the report)."""
    from phenoflow.config import PRESETS, load_yaml

    if study.config_file:
        cfg = load_yaml(study.config_file)
    elif study.base in PRESETS:
        cfg = PRESETS[study.base]()
    else:
        raise ConfigError(f"study {study.name}: unknown preset {study.base!r} (known: {sorted(PRESETS)})")
    runs = study.study_dir / "runs"
    overrides = [*study.overrides, *v.overrides, *study.protocol, f"train.seed={seed}", f"run.out_dir={runs}",
                 f"run.name={run_name(v.name, seed)}"]
    return update(cfg, parse_overrides(overrides))


def _raw_eval_config(study: Study, v: Variant, seed: int) -> Config:
    cfg = _raw_config(study, study.variant(v.reuse) if v.reuse else v, seed)
    return update(cfg, parse_overrides(v.eval_overrides)) if v.eval_overrides else cfg


def train_config(study: Study, v: Variant, seed: int) -> Config:
    """The validated config of variant v's run with train.seed=seed (run folder study_dir/runs/<v>-s<seed>)."""
    return validate(_raw_config(study, v, seed))


def eval_config(study: Study, v: Variant, seed: int) -> Config:
    """The training config of the run this variant evaluates, with the variant's eval overrides."""
    return validate(_raw_eval_config(study, v, seed))


def _get(cfg: Config, key: str) -> Any:
    sec, name = key.split(".", 1)
    return getattr(getattr(cfg, sec), name)


def plan(study: Study) -> list[Unit]:
    """Training units (variants without reuse) then evaluation units (every variant), each seed. A variant whose
    config is refused gets units carrying the error (reported as unsupported, the others still run). Raises
    ConfigError when two variants would be scored under different protocols."""
    units: list[Unit] = []
    for kind in ("train", "eval"):
        for v in study.variants:
            if kind == "train" and v.reuse:
                continue
            for seed in study.seeds_of(v):
                cfg = (_raw_config if kind == "train" else _raw_eval_config)(study, v, seed)
                try:
                    validate(cfg)
                    err = ""
                except PhenoflowError as e:
                    err = str(e)
                units.append(Unit(kind, v.name, seed, cfg, err))
    ref: tuple[str, dict] | None = None
    for u in units:
        if u.error:
            continue
        proto = {"data": to_dict(u.cfg)["data"], **{k: _get(u.cfg, k) for k in PROTOCOL_FIELDS}}
        if ref is None:
            ref = (u.name, proto)
        elif proto != ref[1]:
            diff = sorted(k for k in proto if proto[k] != ref[1][k])
            raise ConfigError(f"study {study.name}: {u.name} and {ref[0]} differ in {diff}: every variant must be "
                              f"scored on the same data with the same protocol")
    return units


# ---- state ------------------------------------------------------------------------------------------------
def trained(cfg: Config) -> bool:
    """The run's own record: an export whose model.json says it saw train.total_samples."""
    meta = cfg.run_dir / "export" / "model.json"
    if not meta.is_file():
        return False
    try:
        return int(json.loads(meta.read_text()).get("samples_seen", -1)) >= cfg.train.total_samples
    except (ValueError, OSError):
        return False


def eval_dir(study: Study, u: Unit) -> Path:
    return study.study_dir / "evals" / run_name(u.variant, u.seed)


def eval_signature(study: Study, u: Unit) -> dict[str, Any]:
    v = study.variant(u.variant)
    export = u.cfg.run_dir / "export" / "model.json"
    digest = hashlib.sha256(export.read_bytes()).hexdigest()[:16] if export.is_file() else ""
    return {"variant": u.variant, "seed": u.seed, "run_dir": str(u.cfg.run_dir), "mode": v.eval_mode,
            "eval": to_dict(u.cfg)["eval"], "export": digest}


def evaluated(study: Study, u: Unit) -> bool:
    d = eval_dir(study, u)
    try:
        have = json.loads((d / "study_eval.json").read_text())
    except (OSError, ValueError):
        return False
    return (d / "metrics.json").is_file() and have == eval_signature(study, u)


def _status_path(study: Study) -> Path:
    return study.study_dir / "status.json"


def read_status(study: Study) -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_status_path(study).read_text())
    except (OSError, ValueError):
        return {}


def _set_status(study: Study, unit: str, state: str, message: str = "", seconds: float | None = None) -> None:
    # One writer at a time per study (the parent process); units run as children report through exit codes.
    # `seconds`: the unit's wall time when it ran now; a unit finished before keeps the time it took then.
    st = read_status(study)
    kept = st.get(unit, {}).get("seconds") if state == "done" and seconds is None else None
    sec = seconds if seconds is not None else kept
    st[unit] = {"state": state, **({"message": message} if message else {}),
                **({"seconds": round(sec, 1)} if sec is not None else {})}
    p = _status_path(study)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(st, indent=2) + "\n")
    os.replace(tmp, p)


# ---- one unit ---------------------------------------------------------------------------------------------
def run_unit(study: Study, u: Unit, progress: bool = False) -> str:
    """Train or evaluate one unit in this process; returns 'skipped' or 'done'."""
    if u.error:
        raise ConfigError(u.error)
    if u.kind == "train":
        if trained(u.cfg):
            return "skipped"
        from phenoflow.run_config import check_resume
        from phenoflow.train.trainer import train

        check_resume(u.cfg, quiet=True)  # a changed spec for an existing run folder is refused, nothing written
        train(u.cfg)
        return "done"
    if evaluated(study, u):
        return "skipped"
    if not trained(u.cfg):
        raise PhenoflowError(f"{u.name}: its run {u.cfg.run_dir} is not trained (train units run first)")
    from phenoflow.eval.evaluate import evaluate

    v = study.variant(u.variant)
    out = eval_dir(study, u)
    (out / "study_eval.json").unlink(missing_ok=True)
    evaluate(u.cfg, u.cfg.run_dir, report_dir=out, mode=v.eval_mode, progress=progress)  # control: Config A
    (out / "study_eval.json").write_text(json.dumps(eval_signature(study, u), indent=2) + "\n")
    return "done"


# ---- the study ---------------------------------------------------------------------------------------------
def record_invocation(study: Study, started: float, jobs: int, units: int) -> None:
    """Append this invocation's wall time (and what it ran on) to study_dir/timing.json: a killed and rerun study
    lists each invocation that ran units."""
    p = study.study_dir / "timing.json"
    try:
        runs = json.loads(p.read_text())
    except (OSError, ValueError):
        runs = []
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                 "wall_s": round(time.time() - started, 1), "jobs": jobs, "units_run": units,
                 "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
                 "gpus": len(_devices())})
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    os.replace(tmp, p)


def _devices() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA: CPU processes
        n = 0
    return [str(i) for i in range(n)]


def _run_parallel(study: Study, units: list[Unit], jobs: int,
                  spec_arg: list[str]) -> dict[str, tuple[str, str, float]]:
    """Each unit as its own `phenoflow study ... --unit NAME` process, at most `jobs` at once, process i on CUDA
    device i mod (number of devices) when there are several."""
    devices, out, running = _devices(), {}, []
    pending = list(units)
    slot = 0
    while pending or running:
        while pending and len(running) < jobs:
            u = pending.pop(0)
            env = dict(os.environ)
            if len(devices) > 1:
                env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
            slot += 1
            logf = open(study.study_dir / "logs" / (u.name.replace("/", "_") + ".log"), "a")  # noqa: SIM115
            cmd = [sys.executable, "-m", "phenoflow", "study", *spec_arg, "--unit", u.name]
            running.append((u, subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT), logf,
                            time.perf_counter()))
        done = [c for c in running if c[1].poll() is not None]
        if not done:
            time.sleep(0.5)
            continue
        u, p, logf, t0 = done[0]
        logf.close()
        running.remove(done[0])
        sec = time.perf_counter() - t0
        out[u.name] = ("done", "", sec) if p.returncode == 0 else (
            "failed", f"exit code {p.returncode}; see {study.study_dir / 'logs' / (u.name.replace('/', '_') + '.log')}",
            sec)
    return out


def run_study(study: Study, jobs: int = 1, only: str | None = None, spec_arg: list[str] | None = None,
              report: bool = True, progress: bool = False) -> int:
    """Run every unit not yet finished, then write the report; returns the number of failed units."""
    sd = study.study_dir
    (sd / "logs").mkdir(parents=True, exist_ok=True)
    units = plan(study)
    if only:  # a child process: one unit
        u = next((x for x in units if x.name == only), None)
        if u is None:
            raise ConfigError(f"study {study.name}: no unit {only!r} (units: {[x.name for x in units]})")
        state = run_unit(study, u, progress)
        print(f"[study] {u.name}: {state}")
        return 0
    (sd / "study.json").write_text(json.dumps(study.to_dict(), indent=2) + "\n")
    failed, started, ran = 0, time.time(), 0
    for kind in ("train", "eval"):
        todo = []
        for u in (x for x in units if x.kind == kind):
            if u.error:
                _set_status(study, u.name, "unsupported", u.error)
                print(f"[study] {u.name}: not run: {u.error.splitlines()[0]}")
            elif (kind == "train" and trained(u.cfg)) or (kind == "eval" and evaluated(study, u)):
                _set_status(study, u.name, "done")
                print(f"[study] {u.name}: finished before, skipped")
            elif kind == "eval" and not trained(u.cfg):
                _set_status(study, u.name, "failed", f"its run {u.cfg.run_dir} is not trained")
                failed += 1
            else:
                todo.append(u)
        if jobs > 1 and len(todo) > 1:
            ran += len(todo)
            for name, (state, msg, sec) in _run_parallel(study, todo, jobs, spec_arg or []).items():
                _set_status(study, name, state, msg, sec)
                failed += state == "failed"
                print(f"[study] {name}: {state}{' (' + msg + ')' if msg else ''}")
            continue
        for u in todo:
            print(f"[study] {u.name}: running")
            ran += 1
            t0 = time.perf_counter()
            try:
                run_unit(study, u, progress)
                _set_status(study, u.name, "done", seconds=time.perf_counter() - t0)
            except PhenoflowError as e:
                failed += 1
                _set_status(study, u.name, "failed", str(e), time.perf_counter() - t0)
                print(f"[study] {u.name}: failed: {e}")
    if ran:
        record_invocation(study, started, jobs, ran)
    if report:
        from phenoflow.study.report import write_study_report

        path = write_study_report(study)
        print(f"[study] report: {path}")
    return failed
