"""Train on a Ray cluster: ``ray job submit -- python jobs/train.py --labeled URI --out URI ...``.

Same arguments as ``tidal-ray train``. ``ray.init()`` joins the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray when there is none."""
from __future__ import annotations

import argparse
import sys

from tidal_ray.train_cli import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs/train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
