"""The ``tidal-ray`` command: every command's arguments and its error handling.

Exit codes: 0 success, 2 bad usage or bad input (``errors.BadInput``, a missing file),
1 anything else, with one readable line unless ``--debug`` asks for the traceback and
Ray's own logs. The modules do the work; importing this one stays cheap (no torch, no
Ray) so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from tidal_ray.errors import BadInput, Refused

TRAIN_DESCRIPTION = """Train the backbone and the TD module (CE + lambda * KL) on Ray Train workers
(DDP: gloo on CPU, nccl with --use-gpu). The labeled set is parquet with `id`, `label`
(0..C-1) and the sample's data (`pixels`, `image` bytes of any size, or `features`).
The model (--model, --feature-layers, --weights) and the input recipe (--image-size,
--channels, --normalize) are checked before any row is read and recorded in the
checkpoint, so scoring decodes as training did. The run goes to OUT/NAME:
a checkpoint directory every --checkpoint-every epochs and after the last (model.pt,
metrics.json; the last two kept) and metrics.json. Rerunning with the same OUT and
--name resumes that run."""
QUOTA_HELP = ("at most ceil(k / classes) rows per predicted class, with any batch mode; when some class is "
              "predicted for fewer rows than that, the best rows left fill the batch to k")


def parse_actors(text: str) -> tuple[int, int]:
    low, _, high = str(text).partition(",")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise BadInput(f"--actors takes MIN,MAX with 1 <= MIN <= MAX (e.g. 1,4), got {text!r}")
    return low, high


# ---- commands --------------------------------------------------------------------------------


def cmd_demo(args):
    from tidal_ray.demo import run_demo
    from tidal_ray.method.uncertainty import check_strategy

    check_strategy(args.strategy)
    for flag, value in (("--initial", args.initial), ("--k", args.k), ("--cycles", args.cycles),
                        ("--epochs", args.epochs)):
        if value <= 0:
            raise BadInput(f"{flag} {value}: must be a positive integer")
    run_demo(args.workdir, initial=args.initial, k=args.k, cycles=args.cycles, strategy=args.strategy,
             epochs=args.epochs)


def cmd_make_pool(args):
    from tidal_ray.data.make_pool import make_pool

    files = make_pool(args.out, source=args.source, rows=args.rows, fmt=args.fmt, shards=args.shards,
                      seed=args.seed, shape=args.shape, num_classes=args.num_classes, data_dir=args.data_dir)
    print(f"wrote {len(files)} file(s) under {args.out}")


def parse_model(args) -> str | None:
    """``--model`` (a built-in name or MODULE:FACTORY), or its alias ``--backbone``."""
    if args.model and args.backbone and args.model != args.backbone:
        raise BadInput(f"--model {args.model} and --backbone {args.backbone} disagree; give one")
    return args.model or args.backbone


def parse_layers(text: str | None) -> tuple[str, ...] | None:
    layers = tuple(n.strip() for n in (text or "").split(",") if n.strip())
    return layers or None


def cmd_train(args):
    from tidal_ray.train.ingest import labeled_rows, read_labeled_set
    from tidal_ray.train.config import TrainConfig, resolve_recipe, validate_labels
    from tidal_ray.train.on_ray import train_on_ray

    # Ids and labels only on this process; the rows' data goes to the workers on Ray Data.
    ids, y, spec = read_labeled_set(args.labeled)
    # A labeled set that lacks the top class would otherwise shrink C.
    num_classes = args.num_classes or spec.num_classes or max(int(y.max()) + 1, 2)
    layers = parse_layers(args.feature_layers)
    model, input_shape = resolve_recipe(spec, num_classes, parse_model(args), layers, args.weights,
                                        args.image_size, args.channels, args.normalize)
    config = TrainConfig(num_classes=num_classes, input_shape=tuple(input_shape), backbone=model,
                         feature_layers=layers, weights=args.weights, normalize=args.normalize, augment=args.augment,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lam=args.lam,
                         seed=args.seed, checkpoint_every=args.checkpoint_every)
    validate_labels(config, ids, y, args.workers)
    rows = labeled_rows(args.labeled, ids, y, config.input_shape, spec)
    result = train_on_ray(config, rows.ids, rows.labels, rows.dataset, args.out, num_workers=args.workers,
                          use_gpu=args.use_gpu, max_failures=args.max_failures, name=args.name,
                          cpus_per_worker=args.cpus_per_worker)
    last = result.metrics[-1]
    print(f"trained {last['epoch']} epochs on {len(rows.ids)} labeled samples with {args.workers} workers: "
          f"loss {last['loss']:.4f}, train acc {last['train_accuracy']:.3f}")
    print(f"checkpoint: {result.checkpoint_uri}")
    print(f"metrics: {result.history_uri}")


def cmd_score(args):
    from tidal_ray.score.pipeline import score_pool

    summary = score_pool(args.checkpoint, args.pool, args.k, args.out, strategy=args.strategy,
                         exclude_uris=args.exclude, per_class_quota=args.per_class_quota,
                         save_scores=args.save_scores, batch_size=args.batch_size,
                         actors=parse_actors(args.actors), seed=args.seed, use_ray=not args.in_process,
                         use_gpu=True if args.use_gpu else None, precision=args.precision,
                         batch_mode=args.batch_mode, beta=args.beta, clusters=args.clusters,
                         candidates=args.candidates)
    mode = "" if summary["batch_mode"] == "topk" else f" ({summary['batch_mode']} batch mode)"
    print(f"selected {summary['selected']} of {summary['rows_scored']:,} scored rows by {summary['strategy']}{mode} "
          f"({summary['rows_read']:,} read, {summary['rows_rejected']:,} rejected, {summary['rows_excluded']:,} "
          f"excluded; {summary['rows_per_s']:,.0f} rows/s)")
    print(f"selection: {summary['outputs']['selection']}")


def cmd_campaign(args):
    from tidal_ray.campaign import cycle as campaign
    from tidal_ray.campaign.state import class_names_from

    if args.action == "init":
        config = campaign.CampaignConfig(
            pool=args.pool, num_classes=args.num_classes, k=args.k, cycles=args.cycles, strategy=args.strategy,
            backbone=parse_model(args), feature_layers=parse_layers(args.feature_layers), weights=args.weights,
            image_size=args.image_size, channels=args.channels, normalize=args.normalize, augment=args.augment,
            class_names=class_names_from(args.class_names), presign=args.presign, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lam=args.lam,
            seed=args.seed, initial_labels=args.initial_labels, oracle=args.oracle, test=args.test,
            trainer=args.trainer, workers=args.workers, use_gpu=args.use_gpu, actors=parse_actors(args.actors),
            per_class_quota=args.per_class_quota, batch_mode=args.batch_mode, beta=args.beta,
            clusters=args.clusters, candidates=args.candidates, min_steps=args.min_steps,
            warm_start=args.warm_start, initial_draw=args.initial_draw)
        campaign.init(args.campaign, config, args.initial_labels_file)
    elif args.action == "run":
        state = campaign.run(args.campaign)
        print(f"campaign {state['status']}: cycle {state['cycle']}, step {state['step']}")
    elif args.action == "status":
        import json

        print(json.dumps(campaign.status(args.campaign), indent=2))
    elif args.action == "export":
        for uri in campaign.export(args.campaign, args.cycle, args.out, args.document_root, log=print):
            print(uri)
    elif args.action == "import-labels":
        from tidal_ray.campaign.imports import import_labels

        import_labels(args.campaign, args.labels)


def cmd_report(args):
    from tidal_ray.campaign.cycle import write_report

    print(write_report(args.campaign))


# ---- arguments -------------------------------------------------------------------------------


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The training recipe, shared by ``train`` and ``campaign init``."""
    p.add_argument("--model", metavar="NAME|MODULE:FACTORY", default=None,
                   help="resnet18, small_cnn, mlp, or MODULE:FACTORY where FACTORY(num_classes=C) returns an "
                        "nn.Module mapping a float batch to logits (default: mlp for feature pools, small_cnn "
                        "for images up to 64 px, resnet18 for larger)")
    p.add_argument("--backbone", default=None, choices=["resnet18", "small_cnn", "mlp"],
                   help="the same as --model, for the built-in names")
    p.add_argument("--feature-layers", metavar="A,B", default=None,
                   help="MODULE:FACTORY only: layers whose outputs feed the TD module (default: layer1..layer4)")
    p.add_argument("--weights", metavar="URI", default=None,
                   help="start from this state_dict (local or s3://); a classifier head that does not fit C is re-initialised")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="image pools: resize the shorter side to N and center-crop NxN (N >= 8)")
    p.add_argument("--channels", type=int, default=None, choices=[1, 3],
                   help="1 (grayscale) or 3 (RGB; the default for image pools; stored pixels keep theirs)")
    p.add_argument("--normalize", default="none", metavar="none|imagenet|MEAN,STD",
                   help="input normalisation after scaling to [0, 1] (default: none)")
    p.add_argument("--augment", action="store_true", help="training only: random crop (padded) + horizontal flip")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64, help="samples per step over all workers (default: 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the TD-module KL loss (default: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")


