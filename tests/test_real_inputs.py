"""Real inputs: photos of any size and mode, the user's own model, bad input named in one line.
In-process and through ``cli.main`` (no Ray needed: every check here runs before any work)."""
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tidal_ray.data import storage
from tidal_ray.cli import main
from tidal_ray.data.decode import augment_batch, decode_image, transform_pixels
from tidal_ray.errors import BadInput
from tidal_ray.data.make_pool import make_pool
from tidal_ray.models import build_model, default_model
from tidal_ray.train.config import check_model
from tidal_ray.data.pool import describe_pool, input_shape_for

# A user's own module, as a user would write it: FACTORY(num_classes) -> logits, with two
# named layers for the TD module. Tests write it into their directory and run from there.
USER_MODULE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def factory(num_classes):
    return Tiny(num_classes)


def not_a_module(num_classes):
    return "a string"


def wrong_logits(num_classes):
    return Tiny(num_classes + 1)
'''


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(height: int = 12, width: int = 20) -> np.ndarray:
    """A picture whose every pixel differs, so a rotation or crop shows."""
    rng = np.random.default_rng(height * 1000 + width)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def user_module(directory, monkeypatch) -> str:
    """Write the user's module into ``directory`` under a fresh name and run from there."""
    name = f"user_model_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(directory)
    return name


# ---- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation,undo", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                              (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_image_decodes_to_the_upright_array(orientation, undo):
    upright = Image.fromarray(picture())
    # Stored rotated, with the EXIF tag that tells a viewer how to turn it back upright.
    stored = upright.transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = encode(stored, "PNG", exif=exif)
    np.testing.assert_array_equal(decode_image(blob, 3), decode_image(encode(upright), 3))
    assert decode_image(blob, 3).shape == (3, 12, 20)
    np.testing.assert_array_equal(decode_image(blob, 3, (8, 8)), decode_image(encode(upright), 3, (8, 8)))


def test_any_mode_becomes_the_checkpoints_channels():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0      # transparent: white
    rgba[1:, :, 3] = 255   # opaque red
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")), 3)
    assert out[:, 0, 0].tolist() == [255, 255, 255] and out[:, 2, 2].tolist() == [200, 0, 0]

    palette = Image.fromarray(picture(6, 6)).convert("P")
    np.testing.assert_array_equal(decode_image(encode(palette), 3), np.asarray(palette.convert("RGB")).transpose(2, 0, 1))
    gray = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    assert (decode_image(encode(Image.fromarray(gray)), 3) == gray).all()   # replicated into 3 channels
    deep = Image.fromarray(gray.astype(np.uint16) * 257)                 # 16-bit grayscale
    np.testing.assert_array_equal(decode_image(encode(deep), 1)[0], gray)
    cmyk = Image.fromarray(picture(8, 8)).convert("CMYK")
    assert decode_image(encode(cmyk, "JPEG", quality=95), 3).shape == (3, 8, 8)
    webp = decode_image(encode(Image.fromarray(picture(8, 8)), "WEBP", lossless=True), 1)
    np.testing.assert_array_equal(webp[0], np.asarray(Image.fromarray(picture(8, 8)).convert("L")))


def test_resize_covers_the_size_then_crops_the_center():
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # only the middle third is white
    out = decode_image(encode(Image.fromarray(wide)), 1, (10, 10))
    assert out.shape == (1, 10, 10) and out.min() == 255
    big = decode_image(encode(Image.fromarray(picture(90, 60)), "JPEG"), 3, (16, 16))
    assert big.shape == (3, 16, 16)
    # Stored pixels of another shape go through the same transform as image bytes.
    rows = np.stack([np.asarray(Image.fromarray(wide)).reshape(1, 10, 30)] * 2)
    np.testing.assert_array_equal(transform_pixels(rows, (3, 10, 10))[0], np.repeat(out, 3, axis=0))


def test_augmentation_crops_and_flips_in_place_of_the_image():
    x = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    outs = [augment_batch(x, np.random.default_rng(seed)) for seed in range(8)]
    assert all(o.shape == x.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, x) for o in outs)
    np.testing.assert_array_equal(augment_batch(x, np.random.default_rng(3)), outs[3])
    features = np.ones((4, 5), np.float32)
    assert augment_batch(features, np.random.default_rng(0)) is features


# ---- pools: skipped files, the input size --------------------------------------------------------


def test_marker_hidden_and_non_image_files_are_skipped_and_counted(tmp_path):
    pool = tmp_path / "photos"
    for i, (h, w) in enumerate([(20, 30), (40, 24), (16, 16)]):
        (pool / "sub").mkdir(parents=True, exist_ok=True)
        (pool / ("sub" if i else "") / f"p{i}.{'JPG' if i == 1 else 'webp' if i == 2 else 'png'}").write_bytes(
            encode(Image.fromarray(picture(h, w)), "JPEG" if i == 1 else "WEBP" if i == 2 else "PNG"))
    for name in ["README.txt", "_SUCCESS", ".DS_Store", "sub/.hidden.png", "manifest.json"]:
        (pool / name).write_text("not a photo")
    spec = describe_pool(str(pool))
    assert spec.format == "files" and spec.rows == 3
    assert sorted(s.rsplit("/", 1)[-1] for s in spec.skipped) == [".DS_Store", ".hidden.png", "README.txt",
                                                                  "_SUCCESS", "manifest.json"]
    with pytest.raises(BadInput, match="vary in size .*give --image-size N"):
        input_shape_for(spec)
    assert input_shape_for(spec, image_size=16) == (3, 16, 16)
    assert input_shape_for(spec, image_size=16, channels=1) == (1, 16, 16)
    with pytest.raises(BadInput, match="--image-size 4: must be at least 8"):
        input_shape_for(spec, image_size=4)

    parquet = tmp_path / "parquet"
    make_pool(str(parquet), "digits", rows=30, fmt="pixels")
    (parquet / "_SUCCESS").write_text("")
    (parquet / ".part-1.parquet.crc").write_text("")
    spec = describe_pool(str(parquet))
    assert spec.rows == 30 and len(spec.skipped) == 2
    assert input_shape_for(spec) == (1, 8, 8) and input_shape_for(spec, 16, 3) == (3, 16, 16)

    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "README.txt").write_text("")
    (tmp_path / "nothing" / "_SUCCESS").write_text("")
    with pytest.raises(BadInput, match="no parquet or image files .* 2 skipped"):
        describe_pool(str(tmp_path / "nothing"))


def test_default_model_follows_the_pool(tmp_path):
    from tidal_ray.train.config import resolve_recipe

    assert default_model((64,)) == "mlp"
    assert default_model((3, 32, 32)) == "small_cnn" and default_model((3, 64, 64)) == "small_cnn"
    assert default_model((3, 96, 96)) == "resnet18"
    make_pool(str(tmp_path / "features"), "digits", rows=20, fmt="features")
    assert resolve_recipe(describe_pool(str(tmp_path / "features")), 10) == ("mlp", (64,))
    make_pool(str(tmp_path / "images"), "digits", rows=20, fmt="image")
    spec = describe_pool(str(tmp_path / "images"))
    assert resolve_recipe(spec, 10) == ("small_cnn", (3, 8, 8))
    assert resolve_recipe(spec, 10, image_size=96, channels=1) == ("resnet18", (1, 96, 96))


# ---- the user's own model -----------------------------------------------------------------------


def test_user_factory_builds_feeds_named_layers_and_starts_from_weights(tmp_path, monkeypatch, capsys):
    module = user_module(tmp_path, monkeypatch)
    net = build_model(f"{module}:factory", 4, (3, 16, 16), ("stem", "block"), "imagenet").eval()
    assert net.backbone.feature_dims == [8, 16]
    logits, td_logits = net(torch.rand(5, 3, 16, 16))
    assert logits.shape == td_logits.shape == (5, 4)

    # Pretrained for 10 classes: everything but the head is kept; the head, named, is re-initialised.
    pretrained = build_model(f"{module}:factory", 10, (3, 16, 16), ("stem", "block")).backbone.module
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    check_model(f"{module}:factory", 4, (3, 16, 16), ("stem", "block"), str(tmp_path / "pretrained.pt"))
    assert capsys.readouterr().out.strip() == (f"warning: --weights {tmp_path / 'pretrained.pt'}: classifier head "
                                               "fc.weight, fc.bias does not fit 4 classes; re-initialised")

    state = pretrained.state_dict()
    state["stem.0.weight"] = torch.zeros(8, 1, 3, 3)
    state["extra.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(BadInput, match=r"keys do not fit the model \(unexpected: extra.bias; mis-shaped: "
                                       r"stem.0.weight \(8, 1, 3, 3\) vs \(8, 3, 3, 3\)\)"):
        check_model(f"{module}:factory", 4, (3, 16, 16), ("stem", "block"), str(tmp_path / "other.pt"))


def _init_argv(tmp_path, pool, *extra):
    labels = tmp_path / "seed.csv"
    labels.write_text("id,label\n00000000.png,zero\n00000001.png,one\n00000002.png,two\n")
    return ["campaign", "init", str(tmp_path / "campaign"), "--pool", str(pool), "--num-classes", "3",
            "--k", "2", "--cycles", "1", "--initial-labels-file", str(labels), "--epochs", "1", "--min-steps", "0", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--model", "no_such_module_here:factory"], "cannot import module 'no_such_module_here'"),
    (["--model", "{m}:not_a_module"], "the factory returned a str, not a torch.nn.Module"),
    (["--model", "{m}:wrong_logits", "--feature-layers", "stem"], r"logits have shape \(2, 4\) .* expected \(2, 3\)"),
    (["--model", "{m}:factory", "--feature-layers", "stem,head9"], "--feature-layers: head9 not found"),
    (["--model", "{m}:factory", "--feature-layers", "stem", "--weights", "{tmp}/missing.pt"],
     "--weights .*missing.pt: no such file"),
    (["--image-size", "4"], "--image-size 4: must be at least 8"),
    (["--class-names", "zero,one"], "--class-names: 2 names for 3 classes"),
    (["--class-names", "zero,one,three"], r"seed.csv: unknown class name\(s\) 'two'"),
    (["--normalize", "0.5"], "--normalize '0.5': expected"),
    (["--k", "0"], "--k 0: must be a positive integer"),
    (["--cycles", "-1"], "--cycles -1: must be a positive integer"),
])
def test_bad_recipe_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, extra, message):
    module = user_module(tmp_path, monkeypatch)
    pool = tmp_path / "pool"
    make_pool(str(pool), "digits", rows=12, fmt="files")
    argv = _init_argv(tmp_path, pool, *[e.format(m=module, tmp=tmp_path) for e in extra])
    if "--class-names" not in extra:
        argv += ["--class-names", "zero,one,two"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert re.search(message, err), err
    assert not (tmp_path / "campaign").exists()


def test_campaign_init_takes_the_recipe_and_seed_labels_by_name(tmp_path, monkeypatch, capsys):
    module = user_module(tmp_path, monkeypatch)
    pool = tmp_path / "pool"
    make_pool(str(pool), "digits", rows=12, fmt="files")
    (pool / "README.txt").write_text("digits")
    argv = _init_argv(tmp_path, pool, "--model", f"{module}:factory", "--feature-layers", "stem,block",
                      "--image-size", "16", "--normalize", "imagenet", "--class-names", "zero,one,two")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 initial labels" in out and "1 files skipped" in out and "input 3x16x16" in out
    state = json.loads((tmp_path / "campaign" / "campaign.json").read_text())
    assert state["config"]["backbone"] == f"{module}:factory" and state["config"]["class_names"] == ["zero", "one", "two"]
    labels = storage.read_parquet(str(tmp_path / "campaign" / "labeled" / "cycle-000.parquet"))
    assert labels.to_pylist() == [{"id": f"0000000{i}.png", "label": i} for i in range(3)]


# ---- end to end: photos on S3, the user's model from S3 weights, labelers --------------------------

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue"]


def _photo(i: int, rng) -> tuple[str, bytes, int]:
    """Photo ``i``: a noisy picture whose dominant colour is its class, in one of seven
    modes/encodings, of a size between 16 and 40 pixels a side."""
    label = i % 3
    height, width = (int(v) for v in rng.integers(16, 41, size=2))
    rgb = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    rgb[..., label] += 150
    img = Image.fromarray(rgb)
    kind = (i // 3) % 7
    if kind == 0:
        return f"img-{i:03d}.jpg", encode(img, "JPEG"), label
    if kind == 1:
        return f"gray/img-{i:03d}.JPG", encode(img.convert("L"), "JPEG"), label
    if kind == 2:
        rgba = img.convert("RGBA")
        rgba.putalpha(200)
        return f"img-{i:03d}.png", encode(rgba), label
    if kind == 3:
        return f"img-{i:03d}.png", encode(img.convert("P")), label
    if kind == 4:
        return f"img-{i:03d}.jpeg", encode(img.convert("CMYK"), "JPEG"), label
    if kind == 5:
        exif = Image.Exif()
        exif[0x0112] = 6
        return f"rotated/img-{i:03d}.jpg", encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif), label
    return f"img-{i:03d}.webp", encode(img, "WEBP"), label


def _cli(args, cwd, timeout=600):
    """The console script, run from the user's directory (its sys.path lacks the cwd)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(Path(sys.executable).parent / "tidal-ray"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _label_studio_export(tasks: list, truth: dict) -> list:
    """What a labeler hands back: Label Studio's JSON export, the class chosen by name."""
    return [{**task, "annotations": [{"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                                  "value": {"choices": [CLASSES[truth[task["data"]["tidal-ray-id"]]]]}}]}]}
            for task in tasks]


@pytest.mark.slow
def test_photos_user_model_and_labelers_end_to_end_on_s3(s3_bucket, tmp_path):
    started = time.monotonic()
    rng = np.random.default_rng(0)
    photos = [_photo(i, rng) for i in range(204)]
    truth = {key: label for key, _, label in photos}
    pool = f"{s3_bucket}/photos"
    extra = [("broken.jpg", encode(Image.fromarray(picture()), "JPEG")[:200]), ("README.txt", b"our photos"),
             ("_SUCCESS", b"")]
    with ThreadPoolExecutor(max_workers=16) as threads:
        list(threads.map(lambda item: storage.write_bytes(f"{pool}/{item[0]}", item[1]),
                         [(k, b) for k, b, _ in photos] + extra))

    work = tmp_path / "work"
    work.mkdir()
    (work / "user_model.py").write_text(USER_MODULE)
    (work / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    # Pretrained elsewhere for 5 classes: the head does not fit 3 and is re-initialised.
    namespace = {}
    exec(USER_MODULE, namespace)
    buf = io.BytesIO()
    torch.save(namespace["factory"](5).state_dict(), buf)
    storage.write_bytes(f"{s3_bucket}/weights/pretrained.pt", buf.getvalue())
    seed = [key for key, _, _ in photos[:12]]
    (work / "seed.csv").write_text("id,label\n" + "".join(f"{k},{CLASSES[truth[k]]}\n" for k in seed))

    root = f"{s3_bucket}/campaign"
    init = _cli(["campaign", "init", root, "--pool", pool, "--num-classes", "3", "--k", "8", "--cycles", "2",
                 "--initial-labels-file", "seed.csv", "--class-names", "classes.txt", "--model", "user_model:factory",
                 "--feature-layers", "stem,block", "--weights", f"{s3_bucket}/weights/pretrained.pt",
                 "--image-size", "16", "--epochs", "1", "--min-steps", "0", "--batch-size", "16", "--presign", "600"], work)
    assert init.returncode == 0, init.stdout + init.stderr
    assert "classifier head fc.weight, fc.bias does not fit 3 classes; re-initialised" in init.stdout
    assert "12 initial labels" in init.stdout and "2 files skipped" in init.stdout

    run = _cli(["campaign", "run", root], work)
    assert run.returncode == 0 and "waiting for labels" in run.stdout, run.stdout + run.stderr
    summary = storage.read_json(f"{root}/cycles/000/selection.json")
    assert (summary["rows_read"], summary["rows_rejected"], summary["rows_excluded"]) == (205, 1, 12)
    assert summary["rows_scored"] + summary["rows_excluded"] == 204       # every good photo
    assert summary["files_skipped"] == 2
    assert sorted(n.rsplit("/", 1)[-1] for n in summary["files_skipped_names"]) == ["README.txt", "_SUCCESS"]
    # a row per file: counted, not listed (a real prefix holds millions)
    assert summary["pool"]["image_files"] == 205 and "files" not in summary["pool"]
    rejects = storage.read_parquet(f"{root}/cycles/000/rejects.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [("broken.jpg", "undecodable image")]
    assert "cycle 0: selected 8 of 192 scored rows in" in run.stdout
    assert "(205 read, 1 rejected, 12 excluded)" in run.stdout
    assert f"cycle 0: rows that could not be scored, with the reason: {root}/cycles/000/rejects.parquet" in run.stdout
    state = torch.load(io.BytesIO(storage.read_bytes(
        storage.read_json(f"{root}/cycles/000/metrics.json")["checkpoint"] + "/model.pt")), weights_only=True)
    assert (state["config"]["backbone"], tuple(state["config"]["feature_layers"]),
            tuple(state["config"]["input_shape"])) == ("user_model:factory", ("stem", "block"), (3, 16, 16))

    export = f"{root}/cycles/000/export"
    manifest = [json.loads(line) for line in storage.read_bytes(f"{export}/ground-truth-input.manifest").splitlines()]
    tasks = json.loads(storage.read_bytes(f"{export}/label-studio-tasks.json"))
    assert len(manifest) == len(tasks) == 8
    assert all(storage.exists(m["source-ref"]) and m["source-ref"] == f"{pool}/{m['tidal-ray-id']}" for m in manifest)
    for task in tasks[:2]:  # presigned HTTPS URLs that the S3 server serves
        with urllib.request.urlopen(task["data"]["image"]) as response:
            assert response.read() == storage.read_bytes(f"{pool}/{task['data']['tidal-ray-id']}")
    assert all(t["predictions"][0]["result"][0]["value"]["choices"][0] in CLASSES for t in tasks)
    assert storage.exists(f"{export}/label-studio-config.xml")
    assert storage.exists(f"{export}/ground-truth-label-categories.json")

    # A delivery with a class name the campaign does not have: one line, exit 2, nothing written.
    wrong = _label_studio_export(tasks[:1], truth)
    wrong[0]["annotations"][0]["result"][0]["value"]["choices"] = ["purple"]
    (work / "wrong.json").write_text(json.dumps(wrong))
    before = storage.list_files(f"{root}/labeled")
    bad = _cli(["campaign", "import-labels", root, "wrong.json"], work, timeout=120)
    assert bad.returncode == 2 and "unknown class name(s) 'purple'" in bad.stderr and bad.stderr.count("\n") == 1
    assert storage.list_files(f"{root}/labeled") == before

    # Two partial deliveries of Label Studio's export; the cycle moves on once all are in.
    for part, left in [(tasks[:5], "3 still to label"), (tasks[5:], "to continue")]:
        (work / "delivery.json").write_text(json.dumps(_label_studio_export(part, truth)))
        imported = _cli(["campaign", "import-labels", root, "delivery.json"], work, timeout=120)
        assert imported.returncode == 0 and left in imported.stdout, imported.stdout + imported.stderr
    run = _cli(["campaign", "run", root], work)
    assert run.returncode == 0 and "waiting for labels" in run.stdout, run.stdout + run.stderr
    status = storage.read_json(f"{root}/campaign.json")
    assert (status["cycle"], status["step"], status["status"]) == (1, "wait-for-labels", "waiting-for-labels")
    assert storage.read_json(f"{root}/cycles/001/metrics.json")["labeled"] == 20
    assert storage.read_json(f"{root}/cycles/001/selection.json")["rows_excluded"] == 20
    print(f"\nend to end: {time.monotonic() - started:.0f}s")


def test_a_checkpoint_whose_module_cannot_be_imported_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from tidal_ray.train.checkpoint import save_checkpoint
    from tidal_ray.train.config import TrainConfig
    from tidal_ray.train.loop import train_in_process

    module = user_module(tmp_path, monkeypatch)
    x = np.random.default_rng(0).integers(0, 256, size=(8, 3, 16, 16), dtype=np.uint8)
    config = TrainConfig(num_classes=3, input_shape=(3, 16, 16), backbone=f"{module}:factory",
                         feature_layers=("stem", "block"), epochs=1, batch_size=4)
    _, _, session = train_in_process(config, np.arange(8), x, np.arange(8) % 3)
    checkpoint = save_checkpoint(session.last_state, str(tmp_path / "ck"))
    pool = tmp_path / "pool"
    make_pool(str(pool), "synthetic", rows=20, fmt="pixels", shape="3x16x16", num_classes=3)
    (tmp_path / f"{module}.py").unlink()   # scored where the user's module is not
    sys.modules.pop(module, None)
    argv = ["score", "--checkpoint", checkpoint, "--pool", str(pool), "--k", "3", "--out", str(tmp_path / "out"),
            "--in-process"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot import module '{module}'" in err, err
    assert not (tmp_path / "out").exists()
