"""Datasets and image files: every spec kind on small generated files, bad files, shapes, the real zips."""
from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maetok.data import (DatasetError, ImageDecodeError, ShapesDataset, decode_image, load_image_file,
                         make_image_grid, open_dataset, save_image_grid)
from maetok.data import datasets as D
from maetok.data import decoded_cache

RNG = np.random.default_rng(0)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(colour, size=(20, 20), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noise_image(size=(24, 24)) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path


def check_item(item, size):
    image, label = item
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert isinstance(label, int)


# ==============================================================================================================
# Image folders and zips
# ==============================================================================================================
COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def class_files(split: str, per_class: int = 3, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{split}/{name}/{i}.png": png_bytes(solid(colour)) for name, colour in COLOURS.items()
            for i in range(per_class)}


def test_image_folder_with_split_subfolders(tmp_path):
    root = write_tree(tmp_path / "data", {**class_files("train"), **class_files("test", 1),
                                          "train/cat/readme.txt": b"not an image, not a candidate"})
    ds = open_dataset(str(root), "train", image_size=16)
    assert len(ds) == 9 and ds.num_classes == 3 and ds.class_names == ["cat", "dog", "emu"]
    assert [ds[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]  # round-robin: limit keeps classes balanced
    for i in range(len(ds)):
        check_item(ds[i], 16)
        image, label = ds[i]
        expected = torch.tensor(list(COLOURS.values())[label]) / 127.5 - 1
        assert torch.allclose(image[:, 8, 8], expected)
    assert ds.skipped == [] and "3 classes" in ds.describe() and "cat" in ds.describe()
    assert len(open_dataset(str(root), "test", 16)) == 3
    assert [ds_item[1] for ds_item in open_dataset(str(root), "train", 16, limit=3)] == [0, 1, 2]
    with pytest.raises(DatasetError, match="no 'val/' folder"):
        open_dataset(str(root), "val", 16)
    only_test = write_tree(tmp_path / "only-test", class_files("test", 1))
    with pytest.raises(DatasetError, match="no 'train/' folder"):
        open_dataset(str(only_test), "train", 16)


def test_folder_without_split_and_without_classes(tmp_path):
    root = write_tree(tmp_path / "pets", {f"{c}/{i}.png": png_bytes(solid(col)) for c, col in COLOURS.items()
                                          for i in range(2)})
    assert open_dataset(str(root), "train", 8).class_names == ["cat", "dog", "emu"]
    flat = write_tree(tmp_path / "flat", {f"{i}.png": png_bytes(noise_image()) for i in range(4)})
    ds = open_dataset(str(flat), image_size=8)
    assert len(ds) == 4 and ds.num_classes == 1 and {ds[i][1] for i in range(4)} == {0}
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        open_dataset(str(tmp_path / "empty"))


def test_held_out_split_is_test_else_val(tmp_path):
    """ImageNet ships train/ + val/ and no test/: a held-out default must find val/, cheaply and without
    mistaking a class folder for a split."""
    imagenet = write_tree(tmp_path / "imagenet", {**class_files("train"), **class_files("val", 1)})
    assert D.held_out_split(str(imagenet)) == "val"
    both = write_tree(tmp_path / "both", {**class_files("val", 1), **class_files("test", 1)})
    assert D.held_out_split(str(both)) == "test"
    wrapped = write_tree(tmp_path / "wrapped", class_files("val", 1, prefix="imagenet/"))
    assert D.held_out_split(str(wrapped)) == "val"
    tiny = write_zip(tmp_path / "tiny.zip", {**class_files("train", prefix="tiny/"),
                                             **class_files("val", 1, prefix="tiny/")})
    assert D.held_out_split(f"zip:{tiny}") == "val"
    plain = write_tree(tmp_path / "plain", {"val/0.png": png_bytes(solid((1, 2, 3))), "cat/1.png": b""})
    assert D.held_out_split(str(plain)) == "val"  # a top-level val/ is a split, as open_dataset reads it
    assert D.held_out_split(str(tmp_path / "nowhere")) == "test"  # open_dataset then names the missing path
    assert D.held_out_split("shapes") == "test" and D.held_out_split(f"npz:{tmp_path / 'x.npz'}") == "test"
    assert len(open_dataset(str(imagenet), D.held_out_split(str(imagenet)), 8)) == 3


def test_missing_split_names_the_folder_and_the_splits_there(tmp_path):
    imagenet = write_tree(tmp_path / "imagenet", {**class_files("train"), **class_files("val", 1)})
    with pytest.raises(D.SplitNotFoundError) as e:
        open_dataset(str(imagenet), "test", 8)
    message = str(e.value)
    assert message.startswith(f"{imagenet.resolve()}: no 'test/' folder")
    assert "['train', 'val']" in message and "--split val" in message and e.value.available == ["train", "val"]
    zipped = write_zip(tmp_path / "d.zip", {**class_files("train", prefix="d/"), **class_files("val", 1, prefix="d/")})
    with pytest.raises(D.SplitNotFoundError, match=r"zip:.*d\.zip: no 'test/' folder; its split folders are "
                                                   r"\['train', 'val'\]\. Choose one with --split val"):
        open_dataset(f"zip:{zipped}", "test", 8)
    plain = write_tree(tmp_path / "pets", {f"{c}/0.png": png_bytes(solid(col)) for c, col in COLOURS.items()})
    with pytest.raises(D.SplitNotFoundError, match="no split folders at all.*--split train") as e:
        open_dataset(str(plain), "test", 8)
    assert e.value.available == []
    only_val = write_tree(tmp_path / "only-val", class_files("val", 1))
    with pytest.raises(D.SplitNotFoundError, match="no 'train/' folder; its split folders are \\['val'\\]"):
        open_dataset(str(only_val), "train", 8)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"^{tmp_path.resolve() / 'empty'}: no image files") as e:
        open_dataset(str(tmp_path / "empty"), "test", 8)
    assert "'/'" not in str(e.value)


def test_zip_read_in_place_with_wnids_label_order(tmp_path):
    files = {**class_files("train", 2), **class_files("val", 1), "wnids.txt": b"emu\ncat\ndog\n",
             "__MACOSX/train/cat/._0.png": b"resource fork junk"}
    path = write_zip(tmp_path / "pets.zip", files)
    ds = open_dataset(f"zip:{path}", "train", image_size=12)
    assert ds.class_names == ["emu", "cat", "dog"] and len(ds) == 6
    for image, label in ds:
        expected = torch.tensor(COLOURS[ds.class_names[label]]) / 127.5 - 1
        assert torch.allclose(image[:, 6, 6], expected)
    assert len(open_dataset(str(path), "val", 12)) == 3  # a .zip path works without the prefix
    assert ds.where == f"zip:{path}"


def test_zip_with_a_wrapping_folder_and_the_official_tiny_imagenet_val_layout(tmp_path):
    files = {f"tiny/train/{c}/images/{c}_{i}.JPEG": png_bytes(solid(col)) for c, col in COLOURS.items()
             for i in range(2)}
    files["tiny/wnids.txt"] = b"dog\nemu\ncat\n"
    files.update({f"tiny/val/images/val_{i}.JPEG": png_bytes(solid(col)) for i, col in enumerate(COLOURS.values())})
    files["tiny/val/val_annotations.txt"] = b"val_0.JPEG\tcat\t0\t0\t1\t1\nval_1.JPEG\tdog\t0\nval_2.JPEG\temu\t0\n"
    path = write_zip(tmp_path / "tiny.zip", files)
    train = open_dataset(f"zip:{path}", "train", 8)
    assert train.class_names == ["dog", "emu", "cat"] and len(train) == 6
    val = open_dataset(f"zip:{path}", "val", 8)
    for image, label in val:
        expected = torch.tensor(COLOURS[val.class_names[label]]) / 127.5 - 1
        assert torch.allclose(image[:, 4, 4], expected)
    assert sorted(label for _, label in val) == [0, 1, 2]


def test_lazy_decoding_reads_the_same_images(tmp_path):
    path = write_zip(tmp_path / "pets.zip", class_files("train", 2))
    eager = open_dataset(f"zip:{path}", "train", 8, decode="eager")
    lazy = open_dataset(f"zip:{path}", "train", 8, decode="lazy")
    assert type(lazy).__name__ == "LazyImageDataset" and len(lazy) == len(eager)
    for i in range(len(eager)):
        assert torch.equal(eager[i][0], lazy[i][0]) and eager[i][1] == lazy[i][1]
    clone = pickle.loads(pickle.dumps(lazy))  # as DataLoader workers receive it: the zip handle must not travel
    assert torch.equal(clone[3][0], lazy[3][0])
    loader = torch.utils.data.DataLoader(lazy, batch_size=3, num_workers=1)  # a worker reopens the zip
    images, labels = next(iter(loader))
    assert torch.equal(images[1], eager[1][0]) and labels.tolist() == [eager[i][1] for i in range(3)]


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    # 144x48: blue | green | red thirds; the centred 48x48 crop is all green.
    wide = np.zeros((48, 144, 3), np.uint8)
    wide[:, :48, 2], wide[:, 48:96, 1], wide[:, 96:, 0] = 255, 255, 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = load_image_file(tmp_path / "wide.png", 16)
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image[:, 2:-2, 2:-2], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1), atol=0.02)
    noise_image((5, 3)).save(tmp_path / "tiny.png")  # smaller than the crop: upscaled
    assert load_image_file(tmp_path / "tiny.png", 32).shape == (3, 32, 32)
    assert load_image_file(tmp_path / "wide.png").shape == (3, 48, 144)  # no size: as stored
    with pytest.raises(FileNotFoundError):
        load_image_file(tmp_path / "absent.png", 16)