def add_batch_mode_arguments(p: argparse.ArgumentParser) -> None:
    """The batch mode (DESIGN §8), shared by ``score`` and ``campaign init``. Values are
    checked by ``method.batch.check_batch_params`` (one line naming the flag, exit 2)."""
    p.add_argument("--batch-mode", default="topk", metavar="topk|power|cluster",
                   help="topk (default): the k highest scores, exact; power: a sample of k rows without "
                        "replacement with probability proportional to s^beta (s: a positive form of the "
                        "strategy's score; Gumbel-top-k on hashed per-row noise, repeatable); cluster: k-means "
                        "centroids of the model's embedding (last backbone stage, pooled, L2-normalised) fitted "
                        "on a hashed sample of up to 20,000 unlabeled rows, then round-robin over clusters "
                        "among the top M scores")
    p.add_argument("--beta", default=None, metavar="B",
                   help="power only: the exponent, a number > 0 (default: 1; larger is closer to topk)")
    p.add_argument("--clusters", default=None, metavar="K",
                   help="cluster only: k-means clusters, 1..1000 and at most the unlabeled rows (default: k, "
                        "at most 1000)")
    p.add_argument("--candidates", default=None, metavar="M",
                   help="cluster only: the top M rows by score the round-robin picks from, M >= k "
                        "(default: 10*k)")


