"""The ``tidal-ray`` command. Exit codes: 0 success, 2 bad usage or bad input, 1 anything else."""
from __future__ import annotations

import argparse
import sys
import traceback


class UsageError(ValueError):
    """Bad input from the user: exit code 2."""


def _not_yet(name: str):
    def run(_args):
        raise UsageError(f"'tidal-ray {name}' is not implemented yet in this version")

    return run


def cmd_demo(args):
    from .demo import run_demo

    from .uncertainty import check_strategy

    check_strategy(args.strategy)
    if min(args.initial, args.k, args.cycles, args.epochs) <= 0:
        raise UsageError("--initial, --k, --cycles and --epochs must be positive")
    run_demo(args.workdir, initial=args.initial, k=args.k, cycles=args.cycles, strategy=args.strategy,
             epochs=args.epochs)


def cmd_campaign(args):
    from . import campaign
    from .score import parse_actors

    if args.action == "init":
        config = campaign.CampaignConfig(
            pool=args.pool, num_classes=args.num_classes, k=args.k, cycles=args.cycles, strategy=args.strategy,
            backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lam=args.lam,
            seed=args.seed, initial_labels=args.initial_labels, oracle=args.oracle, test=args.test,
            trainer=args.trainer, workers=args.workers, use_gpu=args.use_gpu, actors=parse_actors(args.actors),
            per_class_quota=args.per_class_quota)
        campaign.init(args.campaign, config, args.initial_labels_file)
    elif args.action == "run":
        state = campaign.run(args.campaign)
        print(f"campaign {state['status']}: cycle {state['cycle']}, step {state['step']}")
    elif args.action == "status":
        import json

        print(json.dumps(campaign.status(args.campaign), indent=2))
    elif args.action == "export":
        from .export import write_exports
        from .pool import is_image_prefix
        from .storage import read_parquet

        state = campaign.load_state(args.campaign)
        config = campaign.config_of(state)
        cycle = state["cycle"] if args.cycle is None else args.cycle
        selection = read_parquet(campaign.cycle_uri(args.campaign, cycle, "selection.parquet"))
        out = args.out or campaign.cycle_uri(args.campaign, cycle, "export")
        for uri in write_exports(selection, config.pool, is_image_prefix(config.pool), out):
            print(uri)
    elif args.action == "import-labels":
        campaign.import_labels(args.campaign, args.labels)


def cmd_report(args):
    from .report import write_report

    print(write_report(args.campaign))


def add_campaign_parser(sub) -> None:
    p = sub.add_parser("campaign", help="labeling campaigns: init | run | status | export | import-labels")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    a = actions.add_parser("init", help="create a campaign: pool, budget, initial labels")
    a.add_argument("campaign", metavar="CAMPAIGN_URI", help="local dir or s3://bucket/prefix for all state")
    a.add_argument("--pool", required=True, help="the unlabeled pool (local dir or s3:// prefix)")
    a.add_argument("--num-classes", type=int, required=True)
    a.add_argument("--k", type=int, required=True, help="samples to label per cycle")
    a.add_argument("--cycles", type=int, required=True, help="selection cycles")
    a.add_argument("--strategy", default="tidal-entropy")
    a.add_argument("--backbone", default="small_cnn")
    a.add_argument("--epochs", type=int, default=60)
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--lambda", dest="lam", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--initial-labels", type=int, default=0, help="with --oracle: draw N random initial labels")
    a.add_argument("--initial-labels-file", help="CSV/JSONL/parquet of id,label to start from")
    a.add_argument("--oracle", action="store_true",
                   help="simulation: labels come from the pool's label column, no person needed")
    a.add_argument("--test", help="a labeled test set (same format as the pool) for test accuracy")
    a.add_argument("--trainer", default="ray", choices=["ray", "local"],
                   help="ray: Ray Train workers; local: in the driver process")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--use-gpu", action="store_true")
    a.add_argument("--actors", default="1,1", help="scorer actors MIN,MAX")
    a.add_argument("--per-class-quota", action="store_true")

    a = actions.add_parser("run", help="advance: train, select, export, wait for labels, merge, ...")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a = actions.add_parser("status", help="where the campaign is")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a = actions.add_parser("export", help="(re)write labeling-tool manifests of a cycle's selection")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a.add_argument("--cycle", type=int)
    a.add_argument("--out", help="where to write (default: the cycle's export/ dir)")
    a = actions.add_parser("import-labels", help="merge labels (CSV/JSONL/parquet id,label or a Ground Truth output manifest)")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a.add_argument("labels", metavar="LABELS_FILE")
    p.set_defaults(run=cmd_campaign)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidal-ray",
        description="Distributed active learning with training dynamics (TiDAL) on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="a whole labeling campaign on real data (scikit-learn digits), locally")
    p.add_argument("--workdir", default="tidal-demo", help="where the pool, test set and campaign go")
    p.add_argument("--initial", type=int, default=50, help="random initial labels (default: 50)")
    p.add_argument("--k", type=int, default=50, help="samples selected per cycle (default: 50)")
    p.add_argument("--cycles", type=int, default=5, help="selection cycles (default: 5)")
    p.add_argument("--strategy", default="tidal-entropy")
    p.add_argument("--epochs", type=int, default=40, help="training epochs per cycle (default: 40)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("make-pool", help="write a digits or synthetic pool (any format, sharded, local or s3://)")
    from . import make_pool

    make_pool.add_arguments(p)
    p.set_defaults(run=make_pool.run)

    from . import train_cli

    p = sub.add_parser("train", help="train backbone + TD module on Ray Train", description=train_cli.DESCRIPTION)
    train_cli.add_arguments(p)
    p.set_defaults(run=train_cli.run)

    p = sub.add_parser("score", help="score a whole pool on Ray Data and select the top k")
    from . import score

    score.add_arguments(p)
    p.set_defaults(run=score.run_cli)

    add_campaign_parser(sub)

    p = sub.add_parser("report", help="learning curve and per-cycle report of a campaign")
    p.add_argument("campaign", metavar="CAMPAIGN_URI")
    p.set_defaults(run=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("tidal-ray: interrupted", file=sys.stderr)
        return 1
    except (UsageError, ValueError, FileNotFoundError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"tidal-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        if getattr(e, "plain_message", False):  # an expected condition, said plainly
            print(f"tidal-ray {args.command}: error: {e}", file=sys.stderr)
            return 1
        print(f"tidal-ray {args.command}: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
