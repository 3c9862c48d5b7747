"""Odd data folders: file names that are not UTF-8, broken and looping links, non-finite pixels, and a torture
folder with every kind of odd entry at once, read directly and through training, `latents cache` and `eval`."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maetok.cli import main
from maetok.data import ImageDecodeError, decode_image, open_dataset
from maetok.data import datasets as D
from maetok.data.layout import printable


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def image_bytes(colour=(200, 30, 30), size=(6, 6)) -> bytes:
    return encoded(Image.new("RGB", size, colour), "PNG")


def write(path: Path | bytes, data: bytes) -> None:
    path = Path(os.fsdecode(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def two_classes(root: Path, per_class: int = 3) -> set[tuple[str, int]]:
    """train/a/*.png and train/b/*.png; the (file, label) pairs a reader must find."""
    for label, name in enumerate("ab"):
        for i in range(per_class):
            write(root / "train" / name / f"{i}.png", image_bytes((60 * label, 10 * i, 0)))
    return {(f"train/{name}/{i}.png", label) for label, name in enumerate("ab") for i in range(per_class)}


def reads_without_permission() -> bool:
    """Whether this process reads a file whose permissions forbid it (root does, by CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as folder:
        locked = Path(folder) / "locked"
        locked.write_bytes(b"x")
        locked.chmod(0)
        try:
            locked.read_bytes()
            return True
        except PermissionError:
            return False


READS_ANY_FILE = reads_without_permission()


def pairs(ds) -> set[tuple[str, int]]:
    return set(zip(ds.files, ds.labels.tolist()))


@pytest.fixture
def train_log(tmp_path):
    """A file handler like train.log's (the locale's encoding, strict), on the data logger."""
    path = tmp_path / "train.log"
    handler = logging.FileHandler(path)
    logger = logging.getLogger("maetok.data")
    logger.addHandler(handler)
    yield path
    logger.removeHandler(handler)
    handler.close()


# ==============================================================================================================
# Regression tests, one per reported case
# ==============================================================================================================
@pytest.mark.parametrize("cache", [False, True])
def test_non_utf8_file_names_are_read_cached_and_logged(tmp_path, train_log, capsys, cache):
    root = tmp_path / "odd"
    expected = two_classes(root)
    write(os.fsencode(root / "train" / "a") + b"/caf\xe9.png", image_bytes((1, 2, 3)))
    write(os.fsencode(root / "train" / "b") + b"/bad-\xff.png", b"text, not an image")
    write(os.fsencode(root / "train") + b"/z\xe9/0.png", image_bytes((4, 5, 6)))  # a class folder's name too
    expected |= {(os.fsdecode(b"train/a/caf\xe9.png"), 0), (os.fsdecode(b"train/z\xe9/0.png"), 2)}
    ds = open_dataset(str(root), "train", 8, cache_dir=tmp_path / "cache" if cache else None)
    assert pairs(ds) == expected and len(ds) == len(expected)
    assert ds.class_names == ["a", "b", "z\\xe9"] and "z\\xe9" in ds.describe()
    logging.getLogger("maetok.data").warning("%s", ds.describe())
    assert (ds.cache_path is not None) == cache
    assert "Logging error" not in capsys.readouterr().err
    logged = train_log.read_text()
    assert logged.count("bad-\\xff.png") == 1 and "\\xff" in ds.skipped[0][0]
    if cache:  # read back from the cache: the same files, the bad one named again
        again = open_dataset(str(root), "train", 8, cache_dir=tmp_path / "cache")
        assert again.cache_path == ds.cache_path and pairs(again) == expected
        assert train_log.read_text().count("bad-\\xff.png") == 2


@pytest.mark.parametrize("cache", [False, True])
def test_broken_file_links_are_skipped_and_named_with_the_cache_too(tmp_path, caplog, cache):
    root = tmp_path / "odd"
    expected = two_classes(root)
    os.symlink("nothing-here.png", root / "train" / "a" / "dangling.png")
    os.symlink("loop.png", root / "train" / "b" / "loop.png")
    with caplog.at_level(logging.WARNING, logger="maetok.data"):
        ds = open_dataset(str(root), "train", 8, cache_dir=tmp_path / "cache" if cache else None)
    assert pairs(ds) == expected
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["dangling.png", "loop.png"]
    assert caplog.text.count("dangling.png") == 1 and caplog.text.count("loop.png") == 1


def test_a_folder_link_loop_neither_duplicates_nor_mislabels(tmp_path, caplog):
    root = tmp_path / "odd"
    expected = two_classes(root, per_class=4)
    os.symlink("..", root / "train" / "a" / "loop")  # back up to train/: unguarded, b's images again as class a
    os.symlink("../b/0.png", root / "train" / "a" / "alias.png")  # an image reached twice: used once, as b's
    with caplog.at_level(logging.WARNING, logger="maetok.data"):
        ds = open_dataset(str(root), "train", 8)
    assert pairs(ds) == expected and len(ds) == 8
    assert caplog.text.count("train/a/loop") == 1 and caplog.text.count("train/a/alias.png") == 1


def test_links_to_folders_and_files_elsewhere_are_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "c" / "x.png", image_bytes((0, 0, 200)))
    write(elsewhere / "single.png", image_bytes((0, 200, 0)))
    root = tmp_path / "odd"
    expected = two_classes(root)
    os.symlink(elsewhere / "c", root / "train" / "c")
    os.symlink(elsewhere / "single.png", root / "train" / "b" / "linked.png")
    ds = open_dataset(str(root), "train", 8)
    assert pairs(ds) == expected | {("train/c/x.png", 2), ("train/b/linked.png", 1)}


def test_non_finite_float_pixels_are_refused(tmp_path):
    nan = encoded(Image.fromarray(np.full((6, 6), np.nan, np.float32), "F"), "TIFF")
    with pytest.raises(ImageDecodeError, match=r"nan\.tif: .*non-finite"):
        decode_image(nan, 8, "nan.tif")
    root = tmp_path / "odd"
    expected = two_classes(root)
    write(root / "train" / "a" / "nan.tif", nan)
    ds = open_dataset(str(root), "train", 8)
    assert pairs(ds) == expected and [Path(p).name for p, _ in ds.skipped] == ["nan.tif"]


@pytest.mark.skipif(READS_ANY_FILE, reason="this user (root) reads files whatever their permissions")
def test_a_file_without_read_permission_is_skipped_and_named(tmp_path, caplog):
    root = tmp_path / "odd"
    expected = two_classes(root)
    locked = root / "train" / "a" / "locked.png"
    write(locked, image_bytes())
    locked.chmod(0)
    with caplog.at_level(logging.WARNING, logger="maetok.data"):
        ds = open_dataset(str(root), "train", 8, cache_dir=tmp_path / "cache")
    assert pairs(ds) == expected and caplog.text.count("locked.png") == 1


def test_an_image_far_longer_than_wide_is_resampled_in_bounded_memory():
    """1 x 300,000 pixels enlarged whole to 64 wide would be 1.2 G pixels (3.7 GB); only the crop is resampled."""
    out = decode_image(image_bytes((9, 99, 199), (1, 300_000)), 64, "long.png")
    assert out.shape == (64, 64, 3) and (np.abs(out.astype(int) - (9, 99, 199)) <= 1).all()


# ==============================================================================================================
# The torture folder
# ==============================================================================================================

def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims 1.6 G pixels (Pillow refuses past 2 x MAX_IMAGE_PIXELS), in a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000)))
            + chunk(b"IEND", b""))


def float_tiff(value: float, where: tuple[int, int] | None = None) -> bytes:
    pixels = np.full((6, 6), 0.25 if where else value, np.float32)
    if where:
        pixels[where] = value
    return encoded(Image.fromarray(pixels, "F"), "TIFF")


def good_images() -> dict[str, bytes]:
    """Odd but readable images: each must be used once, under its folder's class."""
    rgb = Image.new("RGB", (6, 6), (200, 30, 30))
    png = encoded(rgb, "PNG")
    palette = Image.new("P", (6, 6), 3)
    palette.putpalette([10, 20, 30] * 256)
    frames = [Image.new("P", (6, 6), i) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return {
        "good-rgb.png": png,
        "good-1x1.png": encoded(Image.new("RGB", (1, 1), (5, 5, 5)), "PNG"),
        "good-1x5000.png": encoded(Image.new("RGB", (1, 5000), (9, 9, 9)), "PNG"),
        "good-16bit.png": encoded(Image.fromarray(np.full((6, 6), 40000, np.uint16)), "PNG"),
        "good-cmyk.jpg": encoded(Image.new("CMYK", (6, 6), (255, 0, 0, 0)), "JPEG"),
        "good-grey.png": encoded(Image.new("L", (6, 6), 77), "PNG"),
        "good-palette-transparent.png": encoded(palette, "PNG", transparency=3),
        "good-animated.gif": animated.getvalue(),
        "good-exif-rotated.jpg": encoded(Image.new("RGB", (4, 8), (0, 90, 0)), "JPEG", exif=exif.tobytes()),
        "good-rgba.png": encoded(Image.new("RGBA", (6, 6), (0, 0, 255, 100)), "PNG"),
        "good-float.tif": float_tiff(0.5),
        "good-bitmap.bmp": encoded(rgb, "BMP"),
        "good-UPPER.PNG": png,
        "good-png-named.jpg": png,
        "good-folder.jpg/inner.png": png,  # a folder named like an image: a folder
    }


def bad_files() -> dict[str, bytes]:
    """Files named like images that are not readable ones: each must be skipped and named once."""
    jpeg = encoded(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG")
    png = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)), "PNG")
    corrupt = bytearray(png)
    corrupt[60:200] = bytes(140)
    return {
        "bad-zero.png": b"",
        "bad-truncated.jpg": jpeg[:200],
        "bad-truncated.png": png[: len(png) // 2],
        "bad-text.jpg": b"a text file, named like an image\n",
        "bad-corrupt.png": bytes(corrupt),
        "bad-bomb.png": bomb_png(),
        "bad-nan.tif": float_tiff(np.nan),
        "bad-inf.tif": float_tiff(np.inf, where=(2, 3)),
        "bad-new\nline.jpg": b"a line break in its name: named on one line all the same",
    }


def torture_folder(root: Path, elsewhere: Path) -> tuple[set[tuple[str, int]], list[str]]:
    """(the (file, label) pairs a reader must find, the texts that name each bad entry in a log)."""
    expected, named = set(), []
    for label, cls in enumerate("ab"):
        for name, data in good_images().items():
            write(root / "train" / cls / name, data)
            expected.add((f"train/{cls}/{name}", label))
    for name, data in bad_files().items():
        write(root / "train" / "a" / name, data)
        named.append(printable(f"train/a/{name}"))
    for name, data in ((b"good-caf\xe9.png", image_bytes()), (b"bad-\xff\xfe.jpg", b"text")):  # not UTF-8
        write(os.fsencode(root / "train" / "b") + b"/" + name, data)
    expected.add((os.fsdecode(b"train/b/good-caf\xe9.png"), 1))
    named.append(printable(os.fsdecode(b"train/b/bad-\xff\xfe.jpg")))
    write(root / "train" / "b" / "good-new\nline.png", image_bytes())
    expected.add(("train/b/good-new\nline.png", 1))
    write(elsewhere / "c" / "good-linked-folder.png", image_bytes())
    os.symlink(elsewhere / "c", root / "train" / "c")
    expected.add(("train/c/good-linked-folder.png", 2))
    a = root / "train" / "a"
    os.symlink("nothing-here.png", a / "bad-dangling.png")
    os.symlink("bad-self-loop.png", a / "bad-self-loop.png")
    os.symlink("..", a / "bad-loop-folder")
    os.symlink("../b/good-rgb.png", a / "bad-second-path.png")
    os.mkfifo(a / "bad-fifo.png")
    named += [f"train/a/{name}" for name in ("bad-dangling.png", "bad-self-loop.png", "bad-loop-folder",
                                             "bad-second-path.png", "bad-fifo.png")]
    if not READS_ANY_FILE:  # root reads files whatever their permissions: there, this entry is left out
        write(a / "bad-no-permission.png", image_bytes())
        (a / "bad-no-permission.png").chmod(0)
        named.append("train/a/bad-no-permission.png")
    write(a / ".hidden.png", b"hidden: never read")
    write(a / "notes.txt", b"not an image name: never read")
    return expected, named


def assert_each_named_once(log_text: str, named: list[str]) -> None:
    """Each bad entry on exactly one line; no other line names a good image, a hidden file or a non-image."""
    lines = log_text.splitlines()
    assert {text: sum(text in line for line in lines) for text in named} == {text: 1 for text in named}, log_text
    others = [line for line in lines if not any(text in line for text in named)]
    assert not [line for line in others if "good-" in line or "hidden" in line or "notes.txt" in line], log_text


@pytest.fixture
def torture(tmp_path):
    root = tmp_path / "torture"
    expected, named = torture_folder(root, tmp_path / "elsewhere")
    return root, expected, named


@pytest.mark.parametrize("cache", [False, True])
def test_torture_folder_opened_directly(tmp_path, torture, train_log, capsys, cache):
    root, expected, named = torture
    cache_dir = tmp_path / "cache" if cache else None
    ds = open_dataset(str(root), "train", 8, cache_dir=cache_dir)
    assert pairs(ds) == expected and len(ds) == len(expected)
    assert len(ds.skipped) == len(named) - 3  # not the folder loop, the second path, the FIFO: named by listing
    assert_each_named_once(train_log.read_text(), named)
    if cache:  # a second open reads the cache and names the same entries again
        first = train_log.read_text()
        again = open_dataset(str(root), "train", 8, cache_dir=cache_dir)
        assert again.cache_path == ds.cache_path and pairs(again) == expected
        assert_each_named_once(train_log.read_text()[len(first):], named)
    for image, _ in (ds[i] for i in range(len(ds))):
        assert image.shape == (3, 8, 8) and image.isfinite().all()
    assert "Logging error" not in capsys.readouterr().err


# Encoder layer scale 0.1 and a large lr as in test_cli_pipeline: a tiny tokenizer worth two steps.
TINY_TOKENIZER = ["model.image_size=16", "data.image_size=16", "model.patch_size=4", "model.latent_tokens=4",
                  "model.latent_dim=4", "model.enc_width=16", "model.enc_heads=1", "model.enc_depth=1",
                  "model.dec_width=16", "model.dec_heads=1", "model.dec_depth=1", "model.aux_width=16",
                  "model.aux_heads=1", "model.aux_depth=1", "model.layerscale_init=0.1", "train.batch_size=8",
                  "train.log_every=1", "train.image_every=1000", "train.ckpt_every=1000", "stats_batches=1",
                  "train.steps=2", "train.optim.warmup_steps=0", "train.optim.lr=0.01"]
FEATURES = "resnet20-cifar10-random"  # random weights: the code path of a metric, no shared files needed


def cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.mark.parametrize("cache", [False, True])
def test_torture_folder_through_training_latents_and_eval(tmp_path, torture, caplog, capsys, monkeypatch,
                                                          maetok_logger_as_found, cache):
    root, expected, named = torture
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path / "default-cache"))
    if cache:  # every command caches its decoded array (the CLI's commands other than training take no cache_dir)
        monkeypatch.setattr(D, "CACHE_MIN_IMAGES", 1)
    data = [f"data.spec={root}", "data.split=train"] + ([f"data.cache_dir={tmp_path / 'cache'}"] if cache else [])
    code, out = cli("tokenizer", "train", "--config", "cpu-32", "--out", tmp_path / "tok", "--device", "cpu",
                    *TINY_TOKENIZER, *data)
    assert code == 0 and json.loads(out)["finished"], out
    assert_each_named_once((tmp_path / "tok" / "train.log").read_text(), named)
    model = tmp_path / "tok" / "model"

    caplog.clear()
    code, out = cli("latents", "cache", "--tokenizer", model, "--data", root, "--out", tmp_path / "latents",
                    "--batch-size", 8, "--device", "cpu")
    assert code == 0 and f"cached {len(expected)} latents" in out
    assert_each_named_once(caplog.text, named)

    caplog.clear()
    code, out = cli("eval", "recon", "--tokenizer", model, "--ref", root, "--split", "train", "--features", FEATURES,
                    "--device", "cpu")
    assert code == 0 and f"psnr@{len(expected)}" in json.loads(out)["metrics"], out
    assert_each_named_once(caplog.text, named)

    caplog.clear()
    np.savez(tmp_path / "samples.npz", np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), np.uint8))
    code, out = cli("eval", "gen", "--samples", tmp_path / "samples.npz", "--ref", root, "--split", "train",
                    "--features", FEATURES, "--device", "cpu")
    assert code == 0 and json.loads(out)["reference"]["n"] == len(expected), out
    assert_each_named_once(caplog.text, named)
    assert "Logging error" not in capsys.readouterr().err