def add_make_pool_parser(sub) -> None:
    from tidal_ray.data.make_pool import DEFAULT_SYNTHETIC_ROWS, SOURCES
    from tidal_ray.data.pool import FORMATS

    p = sub.add_parser("make-pool", help="write a digits, Fashion-MNIST or synthetic pool (any format, sharded, local or s3://)")
    p.add_argument("out", metavar="OUT", help="where to write the pool (local dir or s3://bucket/prefix)")
    p.add_argument("--source", required=True, choices=SOURCES,
                   help="digits: the real scikit-learn digits; fashion-mnist: its 60,000 training "
                        "images; synthetic: class-conditional random data")
    p.add_argument("--rows", type=int, default=None,
                   help=f"rows to write (digits: at most 1797; fashion-mnist: at most 60000; "
                        f"synthetic default {DEFAULT_SYNTHETIC_ROWS})")
    p.add_argument("--format", dest="fmt", default="pixels", choices=FORMATS,
                   help="pixels (raw uint8), image (PNG bytes), features (float vectors) in parquet, "
                        "or files (one PNG per row under OUT)")
    p.add_argument("--shards", type=int, default=1, help="parquet files to split the rows into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="3x32x32", help="synthetic only: one row's shape, e.g. 1x8x8")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic only")
    p.add_argument("--data-dir", default=None,
                   help="fashion-mnist only: the directory of its idx files "
                        "(default $TIDAL_RAY_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)")
    p.set_defaults(run=cmd_make_pool)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train backbone + TD module on Ray Train", description=TRAIN_DESCRIPTION)
    p.add_argument("--labeled", required=True, metavar="URI", help="labeled set: a parquet file or prefix (local or s3://)")
    p.add_argument("--out", required=True, metavar="URI", help="where the run is stored (local dir or s3://bucket/prefix)")
    p.add_argument("--name", default="train", help="run name under OUT (default: train)")
    add_recipe_arguments(p)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="C (default: the labeled set's tidal_ray.num_classes metadata, else the largest label + 1)")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="E",
                   help="checkpoint every E epochs and after the last (default: 10); a restarted worker group resumes from the latest")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts, each resuming from the last checkpoint")
    p.add_argument("--cpus-per-worker", type=float, default=0.5,
                   help="CPUs reserved per worker (default: 0.5, leaving room for data tasks)")
    p.set_defaults(run=cmd_train)


