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

    run_demo(args.workdir, labels=args.labels, k=args.k)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidal-ray",
        description="Distributed active learning with training dynamics (TiDAL) on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="the whole loop on real data (scikit-learn digits), locally")
    p.add_argument("--workdir", default="tidal-demo")
    p.add_argument("--labels", type=int, default=20, help="initial labels")
    p.add_argument("--k", type=int, default=10, help="samples to select")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("make-pool", help="write a digits or synthetic pool (any format, sharded, local or s3://)")
    p.set_defaults(run=_not_yet("make-pool"))

    p = sub.add_parser("train", help="train backbone + TD module on Ray Train")
    p.set_defaults(run=_not_yet("train"))

    p = sub.add_parser("score", help="score a whole pool on Ray Data and select the top k")
    p.set_defaults(run=_not_yet("score"))

    p = sub.add_parser("campaign", help="labeling campaigns: init | run | status | export | import-labels")
    p.set_defaults(run=_not_yet("campaign"))

    p = sub.add_parser("report", help="learning curve and per-cycle report of a campaign")
    p.set_defaults(run=_not_yet("report"))
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
        print(f"tidal-ray {args.command}: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