def test_random_flip_uses_the_torch_generator(tmp_path):
    ds = ShapesDataset("train", 16, length=20, random_flip=True)
    plain = ShapesDataset("train", 16, length=20)
    torch.manual_seed(3)
    flipped = [not torch.equal(ds[i][0], plain[i][0]) for i in range(20)]
    assert 0 < sum(flipped) < 20
    torch.manual_seed(3)
    for i in range(20):
        image = ds[i][0]
        assert torch.equal(image, plain[i][0].flip(-1) if flipped[i] else plain[i][0])


# ==============================================================================================================
# Bad and unusual files
# ==============================================================================================================
def bad_and_odd_files() -> tuple[dict[str, bytes], set[str]]:
    good_png = png_bytes(noise_image())
    corrupt = bytearray(good_png)
    corrupt[60:200] = bytes(140)
    palette = noise_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = solid(3, mode="P")
    transparent_palette.putpalette([10, 20, 30] * 256)  # index 3 is transparent below, whatever its colour
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    files = {
        "ok.png": good_png,
        "corrupt.png": bytes(corrupt),
        "truncated.jpg": png_bytes(noise_image((64, 64)), "JPEG")[:400],
        "empty.png": b"",
        "notes.jpg": b"this is a text file with an image name\n",
        "grey.png": png_bytes(noise_image().convert("L")),
        "bilevel.png": png_bytes(noise_image().convert("1")),
        "palette.gif": png_bytes(palette, "GIF"),
        "palette_transparent.png": png_bytes(transparent_palette, transparency=3),
        "rgba.png": png_bytes(Image.fromarray(rgba, "RGBA")),
        "grey_alpha.png": png_bytes(Image.fromarray(rgba[..., :2].copy(), "LA")),
        "cmyk.jpg": png_bytes(solid((255, 0, 0, 0), mode="CMYK"), "JPEG"),  # pure cyan ink
        "sixteen_bit.png": png_bytes(Image.fromarray(np.full((20, 20), 32768, np.uint16))),
        "tiny.png": png_bytes(noise_image((3, 2))),
        "float.tif": png_bytes(Image.fromarray(np.full((8, 8), 0.5, np.float32), "F"), "TIFF"),
    }
    unreadable = {"corrupt.png", "truncated.jpg", "empty.png", "notes.jpg"}
    return {f"train/things/{name}": data for name, data in files.items()}, unreadable


