"""CIFAR-10 as uint8 NumPy arrays from several sources, plus on-device augmentation.

``load_cifar10(source)`` accepts:

- ``"cifar10"``: the real dataset, through TensorFlow Datasets when TensorFlow and
  ``tensorflow_datasets`` are installed, else downloaded from the CIFAR page, checked
  against its published MD5 and kept in ``cache_dir``;
- ``"synthetic"``: random images whose colour depends on the label, deterministic
  given ``seed``;
- a folder in the official ``cifar-10-batches-py`` layout, or the folder holding it;
- a folder of images ``train/<class>/*.png|jpg`` and ``test/<class>/*``, labels
  being the positions of the class names in sorted order;
- a ``.zip`` or ``.tar[.gz|.bz2|.xz]`` archive of either layout, such as the
  official ``cifar-10-python.tar.gz`` or ``/work/shared/data/cifar10-jpeg.tar.xz``.

Images are decoded with Pillow in a single streaming pass over an archive, by a
couple of worker processes when there are many, and the arrays are cached as an
``.npz`` in ``cache_dir`` keyed by the source's path, size and modification time.

``augment`` (random crop with zero padding 4 and horizontal flip, then
normalisation) and ``preprocess_eval`` run inside jitted steps.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import http.client
import io
import json
import logging
import lzma
import multiprocessing
import os
import pickle
import secrets
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DEFAULT_CACHE_DIR = "~/.cache/swats_jax"

# Per-channel statistics of the official training set, pixels scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)

IMAGE_SIZE = 32
_PIXELS = IMAGE_SIZE * IMAGE_SIZE * 3
_BATCH_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DECODE_CHUNK = 4096  # images per task handed to a decoding worker
_CACHE_VERSION = 1

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A data source is missing, unreadable, corrupt or in an unknown layout."""


