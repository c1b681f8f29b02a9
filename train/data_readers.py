"""Reading the files of a data source: folders, zip and tar archives, pickles and images.

Two layouts are recognised wherever they sit in a folder or archive: the official
``cifar-10-batches-py`` pickles (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
and image folders ``train/<class>/*.png|jpg`` and ``test/<class>/*``. Images are decoded
with Pillow in a single streaming pass over an archive, by worker processes when there
are many.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import lzma
import multiprocessing
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from train.dataset import IMAGE_SIZE, SPLITS, Dataset, DatasetError, checked

_PIXELS = IMAGE_SIZE * IMAGE_SIZE * 3
BATCH_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DECODE_CHUNK = 4096  # images per task handed to a decoding worker


def find_batches_dir(path: Path) -> Path | None:
    """``path`` or its ``cifar-10-batches-py`` subfolder, whichever holds a batch file."""
    for candidate in (path, path / "cifar-10-batches-py"):
        if any((candidate / name).is_file() for name in BATCH_FILES):
            return candidate
    return None


def directory_entries(
    root: Path, files: Iterable[Path]
) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """Yields (name relative to ``root``, read) for ``files``, as :func:`read_entries` takes."""
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


def read_archive(path: Path, workers: int) -> Dataset:
    """Reads a dataset in either layout from a zip or (compressed) tar archive."""
    try:
        return read_entries(_archive_entries(path), path, workers)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        OSError,
        EOFError,
        lzma.LZMAError,
        zlib.error,
    ) as err:
        raise DatasetError(f"{path}: not a readable zip or tar archive, or corrupt: {err}") from err


def read_entries(
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
            if parts[-1] in BATCH_FILES:
                batches[parts[-1]] = read()
            elif (
                len(parts) >= 3
                and parts[-3] in SPLITS
                and parts[-1].lower().endswith(_IMAGE_SUFFIXES)
            ):
                images.append((parts[-3], parts[-2], name))
                names.append(name)
                blobs.append(read())
                if len(names) == DECODE_CHUNK:
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
            if pool is None and workers > 1 and len(names) == DECODE_CHUNK:
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
    for split in SPLITS:
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
    return checked(Dataset(*arrays, class_names), str(source))


def _parse_batches(files: dict[str, bytes], source: Path) -> Dataset:
    missing = [name for name in BATCH_FILES if name not in files]
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
    return checked(
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