@pytest.mark.parametrize("decode", ["eager", "lazy"])
@pytest.mark.parametrize("container", ["folder", "zip"])
def test_bad_files_are_skipped_and_listed_odd_ones_converted(tmp_path, caplog, decode, container):
    files, unreadable = bad_and_odd_files()
    spec = str(write_tree(tmp_path / "odd", files)) if container == "folder" else \
        f"zip:{write_zip(tmp_path / 'odd.zip', files)}"
    with caplog.at_level(logging.WARNING, logger="maetok.data"):
        ds = open_dataset(spec, "train", image_size=16, decode=decode)
        seen = [ds[i] for i in range(len(ds))]  # lazy datasets meet their bad files when reading
    for item in seen:
        check_item(item, 16)
    skipped = {Path(path.split(":")[-1]).name for path, _ in ds.skipped}
    assert skipped == unreadable
    assert all(reason for _, reason in ds.skipped)
    assert "notes.jpg" in caplog.text
    if decode == "eager":
        assert len(ds) == len(files) - len(unreadable) and "4 unreadable skipped" in ds.describe()


def test_strict_mode_names_the_first_unreadable_file(tmp_path):
    files, _ = bad_and_odd_files()
    root = write_tree(tmp_path / "odd", files)
    with pytest.raises(ImageDecodeError, match="corrupt.png"):
        open_dataset(str(root), "train", 16, strict=True)
    lazy = open_dataset(str(root), "train", 16, strict=True, decode="lazy")
    with pytest.raises(ImageDecodeError, match=r"(corrupt.png|truncated.jpg|empty.png|notes.jpg)"):
        [lazy[i] for i in range(len(lazy))]


