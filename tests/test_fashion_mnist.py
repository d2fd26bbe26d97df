"""The Fashion-MNIST path without the Debian files: a tiny idx set written by the test."""
import gzip
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tidal_ray.data import datasets
from tidal_ray.cli import main as cli_main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import al_quality  # noqa: E402


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fashion_dir(root, n_train: int = 60, n_test: int = 20, seed: int = 0):
    """Class-dependent 28x28 images (class c brightens row band c), gzip like Debian's files."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 7, :] = 250
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return root


@pytest.fixture()
def fashion_dir(tmp_path):
    return write_fashion_dir(tmp_path / "fashion")


def test_loader_reads_gzip_and_plain_idx(fashion_dir):
    ids, pixels, labels = datasets.load_fashion_mnist("train", str(fashion_dir))
    assert pixels.shape == (60, 1, 28, 28) and pixels.dtype == np.uint8
    assert ids.tolist() == list(range(60)) and labels.tolist() == [i % 10 for i in range(60)]
    assert (pixels[3, 0, 2 * 3 + 4] == 250).all()
    # plain (not gzip) files are read too
    plain = fashion_dir.parent / "plain"
    plain.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (plain / name).write_bytes(gzip.decompress((fashion_dir / f"{name}.gz").read_bytes()))
    _, test_pixels, test_labels = datasets.load_fashion_mnist("test", str(plain))
    assert test_pixels.shape == (20, 1, 28, 28) and len(test_labels) == 20


def test_loader_honours_the_environment_variable(fashion_dir, monkeypatch):
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(fashion_dir))
    assert len(datasets.load_fashion_mnist("test")[0]) == 20


@pytest.mark.parametrize("raw, message", [
    (b"\x00\x00\x08", "not an idx file"),
    (b"\x12\x34\x08\x01" + bytes(8), "not an idx file"),
    (b"\x00\x00\x0d\x01" + bytes(8), "element type 0x0d"),
    (b"\x00\x00\x08\x03" + np.array([5, 28, 28], ">u4").tobytes() + bytes(100), "need 3920 data bytes"),
])
def test_malformed_idx_gives_a_clear_error_naming_the_file(tmp_path, raw, message):
    for name in ("train-labels-idx1-ubyte.gz",):
        (tmp_path / name).write_bytes(gzip.compress(raw))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 28, 28))))
    with pytest.raises(ValueError, match=message) as info:
        datasets.load_fashion_mnist("train", str(tmp_path))
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


def test_images_of_the_wrong_dims_are_refused(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 8, 8))))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected images of dims \(N, 28, 28\)"):
        datasets.load_fashion_mnist("train", str(tmp_path))


def test_missing_files_say_how_to_install_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_fashion_mnist("test", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "apt-get install -y dataset-fashion-mnist" in message
    assert "make fashion-mnist" in message


@pytest.mark.parametrize("fmt", ["pixels", "image", "features"])
def test_make_pool_writes_the_training_images(fashion_dir, tmp_path, fmt):
    out = tmp_path / f"pool-{fmt}"
    assert cli_main(["make-pool", str(out), "--source", "fashion-mnist", "--data-dir", str(fashion_dir),
                     "--format", fmt, "--shards", "2"]) == 0
    table = pq.read_table(str(out))
    assert table.num_rows == 60 and sorted(table.column("id").to_pylist()) == list(range(60))
    assert table.schema.metadata[b"tidal_ray.source"] == b"fashion-mnist"


def test_make_pool_files_format_and_missing_dir(fashion_dir, tmp_path, capsys):
    out = tmp_path / "files"
    assert cli_main(["make-pool", str(out), "--source", "fashion-mnist", "--data-dir", str(fashion_dir),
                     "--format", "files", "--rows", "12"]) == 0
    assert len(list(out.glob("*.png"))) == 12
    assert cli_main(["make-pool", str(tmp_path / "x"), "--source", "fashion-mnist",
                     "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_subset_candidates_are_a_fresh_subset_of_the_unlabeled_rows():
    unlabeled = np.arange(100, 200)
    first = al_quality.candidate_rows("tidal-entropy-subset10k", unlabeled, 10, seed=0, cycle=0)
    second = al_quality.candidate_rows("tidal-entropy-subset10k", unlabeled, 10, seed=0, cycle=1)
    assert len(first) == 10 and set(first) <= set(unlabeled) and set(first) != set(second)
    assert al_quality.candidate_rows("tidal-entropy", unlabeled, 10, seed=0, cycle=0) is unlabeled


def test_tiny_fashion_protocol_runs_and_reports(fashion_dir, tmp_path):
    spec = dict(al_quality.FASHION_REGIMES["cold"], initial=10, k=6, cycles=2, subset=15)
    recipe = dict(al_quality.FASHION_RECIPE, epochs=1, min_steps=2)
    strategies = ["tidal-entropy", "random", "entropy", "tidal-entropy-subset10k"]
    out = tmp_path / "results"
    result = al_quality.run_regime("cold", seeds=1, cycles=None, strategies=strategies, out_dir=str(out),
                                   processes=1, recipe=recipe, dataset="fashion-mnist", spec=spec,
                                   data_dir=str(fashion_dir))
    saved = json.loads((out / "fashion-mnist-cold.json").read_text())
    assert saved["seeds"] == 1 and saved["summary"].keys() == set(strategies)
    assert {"auc_mean", "auc_std", "final_mean", "auc_per_seed"} <= saved["summary"]["random"].keys()
    runs = {r["strategy"]: r for r in saved["runs"]}
    for run in runs.values():
        assert run["labeled"] == [10, 16, 22]                         # +k per cycle
        assert run["pool_size"] == 60 and len(run["accuracy"]) == 3 and len(run["td_kl"]) == 3
        assert [sum(c) for c in run["selected_class_counts"]] == [6, 6]
        assert all(s >= 0 for s in run["scoring_seconds"])
    assert runs["tidal-entropy"]["scored_rows"] == [50, 44]           # every unlabeled row, none labeled
    assert runs["tidal-entropy-subset10k"]["scored_rows"] == [15, 15]  # only its subset
    # the same initial set and cycle-0 model for every strategy
    assert len({r["accuracy"][0] for r in runs.values()}) == 1
    assert [d["pair"] for d in result["paired_differences"]] == [
        "tidal-entropy − random", "tidal-entropy − entropy", "tidal-entropy − tidal-entropy-subset10k",
        "entropy − random", "tidal-entropy-subset10k − random"]  # every other arm against the baselines too
    assert all(d["seeds"] == [0] for d in result["paired_differences"])
    text = (out / "fashion-mnist-cold.md").read_text()
    assert "| tidal-entropy-subset10k |" in text and "tidal-entropy − random" in text
    assert (out / "fashion-mnist-cold.png").stat().st_size > 1000
    assert "Fashion-MNIST, cold" in al_quality.readme_section(str(out))
    # a later seed joins the same file
    more = al_quality.run_regime("cold", seeds=1, cycles=None, strategies=["random"], out_dir=str(out),
                                 processes=1, recipe=recipe, dataset="fashion-mnist", spec=spec,
                                 data_dir=str(fashion_dir), first_seed=1, add_seeds=True)
    assert more["seeds"] == 2 and len(more["summary"]["random"]["auc_per_seed"]) == 2
    assert more["summary"].keys() == set(strategies) and len(more["summary"]["entropy"]["auc_per_seed"]) == 1
    assert more["summary"]["random"]["seeds"] == [0, 1]
    # only pairs with both strategies run on a seed are differenced
    assert {tuple(d["seeds"]) for d in more["paired_differences"]} == {(0,)}
    # runs made elsewhere (another process, another output dir) merge in
    elsewhere = al_quality.run_regime("cold", seeds=1, cycles=None, strategies=["margin"], out_dir=str(tmp_path / "x"),
                                      processes=1, recipe=recipe, dataset="fashion-mnist", spec=spec,
                                      data_dir=str(fashion_dir))
    merged = al_quality.merge_results(str(out), "fashion-mnist", "cold", str(tmp_path / "x" / "fashion-mnist-cold.json"))
    assert merged["summary"]["margin"]["seeds"] == [0] and merged["summary"]["random"]["seeds"] == [0, 1]
    assert merged["seconds"] == pytest.approx(more["seconds"] + elsewhere["seconds"])
    with pytest.raises(ValueError, match="another spec or recipe"):
        al_quality.run_regime("cold", seeds=1, cycles=None, strategies=["random"], out_dir=str(out),
                              processes=1, recipe=dict(recipe, min_steps=3), dataset="fashion-mnist", spec=spec,
                              data_dir=str(fashion_dir), first_seed=2, add_seeds=True)


def test_scaled_recipe_sets_epochs_from_the_labeled_size():
    recipe = al_quality.FASHION_RECIPE   # at least 10 epochs, never fewer than 300 steps of 64
    assert [al_quality.epochs_for(n, recipe) for n in (200, 1000, 6000, 21000)] == [75, 19, 10, 10]
    old = {"steps": 300, "batch_size": 64}  # the old fixed-step recipe, as committed results record it
    assert [al_quality.epochs_for(n, old) for n in (200, 1000, 6000)] == [75, 19, 4]
    assert al_quality.epochs_for(500, al_quality.RECIPE) == 60


def test_recipe_check_reads_the_pool_only(fashion_dir):
    (fashion_dir / "t10k-images-idx3-ubyte.gz").unlink()  # the test split must not be needed
    [trial] = al_quality.recipe_check([(10, dict(al_quality.FASHION_RECIPE, epochs=1, min_steps=2))], str(fashion_dir),
                                      validation=20)
    assert trial["labeled"] == 10 and trial["epochs"] == 2
    assert 0.0 <= trial["pool_validation_accuracy"] <= 1.0
