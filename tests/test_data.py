"""Tests for train.data: every source layout, the cache, the download, errors, augmentation.

All data is made here, tiny, in temporary folders; the download goes to a local server.
"""

import functools
import hashlib
import http.server
import io
import os
import pickle
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from train import data, data_readers
from train.data import DatasetError

CLASSES = ("cat", "airplane", "dog")  # folder names; labels follow sorted order
SORTED_CLASSES = ("airplane", "cat", "dog")


def _random_images(seed: int, count: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format={"jpg": "JPEG"}.get(fmt, fmt))
    return buffer.getvalue()


def _assert_same(actual: data.Dataset, expected: data.Dataset) -> None:
    assert actual.class_names == expected.class_names
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# --- fake CIFAR-10 in the official cifar-10-batches-py layout -------------------------


def _write_batches(folder: Path, per_batch: int = 3) -> data.Dataset:
    """Writes a tiny cifar-10-batches-py folder and returns what it should load as."""
    folder.mkdir(parents=True)
    images = _random_images(0, 6 * per_batch)
    labels = np.arange(6 * per_batch, dtype=np.int32) % 10
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
    for index, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        part = slice(index * per_batch, (index + 1) * per_batch)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels[part].tolist(),
            b"data": rows[part],
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    train = 5 * per_batch
    return data.Dataset(
        images[:train], labels[:train], images[train:], labels[train:], data.CIFAR10_CLASSES
    )


@pytest.fixture(scope="module")
def batches(tmp_path_factory) -> tuple[Path, data.Dataset]:
    root = tmp_path_factory.mktemp("official")
    return root, _write_batches(root / "cifar-10-batches-py")


@pytest.fixture(scope="module")
def official_tar_gz(batches) -> Path:
    root, _ = batches
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path


def test_batches_folder_and_its_parent(batches):
    root, expected = batches
    _assert_same(data.load_cifar10(root / "cifar-10-batches-py"), expected)
    _assert_same(data.load_cifar10(str(root)), expected)


def test_official_tar_gz(official_tar_gz, batches, tmp_path):
    _, expected = batches
    dataset = data.load_cifar10(official_tar_gz, cache_dir=tmp_path)
    _assert_same(dataset, expected)
    assert dataset.num_classes == 10


# --- image folders and their archives -------------------------------------------------


def _write_image_folder(root: Path, fmt: str = "png") -> data.Dataset:
    """Writes train/<class>/ and test/<class>/ images; returns the expected dataset."""
    arrays = {}
    for seed, (split, count) in enumerate((("train", 3), ("test", 2))):
        images, labels = [], []
        for label, cls in enumerate(SORTED_CLASSES):
            (root / split / cls).mkdir(parents=True)
            for index, image in enumerate(_random_images(10 * seed + label, count)):
                (root / split / cls / f"{index:04d}.{fmt}").write_bytes(_encode(image, fmt))
                images.append(image)
                labels.append(label)
        arrays[split] = (np.stack(images), np.array(labels, np.int32))
    return data.Dataset(*arrays["train"], *arrays["test"], SORTED_CLASSES)