def test_conversion_conventions(tmp_path):
    files, _ = bad_and_odd_files()
    root = write_tree(tmp_path / "odd", files)
    load = lambda name: load_image_file(root / "train" / "things" / name)  # noqa: E731
    rgba = load("rgba.png")
    assert torch.allclose(rgba[:, 5, 2], torch.tensor([1.0, -1.0, -1.0]))   # opaque red stays red
    assert torch.allclose(rgba[:, 5, 15], torch.ones(3))                       # transparent -> white
    assert torch.allclose(load("palette_transparent.png"), torch.ones(3, 20, 20))
    sixteen = load("sixteen_bit.png")                                          # 32768/65535 of full scale
    assert torch.allclose(sixteen, torch.full_like(sixteen, 128 / 127.5 - 1), atol=1e-6)
    grey = load("grey.png")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    cyan = load("cmyk.jpg")[:, 10, 10]
    assert cyan[0] < -0.8 and cyan[1] > 0.8 and cyan[2] > 0.8
    assert torch.allclose(load("float.tif"), torch.full((3, 8, 8), 128 / 127.5 - 1), atol=1e-6)


MODES = ["RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "YCbCr"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 70), height=st.integers(1, 70), mode=st.sampled_from(MODES),
       size=st.sampled_from([8, 16, 32]), fmt=st.sampled_from(["PNG", "TIFF", "JPEG"]), seed=st.integers(0, 99))
def test_any_image_decodes_to_rgb_in_range(width, height, mode, size, fmt, seed):
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode in ("I;16", "I"):
        img = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16 if mode == "I;16"
                                                                               else np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.random((height, width), dtype=np.float32))
    else:
        img = base.convert(mode)
    supported = {"PNG": {"RGB", "L", "1", "P", "RGBA", "LA", "I;16"},
                 "JPEG": {"RGB", "L", "CMYK", "YCbCr"},
                 "TIFF": {"RGB", "L", "1", "P", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"}}[fmt]
    data = png_bytes(img, fmt) if mode in supported else png_bytes(img.convert("RGBA"), "PNG")
    out = decode_image(data, size, "generated")
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    tensor = torch.from_numpy(out).permute(2, 0, 1).float() / 127.5 - 1
    assert tensor.min() >= -1 and tensor.max() <= 1


# ==============================================================================================================
# CIFAR batches, npz
# ==============================================================================================================
def write_cifar_batches(root: Path, per_batch: int = 4, protocol: int = 2) -> dict[str, tuple]:
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.random.default_rng(i).integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": b"batch", b"labels": labels, b"data": data,
                 b"filenames": [f"f{j}.png".encode() for j in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    meta = {b"label_names": [n.encode() for n in "a b c d e f g h i j".split()], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return written


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_python_batches(tmp_path, protocol):
    written = write_cifar_batches(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = open_dataset(f"cifar:{tmp_path}", "train", 32)
    assert len(train) == 20 and train.class_names == list("abcdefghij")
    data, labels = written["data_batch_2"]
    image, label = train[5]  # batch 2, row 1
    assert label == labels[1]
    # Planar R, G, B rows of 32x32 pixels.
    assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(data[1].reshape(3, 32, 32)))
    test = open_dataset(f"cifar:{tmp_path / 'cifar-10-batches-py'}", "test", 16)
    assert len(test) == 4 and test[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetError, match="split"):
        open_dataset(f"cifar:{tmp_path}", "val")


def test_cifar_tarball_read_in_place(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=2)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert len(open_dataset(f"cifar:{tar_path}", "test", 32)) == 2


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_unpickler_refuses_anything_but_plain_data(tmp_path):
    root = tmp_path / "evil"
    write_cifar_batches(root, per_batch=2)
    marker = tmp_path / "pwned"
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load"):
        open_dataset(f"cifar:{root}", "test")
    assert not marker.exists()
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), object), b"labels": [0]}))
    with pytest.raises(DatasetError, match="refusing"):
        open_dataset(f"cifar:{root}", "test")