class Dataset(NamedTuple):
    """CIFAR-style arrays: images uint8 [N, 32, 32, 3] (NHWC), labels int32 [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_cifar10(
    source: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    synthetic_size: tuple[int, int] = (1024, 256),
    seed: int = 0,
    workers: int = 2,
) -> Dataset:
    """Loads CIFAR-10 (or a dataset in one of its layouts) as NumPy arrays.

    Args:
      source: ``"cifar10"``, ``"synthetic"``, or the path of a folder or archive in
        one of the layouts listed in the module docstring. The two names win over
        folders of the same name in the working directory.
      cache_dir: where the download and decoded arrays are kept; defaults to
        ``~/.cache/swats_jax``. Given with ``"cifar10"`` and TensorFlow Datasets, it
        is also TFDS's ``data_dir``.
      synthetic_size: numbers of train and test images for ``"synthetic"``.
      seed: seed of ``"synthetic"``.
      workers: processes decoding images; 1 decodes in this process.

    Returns:
      A ``Dataset`` with uint8 images [N, 32, 32, 3] and int32 labels [N].

    Raises:
      DatasetError: the source is missing, unreadable, corrupt, in neither layout,
        holds images that are not 32x32, or its download fails its checksum.
    """
    source = os.fspath(source)
    if source == "synthetic":
        return _synthetic(*synthetic_size, seed=seed)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    if source == "cifar10":
        tfds = _import_tfds()
        if tfds is not None:
            return _load_tfds(tfds, None if cache_dir is None else os.fspath(cache))
        path = _fetch_official(cache)
    else:
        path = Path(source).expanduser()

    if path.is_dir():
        batches = _find_batches_dir(path)
        if batches is not None:
            files = [batches / name for name in _BATCH_FILES if (batches / name).is_file()]
            return _read_entries(_directory_entries(batches, files), path, workers)
        if all((path / split).is_dir() for split in _SPLITS):
            files = sorted(f for split in _SPLITS for f in (path / split).rglob("*") if f.is_file())
            listing = [(f.relative_to(path).as_posix(), *_stamp(f)) for f in files]
            return _cached(
                cache,
                json.dumps([str(path.resolve()), listing]),
                lambda: _read_entries(_directory_entries(path, files), path, workers),
            )
        raise DatasetError(
            f"{path}: folder is in neither the cifar-10-batches-py layout (data_batch_1..5, "
            "test_batch, batches.meta) nor the image-folder layout (train/<class>/, test/<class>/)"
        )
    if path.is_file():
        return _cached(
            cache,
            json.dumps([str(path.resolve()), *_stamp(path)]),
            lambda: _read_archive(path, workers),
        )
    raise DatasetError(f"{path}: no such file or folder")


def download(
    url: str, destination: str | os.PathLike[str], *, md5: str | None = None, timeout: float = 60
) -> Path:
    """Downloads ``url`` to ``destination``, atomically, checking its MD5 if given.

    The bytes go to a temporary file next to ``destination`` that is renamed only
    once complete and verified, and removed otherwise.

    Raises:
      DatasetError: the download fails or its MD5 differs from ``md5``.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(destination)
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s to %s", url, destination)
    try:
        with partial.open("wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5.lower():
            raise DatasetError(
                f"{url}: downloaded file has MD5 {digest.hexdigest()}, expected {md5}; "
                f"{destination} was not written"
            )
        os.replace(partial, destination)
    except (OSError, http.client.HTTPException) as err:
        raise DatasetError(f"{url}: download to {destination} failed: {err}") from err
    finally:
        partial.unlink(missing_ok=True)
    return destination


def augment(key: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """Random crop after zero padding and random horizontal flip, then normalisation.

    As torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``: the
    padding is black in pixel space, before normalisation. Every image gets its own
    offset and flip; jit-compatible.

    Args:
      key: PRNG key.
      images: uint8 [B, H, W, C].
      padding: pixels of zeros added on each side before cropping back to H x W.

    Returns:
      float32 [B, H, W, C], normalised with ``MEAN`` and ``STD``.
    """
    batch, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop_and_flip(image: jax.Array, offset: jax.Array, flip: jax.Array) -> jax.Array:
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip, crop[:, ::-1], crop)

    return preprocess_eval(jax.vmap(crop_and_flip)(padded, offsets, flips))


def preprocess_eval(images: jax.Array) -> jax.Array:
    """Scales uint8 images [..., 3] to [0, 1] and normalises them with ``MEAN`` and ``STD``."""
    images = jnp.asarray(images, jnp.float32) / 255
    shape = (1,) * (images.ndim - 1) + (3,)
    mean = jnp.reshape(jnp.asarray(MEAN, jnp.float32), shape)
    std = jnp.reshape(jnp.asarray(STD, jnp.float32), shape)
    return (images - mean) / std


def _synthetic(num_train: int, num_test: int, *, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 0.8, (len(CIFAR10_CLASSES), 3)) * 255

    def split(size: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(size) % len(CIFAR10_CLASSES)).astype(np.int32)
        noise = rng.normal(0, 48, (size, IMAGE_SIZE, IMAGE_SIZE, 3))
        images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return images, labels

    return Dataset(*split(num_train), *split(num_test), CIFAR10_CLASSES)


def _import_tfds() -> Any:
    """Returns ``tensorflow_datasets`` if it and TensorFlow (needed to prepare cifar10) import.

    TensorFlow is kept off the GPUs: it would otherwise reserve most of their memory, which
    JAX needs.
    """
    try:
        import tensorflow
        import tensorflow_datasets
    except ImportError:
        return None
    try:
        tensorflow.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices; nothing more to do
        pass
    return tensorflow_datasets


# Read in batches of this size rather than with batch_size=-1, which needs the split sizes
# from the dataset's metadata (mock and custom builds may lack them).
TFDS_BATCH_SIZE = 10_000


def _load_tfds(tfds: Any, data_dir: str | None) -> Dataset:
    splits, info = tfds.load(
        "cifar10",
        split=["train", "test"],
        batch_size=TFDS_BATCH_SIZE,
        with_info=True,
        data_dir=data_dir,
    )
    arrays = []
    for split in splits:
        batches = list(tfds.as_numpy(split))
        arrays.append(np.concatenate([batch["image"] for batch in batches]).astype(np.uint8))
        arrays.append(np.concatenate([batch["label"] for batch in batches]).astype(np.int32))
    return _checked(
        Dataset(*arrays, tuple(info.features["label"].names)), "tensorflow_datasets cifar10"
    )


def _fetch_official(cache_dir: Path) -> Path:
    path = cache_dir / "cifar-10-python.tar.gz"
    if not path.is_file():
        download(CIFAR10_URL, path, md5=CIFAR10_MD5)
    return path


def _partial_path(path: Path) -> Path:
    """A unique hidden sibling of ``path`` to write before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _cached(cache_dir: Path, key: str, build: Callable[[], Dataset]) -> Dataset:
    """Returns the dataset cached under ``key``, building and caching it if needed."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\0{key}".encode()).hexdigest()[:20]
    path = cache_dir / f"cifar10-{digest}.npz"
    if path.is_file():
        try:
            # An open file, since np.load leaks the one it opens when the zip is corrupt.
            with path.open("rb") as file, np.load(file, allow_pickle=False) as arrays:
                fields = {name: arrays[name] for name in Dataset._fields}
            fields["class_names"] = tuple(str(name) for name in fields["class_names"])
            return _checked(Dataset(**fields), str(path))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, err)
    dataset = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(path)
        try:
            with partial.open("wb") as out:
                np.savez(out, **dataset._asdict())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    except OSError as err:
        log.warning("could not write the cache %s (%s)", path, err)
    return dataset