def add_score_parser(sub) -> None:
    from tidal_ray.method.uncertainty import DEFAULT_STRATEGY, STRATEGIES

    p = sub.add_parser("score", help="score a whole pool on Ray Data and select k (top k, or a batch mode)")
    p.add_argument("--checkpoint", required=True, metavar="URI", help="a checkpoint dir (model.pt) or file")
    p.add_argument("--pool", required=True, metavar="URI", help="the pool: local dir or s3:// prefix")
    p.add_argument("--k", required=True, type=int, help="how many samples to select")
    p.add_argument("--out", required=True, metavar="URI", help="where selection.parquet/json and rejects go")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY,
                   help=f"one of {', '.join(STRATEGIES)}; default {DEFAULT_STRATEGY}, as campaign init: it led every "
                        "Fashion-MNIST regime, and tidal-entropy with top-k trailed random (benchmarks/README.md)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="URI",
                   help="parquet/csv files (or prefixes) whose 'id's are never selected: labeled, pending")
    add_batch_mode_arguments(p)
    p.add_argument("--per-class-quota", action="store_true", help=QUOTA_HELP)
    p.add_argument("--save-scores", action="store_true", help="also write every row's scores (all strategies)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actors", default="1,1", metavar="MIN,MAX", help="scorer actors (a GPU each when there are GPUs)")
    p.add_argument("--seed", type=int, default=0,
                   help="for the random strategy, the power keys and the cluster mode's sample and k-means")
    p.add_argument("--in-process", action="store_true", help="no Ray: score in this process (small pools)")
    p.add_argument("--use-gpu", action="store_true",
                   help="each scorer actor asks for a GPU, even before a GPU node is up (an autoscaler starts one); "
                        "default: GPUs if the cluster has some now")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on the scorer's device; faster on GPUs, scores change slightly "
                        "(a selection is repeatable per device and precision)")
    p.set_defaults(run=cmd_score)


