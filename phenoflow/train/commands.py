"""`phenoflow plan` and `phenoflow bench train`: registered by phenoflow.cli next to the data/eval commands."""
from __future__ import annotations

from phenoflow.cli_args import add_config_args, config_from_args, dry_run


def cmd_plan(args) -> int:
    from phenoflow.train.planner import run

    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    try:
        print(run(cfg, args))
    except ValueError as e:  # a cluster option out of range: one message on stderr, exit 2 (phenoflow.cli)
        from phenoflow.errors import ConfigError

        raise ConfigError(f"plan: {e}") from e
    return 0


def cmd_bench(args) -> int:
    from phenoflow.train.bench import bench_train

    cfg = config_from_args(args)
    if dry_run(cfg, args):
        return 0
    if args.steps < 1 or args.warmup < 0:
        from phenoflow.errors import ConfigError

        raise ConfigError(f"bench train: --steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    bench_train(cfg, steps=args.steps, warmup=args.warmup, profile_dir=args.profile, csv=args.csv)
    return 0


PLAN_HELP = {"--nodes": "number of nodes in the cluster", "--gpus-per-node": "GPUs in each node",
             "--link-efficiency": "fraction of the nominal link bandwidth that collectives reach"}


def register(subparsers) -> None:
    from phenoflow.train.planner import add_args

    p = subparsers.add_parser("plan", help="per-GPU memory, communication and scaling efficiency for a cluster")
    add_config_args(p, "mit-xl2-pretrain")
    add_args(p)
    for a in p._actions:  # user help for the cluster options that have none
        if a.option_strings and not a.help and a.option_strings[0] in PLAN_HELP:
            a.help = PLAN_HELP[a.option_strings[0]]
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser("bench", help="benchmarks: `phenoflow bench train` times training steps")
    bsub = p.add_subparsers(dest="bench_what", required=True)
    b = bsub.add_parser("train", help="run N training steps of a preset (any engine; under torchrun for ddp/"
                        "deepspeed/fsdp2) and print a step-time table")
    add_config_args(b, "demo")
    b.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    b.add_argument("--profile", default="", help="write a torch profiler trace (Chrome JSON) to this folder")
    b.add_argument("--csv", default="", help="append the result row to this CSV file")
    b.set_defaults(func=cmd_bench)