def _archive(folder: Path, path: Path, top: str = "") -> Path:
    """Archives ``folder``'s content as zip or tar (by suffix), under ``top`` if given."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for file in files:
                archive.write(file, os.path.join(top, file.relative_to(folder)))
    else:
        with tarfile.open(path, "w:" + {".xz": "xz", ".gz": "gz", ".tar": ""}[path.suffix]) as tar:
            for file in files:
                tar.add(file, os.path.join(top, file.relative_to(folder)))
    return path


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> tuple[Path, data.Dataset]:
    root = tmp_path_factory.mktemp("png") / "images"
    return root, _write_image_folder(root)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> tuple[Path, data.Dataset]:
    root = tmp_path_factory.mktemp("jpeg") / "images"
    return root, _write_image_folder(root, "jpg")


def test_image_folder(png_folder, tmp_path):
    root, expected = png_folder
    _assert_same(data.load_cifar10(root, cache_dir=tmp_path), expected)


@pytest.mark.parametrize(
    ("name", "top"), [("a.zip", "cifar"), ("a.tar", ""), ("a.tar.gz", "x/y"), ("a.tar.xz", "")]
)
def test_image_folder_archives(png_folder, tmp_path, name, top):
    root, expected = png_folder
    path = _archive(root, tmp_path / name, top)
    _assert_same(data.load_cifar10(path, cache_dir=tmp_path / "cache"), expected)


def test_jpeg_tar_xz_decodes_with_pillow(jpeg_folder, tmp_path):
    root, expected = jpeg_folder
    dataset = data.load_cifar10(_archive(root, tmp_path / "a.tar.xz"), cache_dir=tmp_path)
    assert dataset.class_names == SORTED_CLASSES
    np.testing.assert_array_equal(dataset.train_labels, expected.train_labels)
    reference = np.stack(
        [np.asarray(Image.open(f).convert("RGB")) for f in sorted(root.glob("train/*/*"))]
    )
    np.testing.assert_array_equal(dataset.train_images, reference)


def test_archive_junk_is_ignored(png_folder, tmp_path):
    root, expected = png_folder
    path = _archive(root, tmp_path / "a.zip")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("README.txt", "not an image")
        archive.writestr("__MACOSX/train/cat/._0000.png", b"resource fork")
        archive.writestr("train/cat/.0009.png", b"hidden")
        archive.writestr("train/cat/notes.txt", b"not an image")
    _assert_same(data.load_cifar10(path, cache_dir=tmp_path), expected)


def test_parallel_decoding_matches_in_process(png_folder, tmp_path, monkeypatch):
    root, expected = png_folder
    monkeypatch.setattr(data_readers, "DECODE_CHUNK", 4)  # 15 train + 6 test images: 6 tasks
    _assert_same(data.load_cifar10(root, cache_dir=tmp_path, workers=2), expected)


# --- the cache ------------------------------------------------------------------------


def test_cache_skips_decoding_and_survives_corruption(png_folder, tmp_path, monkeypatch):
    root, expected = png_folder
    path = _archive(root, tmp_path / "a.tar.gz")
    cache = tmp_path / "cache"
    decodes = []
    read_archive = data_readers.read_archive
    monkeypatch.setattr(
        data_readers, "read_archive", lambda *a: decodes.append(a) or read_archive(*a)
    )

    _assert_same(data.load_cifar10(path, cache_dir=cache), expected)
    (cached,) = cache.glob("*.npz")
    _assert_same(data.load_cifar10(path, cache_dir=cache), expected)
    assert len(decodes) == 1

    cached.write_bytes(cached.read_bytes()[:1000])
    _assert_same(data.load_cifar10(path, cache_dir=cache), expected)
    assert len(decodes) == 2
    _assert_same(data.load_cifar10(path, cache_dir=cache), expected)
    assert len(decodes) == 2

    os.utime(path, ns=(0, 0))  # a changed source is decoded again
    _assert_same(data.load_cifar10(path, cache_dir=cache), expected)
    assert len(decodes) == 3
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


# --- download -------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serves tmp_path/www on 127.0.0.1; yields (folder, base URL)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_checks_md5(http_server, tmp_path):
    folder, url = http_server
    payload = os.urandom(3 << 20)
    (folder / "blob.bin").write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    destination = tmp_path / "dl" / "blob.bin"

    assert data.download(f"{url}/blob.bin", destination, md5=md5.upper()) == destination
    assert destination.read_bytes() == payload

    destination.unlink()
    with pytest.raises(DatasetError, match=f"blob.bin: downloaded file has MD5 {md5}, expected"):
        data.download(f"{url}/blob.bin", destination, md5="0" * 32)
    assert list(destination.parent.iterdir()) == []

    with pytest.raises(DatasetError, match="missing.bin: download to .* failed: HTTP Error 404"):
        data.download(f"{url}/missing.bin", destination)
    assert list(destination.parent.iterdir()) == []


def test_cifar10_name_downloads_once(http_server, official_tar_gz, batches, tmp_path, monkeypatch):
    folder, url = http_server
    shutil.copy(official_tar_gz, folder / "cifar.tgz")
    md5 = hashlib.md5(official_tar_gz.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "_import_tfds", lambda: None)
    monkeypatch.setattr(data, "CIFAR10_URL", f"{url}/cifar.tgz")
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)

    _assert_same(data.load_cifar10("cifar10", cache_dir=tmp_path), batches[1])
    assert (tmp_path / "cifar-10-python.tar.gz").read_bytes() == official_tar_gz.read_bytes()
    (folder / "cifar.tgz").unlink()
    _assert_same(data.load_cifar10("cifar10", cache_dir=tmp_path), batches[1])


def test_cifar10_name_rejects_a_bad_download(http_server, tmp_path, monkeypatch):
    folder, url = http_server
    (folder / "cifar.tgz").write_bytes(b"tampered")
    monkeypatch.setattr(data, "_import_tfds", lambda: None)
    monkeypatch.setattr(data, "CIFAR10_URL", f"{url}/cifar.tgz")
    with pytest.raises(DatasetError, match="cifar.tgz: downloaded file has MD5"):
        data.load_cifar10("cifar10", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [folder]


def test_cifar10_name_uses_tfds_when_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda host: True)  # TFDS is mocked
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "TFDS_BATCH_SIZE", 4)  # 6 examples: two batches to join
    with tfds.testing.mock_data(num_examples=6):
        dataset = data.load_cifar10("cifar10", cache_dir=tmp_path)
        expected = {
            split: list(tfds.as_numpy(tfds.load("cifar10", split=split, data_dir=tmp_path)))
            for split in ("train", "test")
        }
        names = tfds.builder("cifar10", data_dir=tmp_path).info.features["label"].names
    assert dataset.train_images.shape == (6, 32, 32, 3)
    assert dataset.train_images.dtype == np.uint8 and dataset.train_labels.dtype == np.int32
    for split, images, labels in [
        ("train", dataset.train_images, dataset.train_labels),
        ("test", dataset.test_images, dataset.test_labels),
    ]:
        np.testing.assert_array_equal(images, np.stack([e["image"] for e in expected[split]]))
        np.testing.assert_array_equal(labels, [e["label"] for e in expected[split]])
    assert dataset.class_names == tuple(names) and len(names) == 10


# --- synthetic ------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable():
    dataset = data.load_cifar10("synthetic", synthetic_size=(200, 100), seed=3)
    assert dataset.train_images.shape == (200, 32, 32, 3)
    assert dataset.test_labels.shape == (100,) and dataset.test_labels.dtype == np.int32
    _assert_same(data.load_cifar10("synthetic", synthetic_size=(200, 100), seed=3), dataset)
    other = data.load_cifar10("synthetic", synthetic_size=(200, 100), seed=4)
    assert not np.array_equal(other.train_images, dataset.train_images)
    # The mean colour of an image predicts its label.
    colours = dataset.train_images.mean(axis=(1, 2))
    centres = np.stack([colours[dataset.train_labels == c].mean(0) for c in range(10)])
    test_colours = dataset.test_images.mean(axis=(1, 2))
    predicted = np.argmin(((test_colours[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == dataset.test_labels) > 0.9


# --- errors ---------------------------------------------------------------------------


def _corrupt_batches(root: Path) -> Path:
    folder = root / "bad"
    _write_batches(folder)
    batch = pickle.loads((folder / "data_batch_2").read_bytes())
    batch[b"data"] = batch[b"data"][:, :1024]
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
    return folder


def _without_test_batch(root: Path) -> Path:
    folder = root / "partial"
    _write_batches(folder)
    (folder / "test_batch").unlink()
    return folder


def _image_folder_with(root: Path, name: str, payload: bytes) -> Path:
    folder = root / "images"
    _write_image_folder(folder)
    (folder / name).write_bytes(payload)
    return folder


def _truncated(root: Path) -> Path:
    folder = root / "images"
    _write_image_folder(folder)
    path = _archive(folder, root / "cut.tar.xz")
    path.write_bytes(path.read_bytes()[:-200])
    return path


def _test_class_without_train(root: Path) -> Path:
    folder = root / "images"
    _write_image_folder(folder)
    (folder / "test" / "bird").mkdir()
    shutil.copy(folder / "test" / "cat" / "0000.png", folder / "test" / "bird" / "0000.png")
    return folder


def _empty_test_split(root: Path) -> Path:
    folder = root / "images"
    _write_image_folder(folder)
    shutil.rmtree(folder / "test")
    (folder / "test").mkdir()
    return folder


def _file(root: Path, name: str, payload: bytes) -> Path:
    (root / name).write_bytes(payload)
    return root / name


def _wrong_size_image(root: Path) -> Path:
    small = _encode(_random_images(0, 1, size=28)[0], "png")
    return _image_folder_with(root, "train/cat/0009.png", small)


def _zip_of_nothing_useful(root: Path) -> Path:
    with zipfile.ZipFile(root / "junk.zip", "w") as archive:
        archive.writestr("README.txt", "no images here")
    return root / "junk.zip"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda root: root / "nowhere", "nowhere: no such file or folder"),
        (lambda root: root, "folder is in neither the cifar-10-batches-py layout"),
        (lambda root: _file(root, "x.tar.gz", os.urandom(999)), "x.tar.gz: not a readable zip"),
        (lambda root: _file(root, "empty.zip", b""), "empty.zip: not a readable zip or tar"),
        (_truncated, "cut.tar.xz: not a readable zip or tar archive, or corrupt"),
        (_zip_of_nothing_useful, "junk.zip: holds neither the cifar-10-batches-py files nor"),
        (_corrupt_batches, "data_batch_2 should hold N rows of 3072 pixel values"),
        (_without_test_batch, "partial: cifar-10-batches-py layout lacks test_batch"),
        (_wrong_size_image, "the image train/cat/0009.png is 28x28 pixels, expected 32x32"),
        (
            lambda root: _image_folder_with(root, "test/dog/0009.jpg", b"not a jpeg"),
            "cannot decode the image test/dog/0009.jpg",
        ),
        (_test_class_without_train, r"test classes \['bird'\] have no train/ folder"),
        (_empty_test_split, "no images under test/<class>/"),
    ],
)
def test_bad_sources_raise_dataset_error(tmp_path, make, problem):
    source = make(tmp_path)
    with pytest.raises(DatasetError, match=problem) as error:
        data.load_cifar10(source, cache_dir=tmp_path / ".cache")
    assert str(source.name) in str(error.value)
    assert isinstance(error.value, ValueError)


# --- augmentation ---------------------------------------------------------------------


def _normalised(images: np.ndarray) -> np.ndarray:
    return (images / 255 - np.array(data.MEAN)) / np.array(data.STD)


def test_preprocess_eval_normalises():
    images = _random_images(0, 4)
    out = data.preprocess_eval(jnp.asarray(images))
    assert out.shape == (4, 32, 32, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _normalised(images), rtol=1e-5, atol=1e-5)


def test_augment_shapes_and_determinism():
    images = jnp.asarray(_random_images(0, 16))
    augment = jax.jit(data.augment)
    out = augment(jax.random.key(0), images)
    assert out.shape == (16, 32, 32, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, augment(jax.random.key(0), images))
    np.testing.assert_allclose(out, data.augment(jax.random.key(0), images), atol=1e-6)
    assert not np.array_equal(out, augment(jax.random.key(1), images))


def test_augment_flips_about_half_the_images():
    images = _random_images(1, 64)
    out = np.asarray(data.augment(jax.random.key(2), jnp.asarray(images), padding=0))
    plain = _normalised(images)
    kept = np.all(np.isclose(out, plain, atol=1e-5), axis=(1, 2, 3))
    flipped = np.all(np.isclose(out, plain[:, :, ::-1], atol=1e-5), axis=(1, 2, 3))
    assert np.all(kept ^ flipped)
    assert 16 < flipped.sum() < 48


def test_augment_crops_are_shifts_of_the_zero_padded_image():
    images = _random_images(2, 32)
    out = np.asarray(data.augment(jax.random.key(3), jnp.asarray(images)))
    pixels = np.rint((out * np.array(data.STD) + np.array(data.MEAN)) * 255).astype(np.uint8)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    shifts = set()
    for crop, source in zip(pixels, padded, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                crop, (source[:, ::-1] if flip else source)[dy : dy + 32, dx : dx + 32]
            )
        ]
        assert len(matches) == 1
        shifts.add(matches[0][:2])
    assert len(shifts) > 8  # offsets vary across the batch