def test_npz_sample_batches(tmp_path):
    images = RNG.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images, np.arange(6) % 3)
    ds = open_dataset(f"npz:{tmp_path / 'samples.npz'}", image_size=8)
    assert len(ds) == 6 and ds.num_classes == 3 and ds[4][1] == 1
    assert torch.equal(((ds[2][0] + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(images[2]).permute(2, 0, 1))
    assert open_dataset(str(tmp_path / "samples.npz"), image_size=16, limit=2)[1][0].shape == (3, 16, 16)
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2))
    unlabeled = open_dataset(f"npz:{tmp_path / 'nchw.npz'}", image_size=8)
    assert not unlabeled.has_labels and unlabeled.num_classes == 1
    assert torch.equal(unlabeled[2][0], ds[2][0])
    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(DatasetError, match="uint8"):
        open_dataset(f"npz:{tmp_path / 'float.npz'}")


# ==============================================================================================================
# The decoded-array cache
# ==============================================================================================================
def test_decoded_arrays_are_cached_and_invalidated(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "pets.zip", class_files("train", 2))
    cache = tmp_path / "cache"
    first = open_dataset(f"zip:{path}", "train", 8, cache_dir=cache)
    assert first.cache_path is not None and first.cache_path.is_file() and "cached at" in first.describe()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(decoded_cache, "decode_image", no_decoding)
        again = open_dataset(f"zip:{path}", "train", 8, cache_dir=cache)
        assert again.cache_path == first.cache_path
        assert all(torch.equal(again[i][0], first[i][0]) and again[i][1] == first[i][1] for i in range(len(first)))
    assert open_dataset(f"zip:{path}", "train", 16, cache_dir=cache).cache_path != first.cache_path

    write_zip(path, class_files("train", 3))  # the source changed: a new key
    changed = open_dataset(f"zip:{path}", "train", 8, cache_dir=cache)
    assert len(changed) == 9 and changed.cache_path != first.cache_path

    root = write_tree(tmp_path / "folder", class_files("train", 1))
    folder = open_dataset(str(root), "train", 8, cache_dir=cache)
    (root / "train" / "cat" / "0.png").write_bytes(png_bytes(solid((9, 9, 9), (21, 20))))
    assert open_dataset(str(root), "train", 8, cache_dir=cache).cache_path != folder.cache_path


def test_without_an_explicit_cache_small_sources_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path / "default-cache"))
    path = write_zip(tmp_path / "pets.zip", class_files("train", 2))
    assert open_dataset(f"zip:{path}", "train", 8).cache_path is None
    assert not (tmp_path / "default-cache").exists()


# ==============================================================================================================
# shapes
# ==============================================================================================================
def test_shapes_are_deterministic_balanced_and_varied():
    ds = open_dataset("shapes", "train", 32, limit=40)
    assert isinstance(ds, ShapesDataset) and len(ds) == 40 and ds.num_classes == 10
    assert len(set(ds.class_names)) == 10 and "circle" in ds.class_names
    again = ShapesDataset("train", 32)
    for i in (0, 7, 39):
        check_item(ds[i], 32)
        assert torch.equal(ds[i][0], again[i][0]) and ds[i][1] == again[i][1]
    assert np.bincount([ds[i][1] for i in range(40)]).tolist() == [4] * 10
    assert not torch.equal(ds[0][0], ShapesDataset("test", 32)[0][0])
    images = torch.stack([ds[i][0] for i in range(40)])
    assert images.flatten(1).std(0).mean() > 0.2                   # items differ from one another
    assert (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).min() > 0.5  # every item has contrast
    assert len(ShapesDataset("train")) == 50_000 and len(ShapesDataset("test")) == 10_000
    big = ShapesDataset("val", 64, length=3)
    check_item(big[2], 64)
    assert "shapes" in big.describe()
    with pytest.raises(DatasetError, match=r"shapes: no split 'tset'; choose one of \['test', 'train', 'val'\]"):
        open_dataset("shapes", "tset", 32)  # a typo must not give yet another random set