def _find_batches_dir(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-10-batches-py"):
        if any((candidate / name).is_file() for name in _BATCH_FILES):
            return candidate
    return None


def _directory_entries(
    root: Path, files: Iterable[Path]
) -> Iterator[tuple[str, Callable[[], bytes]]]:
    for file in files:
        yield file.relative_to(root).as_posix(), file.read_bytes


def _archive_entries(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yields (name, read) for the files of a zip or tar; call ``read`` before moving on."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, functools.partial(archive.read, info)
        return
    # Stream mode reads a compressed tar once, front to back.
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            if member.isfile():
                yield member.name, archive.extractfile(member).read


def _read_archive(path: Path, workers: int) -> Dataset:
    try:
        return _read_entries(_archive_entries(path), path, workers)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        OSError,
        EOFError,
        lzma.LZMAError,
        zlib.error,
    ) as err:
        raise DatasetError(f"{path}: not a readable zip or tar archive, or corrupt: {err}") from err


def _read_entries(
    entries: Iterable[tuple[str, Callable[[], bytes]]], source: Path, workers: int
) -> Dataset:
    """Builds a dataset from the files of either layout, wherever they sit in ``entries``."""
    batches: dict[str, bytes] = {}
    images: list[tuple[str, str, str]] = []  # (split, class name, entry name)

    def image_chunks() -> Iterator[tuple[list[str], list[bytes]]]:
        names: list[str] = []
        blobs: list[bytes] = []
        for name, read in entries:
            parts = [part for part in name.split("/") if part not in ("", ".")]
            if not parts or any(part.startswith(".") or part == "__MACOSX" for part in parts):
                continue
            if parts[-1] in _BATCH_FILES:
                batches[parts[-1]] = read()
            elif (
                len(parts) >= 3
                and parts[-3] in _SPLITS
                and parts[-1].lower().endswith(_IMAGE_SUFFIXES)
            ):
                images.append((parts[-3], parts[-2], name))
                names.append(name)
                blobs.append(read())
                if len(names) == _DECODE_CHUNK:
                    yield names, blobs
                    names, blobs = [], []
        if names:
            yield names, blobs

    pixels = _decode_chunks(image_chunks(), str(source), workers)
    if batches:
        return _parse_batches(batches, source)
    if images:
        return _assemble_image_folders(images, np.concatenate(pixels), source)
    raise DatasetError(
        f"{source}: holds neither the cifar-10-batches-py files nor train/<class>/ and "
        "test/<class>/ image folders"
    )


def _decode_chunks(
    chunks: Iterator[tuple[list[str], list[bytes]]], source: str, workers: int
) -> list[np.ndarray]:
    """Decodes chunks in order, in worker processes once a full chunk shows there are many."""
    results: list[concurrent.futures.Future[np.ndarray] | np.ndarray] = []
    pool = None
    try:
        for names, blobs in chunks:
            if pool is None and workers > 1 and len(names) == _DECODE_CHUNK:
                # Spawn, because forking a process that runs JAX threads can deadlock.
                context = multiprocessing.get_context("spawn")
                pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
            if pool is None:
                results.append(_decode_images(source, names, blobs))
            else:
                results.append(pool.submit(_decode_images, source, names, blobs))
        return [r if isinstance(r, np.ndarray) else r.result() for r in results]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _decode_images(source: str, names: list[str], blobs: list[bytes]) -> np.ndarray:
    pixels = np.empty((len(blobs), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for index, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            reason = "unknown format" if isinstance(err, UnidentifiedImageError) else err
            raise DatasetError(f"{source}: cannot decode the image {name}: {reason}") from None
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            width, height = rgb.size
            raise DatasetError(
                f"{source}: the image {name} is {width}x{height} pixels, "
                f"expected {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        pixels[index] = np.asarray(rgb)
    return pixels


def _assemble_image_folders(
    images: list[tuple[str, str, str]], pixels: np.ndarray, source: Path
) -> Dataset:
    class_names = tuple(sorted({cls for split, cls, _ in images if split == "train"}))
    label_of = {name: label for label, name in enumerate(class_names)}
    arrays = []
    for split in _SPLITS:
        indices = sorted(
            (i for i, (s, _, _) in enumerate(images) if s == split), key=lambda i: images[i][2]
        )
        if not indices:
            raise DatasetError(f"{source}: no images under {split}/<class>/")
        unknown = sorted({images[i][1] for i in indices} - label_of.keys())
        if unknown:
            raise DatasetError(f"{source}: test classes {unknown} have no train/ folder")
        labels = np.array([label_of[images[i][1]] for i in indices], np.int32)
        arrays += [pixels[indices], labels]
    return _checked(Dataset(*arrays, class_names), str(source))


def _parse_batches(files: dict[str, bytes], source: Path) -> Dataset:
    missing = [name for name in _BATCH_FILES if name not in files]
    if missing:
        raise DatasetError(f"{source}: cifar-10-batches-py layout lacks {', '.join(missing)}")
    meta = _unpickle(files["batches.meta"], source, "batches.meta")
    class_names = tuple(
        name.decode() if isinstance(name, bytes) else str(name)
        for name in _field(meta, "label_names", source, "batches.meta")
    )
    train = [
        _batch_arrays(files[f"data_batch_{i}"], source, f"data_batch_{i}") for i in range(1, 6)
    ]
    test_images, test_labels = _batch_arrays(files["test_batch"], source, "test_batch")
    return _checked(
        Dataset(
            np.concatenate([images for images, _ in train]),
            np.concatenate([labels for _, labels in train]),
            test_images,
            test_labels,
            class_names,
        ),
        str(source),
    )


def _unpickle(blob: bytes, source: Path, name: str) -> dict[Any, Any]:
    try:
        content = pickle.loads(blob, encoding="bytes")
    except Exception as err:  # unpickling garbage can raise almost anything
        raise DatasetError(f"{source}: {name} is not a readable pickle: {err!r}") from err
    if not isinstance(content, dict):
        raise DatasetError(f"{source}: {name} holds a {type(content).__name__}, not a dict")
    return content


def _field(content: dict[Any, Any], key: str, source: Path, name: str) -> Any:
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    raise DatasetError(f"{source}: {name} has no {key!r} entry")


def _batch_arrays(blob: bytes, source: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(blob, source, name)
    data = np.asarray(_field(content, "data", source, name))
    labels = np.asarray(_field(content, "labels", source, name))
    if data.ndim != 2 or data.shape[1] != _PIXELS or labels.shape != data.shape[:1]:
        raise DatasetError(
            f"{source}: {name} should hold N rows of {_PIXELS} pixel values (32x32 RGB) and "
            f"N labels, but has data of shape {data.shape} and {labels.size} labels"
        )
    images = data.astype(np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int32)


def _checked(dataset: Dataset, source: str) -> Dataset:
    """Returns ``dataset`` after checking its shapes, dtypes and labels."""
    for split in _SPLITS:
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DatasetError(
                f"{source}: {split} images are {images.dtype} {images.shape}, "
                f"expected uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]"
            )
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise DatasetError(f"{source}: {split} labels do not match the images")
        if labels.size and not 0 <= labels.min() <= labels.max() < dataset.num_classes:
            raise DatasetError(f"{source}: {split} labels lie outside 0..{dataset.num_classes - 1}")
    return dataset