def add_campaign_parser(sub) -> None:
    from tidal_ray.method.uncertainty import DEFAULT_STRATEGY

    p = sub.add_parser("campaign", help="labeling campaigns: init | run | status | export | import-labels")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    a = actions.add_parser("init", help="create a campaign: pool, budget, initial labels")
    a.add_argument("campaign", metavar="CAMPAIGN_URI", help="local dir or s3://bucket/prefix for all state")
    a.add_argument("--pool", required=True, help="the unlabeled pool (local dir or s3:// prefix)")
    a.add_argument("--num-classes", type=int, required=True)
    a.add_argument("--k", type=int, required=True, help="samples to label per cycle")
    a.add_argument("--cycles", type=int, required=True, help="selection cycles")
    a.add_argument("--strategy", default=DEFAULT_STRATEGY,
                   help=f"default {DEFAULT_STRATEGY}: it led every Fashion-MNIST regime (benchmarks/README.md)")
    add_recipe_arguments(a)
    a.add_argument("--initial-labels", type=int, default=0,
                   help="draw N initial rows (--initial-draw); labeled by the oracle with --oracle, else exported "
                        "for a person by the first 'run'")
    a.add_argument("--initial-draw", choices=["random", "typical"], default="random",
                   help="random (default), or typical: TypiClust over an embedding of a 20,000-row sample of the "
                        "pool (the --weights model's features, a features pool's vectors, else 8x8 thumbnails); "
                        "typical beat random on 7 of 14 cold-start seeds on one machine (mean -0.0002 AUC) and 5 "
                        "of 5 on another (+0.005): no gain established (benchmarks/README.md)")
    a.add_argument("--min-steps", type=int, default=300,  # train.config.MIN_STEPS (the CLI imports no torch)
                   help="every training runs at least --epochs epochs and never fewer than this many steps (default 300)")
    a.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                   help="each cycle's training starts from the previous cycle's weights (fresh optimizer, empty TD "
                        "table); on by default, --no-warm-start trains each cycle from scratch")
    a.add_argument("--initial-labels-file", help="CSV/JSONL/parquet of id,label to start from")
    a.add_argument("--oracle", action="store_true",
                   help="simulation: labels come from the pool's label column, no person needed")
    a.add_argument("--test", help="a labeled test set (same format as the pool) for test accuracy")
    a.add_argument("--trainer", default="ray", choices=["ray", "local"],
                   help="ray: Ray Train workers; local: in the driver process, which then holds the labeled rows (small campaigns)")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--actors", default="1,1", help="scorer actors MIN,MAX")
    a.add_argument("--per-class-quota", action="store_true", help=QUOTA_HELP)
    add_batch_mode_arguments(a)
    a.add_argument("--class-names", metavar="A,B,...|FILE", default=None,
                   help="class names, comma-separated or one per line in a file; labels may then come as names")
    a.add_argument("--presign", type=int, default=None, metavar="SECONDS",
                   help="Label Studio tasks get presigned HTTPS URLs valid this long (s3:// samples)")

    a = actions.add_parser("run", help="advance: train, select, export, wait for labels, merge, ...")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a = actions.add_parser("status", help="where the campaign is")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a = actions.add_parser("export", help="(re)write labeling-tool manifests of a cycle's selection")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a.add_argument("--cycle", type=int)
    a.add_argument("--out", help="where to write (default: the cycle's export/ dir)")
    a.add_argument("--document-root", metavar="DIR", default=None,
                   help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, for local pictures (default: the "
                        "parent of the directory holding them: the campaign's, or the pool's for image files)")
    a = actions.add_parser("import-labels", help="merge a delivery of labels (CSV/JSONL/parquet id,label, a Ground "
                                                 "Truth output manifest or Label Studio's JSON, JSON_MIN or CSV "
                                                 "export, read by tidal-ray-id; labels as indices or class names)")
    a.add_argument("campaign", metavar="CAMPAIGN_URI")
    a.add_argument("labels", metavar="LABELS_FILE")
    p.set_defaults(run=cmd_campaign)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidal-ray",
        description="Distributed active learning with training dynamics (TiDAL) on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="full tracebacks on errors, and Ray's own logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="a whole labeling campaign on real data (scikit-learn digits), locally")
    p.add_argument("--workdir", default="tidal-demo", help="where the pool, test set and campaign go")
    p.add_argument("--initial", type=int, default=50, help="random initial labels (default: 50)")
    p.add_argument("--k", type=int, default=50, help="samples selected per cycle (default: 50)")
    p.add_argument("--cycles", type=int, default=5, help="selection cycles (default: 5)")
    p.add_argument("--strategy", default="tidal-entropy")
    p.add_argument("--epochs", type=int, default=40, help="training epochs per cycle (default: 40)")
    p.set_defaults(run=cmd_demo)

    add_make_pool_parser(sub)
    add_train_parser(sub)
    add_score_parser(sub)
    add_campaign_parser(sub)

    p = sub.add_parser("report", help="write the campaign's page (report/index.html, with report.md and the "
                                      "learning curve) and print its path")
    p.add_argument("campaign", metavar="CAMPAIGN_URI")
    p.set_defaults(run=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tidal_ray import runtime

    parser = build_parser()
    args = parser.parse_args(argv)
    runtime.DEBUG = args.debug
    prefix = f"tidal-ray {args.command}"

    def one_line(e: BaseException) -> str:  # pyarrow and Ray put newlines in their messages
        return " ".join(str(e).split())

    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 1
    except (BadInput, FileNotFoundError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Refused as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
