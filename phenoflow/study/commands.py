"""`phenoflow study SPEC.yaml | NAME [--size quick|full]`: argparse subcommand registered by phenoflow.cli."""
from __future__ import annotations

import argparse
from pathlib import Path

STUDY_HELP = """\
Train and score a set of configurations (a design-space study) and write study_dir/report.md + report.json:
the paper's Table 1 layout (FD/KD at the best guidance strength, compute, NFE), the guidance sweeps, the
interpolant table, real-vs-generated grids and whether each of the MiT paper's findings holds (docs/study.md).

Each variant (and seed) is an ordinary run folder under study_dir/runs; rerunning the same command skips what
is finished and resumes what is not (a killed study goes on where it stopped).

examples:
  phenoflow study my-study.yaml
  phenoflow study mit-design-space --size quick
  phenoflow study sampling --size full --jobs 4          4 processes, each its own GPU when there are several
  phenoflow study interpolants --report-only             rewrite the report from what is on disk
  phenoflow study --list
"""


def load_study(spec: str, size: str, out_dir: str | None):
    from phenoflow.study.builtin import BUILTIN, builtin
    from phenoflow.study.spec import load

    if spec in BUILTIN and not Path(spec).is_file():
        return builtin(spec, size, out_dir)
    return load(spec, out_dir)


def cmd_study(args) -> int:
    from phenoflow.study.builtin import BUILTIN

    if args.list or not args.spec:
        for name, fn in BUILTIN.items():
            s = fn("quick")
            print(f"{name}: {len(s.variants)} variants ({', '.join(v.name for v in s.variants)})")
        return 0 if args.list else 2
    study = load_study(args.spec, args.size, args.out)
    if args.report_only:
        from phenoflow.study.report import write_study_report

        print(f"[study] report: {write_study_report(study)}")
        return 0
    from phenoflow.study.runner import run_study

    spec_arg = [args.spec, "--size", args.size] + (["--out", args.out] if args.out else [])
    failed = run_study(study, jobs=max(1, args.jobs), only=args.unit, spec_arg=spec_arg,
                       progress=not args.unit)
    if failed:
        print(f"[study] {failed} unit(s) failed: see {study.study_dir / 'status.json'}")
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="train and score a set of configurations; the paper-style report",
                       description=STUDY_HELP)
    p.add_argument("spec", nargs="?", help="a study spec (YAML) or a built-in study name")
    p.add_argument("--size", choices=("quick", "full"), default="quick", help="size of a built-in study")
    p.add_argument("--out", default=None, metavar="DIR", help="parent folder of the study folder (default: the "
                   "spec's out_dir, studies)")
    p.add_argument("--jobs", type=int, default=1, help="units run as this many parallel processes")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument("--list", action="store_true", help="list the built-in studies")
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # a child process of --jobs: one unit
    p.set_defaults(func=cmd_study)