def test_shapes_class_is_visible_in_the_image():
    # The mean image of a class differs from another class's: a minimal check that labels carry signal.
    ds = ShapesDataset("train", 32, length=400)
    coverage = {}
    for label in (0, 5):  # circle (filled) vs ring (hollow centre)
        masks = []
        for i in range(label, 400, 10):
            image = ds.image_uint8(i).astype(np.float32)
            masks.append(np.abs(image - np.median(image.reshape(-1, 3), 0)).sum(-1) > 60)
        coverage[label] = np.mean(masks)
    assert coverage[0] > coverage[5]


# ==============================================================================================================
# Grids
# ==============================================================================================================
def test_image_grid(tmp_path):
    images = torch.stack([torch.full((3, 6, 6), v) for v in (-1.0, -0.5, 0.0, 0.5, 2.0)])
    grid = make_image_grid(images, nrow=3, padding=1)
    assert grid.size == (3 * 7 + 1, 2 * 7 + 1) and grid.mode == "RGB"
    pixels = np.asarray(grid)
    assert pixels[1, 1].tolist() == [0, 0, 0] and pixels[8, 8 + 7].tolist() == [255, 255, 255]  # 2.0 clamps
    assert pixels[1, 8].tolist() == [64] * 3  # (-0.5 + 1) * 127.5 rounds to 64
    out = save_image_grid(images, tmp_path / "grids" / "g.png", nrow=5)
    assert Image.open(out).size == (5 * 8 + 2, 10)


# ==============================================================================================================
# The real shared data (read in place, a few items only)
# ==============================================================================================================
def test_shared_cifar10_zip(shared_dir):
    path = shared_dir / "data" / "cifar10-jpeg.zip"
    if not path.is_file():
        pytest.skip("cifar10-jpeg.zip absent")
    ds = open_dataset(f"zip:{path}", "test", 32, limit=20)
    assert ds.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"]
    assert sorted(ds[i][1] for i in range(20)) == sorted(list(range(10)) * 2)
    check_item(ds[0], 32)
    assert ds[0][0].std() > 0.05


def test_shared_tiny_imagenet_zip(shared_dir):
    path = shared_dir / "data" / "tiny-imagenet-200-subset.zip"
    if not path.is_file():
        pytest.skip("tiny-imagenet-200-subset.zip absent")
    ds = open_dataset(f"zip:{path}", "val", 64, limit=4)
    assert ds.num_classes == 200 and ds.class_names[0].startswith("n")
    assert [ds[i][1] for i in range(4)] == [0, 1, 2, 3]
    check_item(ds[3], 64)


def test_an_unfinished_latent_cache_is_finished_only_with_the_same_request(tmp_path: Path):
    """Shards are resumed by name: finishing a cache with another tokenizer (or other data) would mix them."""
    from maetok.config import TokenizerConfig
    from maetok.data.latents import LatentDataset, cache_latents
    from maetok.tokenizer import MAETok

    def tok(seed: int):
        torch.manual_seed(seed)
        return MAETok(TokenizerConfig(image_size=16, patch_size=4, latent_tokens=4, latent_dim=4, enc_width=32,
                                      enc_depth=1, enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2, aux_targets=[],
                                      latent_std=1.0 + seed))
    data = open_dataset("shapes", "train", 16, limit=12)
    out = cache_latents(tok(0), data, tmp_path / "c", shard_size=5, flip=False, progress=False)
    (out / "meta.json").unlink()  # as if killed before the end
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(DatasetError, match="unfinished latent cache of another request .differs in .'tokenizer_config'"):
        cache_latents(tok(1), data, out, shard_size=5, flip=False, progress=False)
    with pytest.raises(DatasetError, match=r"differs in \['count'"):
        cache_latents(tok(0), open_dataset("shapes", "train", 16, limit=11), out, shard_size=5, flip=False,
                      progress=False)
    cache_latents(tok(0), data, out, shard_size=5, flip=False, progress=False)  # the same request: finished
    assert len(LatentDataset(out)) == 12
