"""CIFAR-10 as uint8 NumPy arrays from several sources.

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
  official ``cifar-10-python.tar.gz`` or a ``.tar.xz`` of JPEG image folders
  (``train/<class>/*.jpg``, ``test/<class>/*.jpg``).

Images are decoded with Pillow in a single streaming pass over an archive, by a
couple of worker processes when there are many (:mod:`train.data_readers`), and the
arrays are cached as an ``.npz`` in ``cache_dir`` keyed by the source's path, size and
modification time (:mod:`train.data_cache`).

``augment`` (random crop with zero padding 4 and horizontal flip, then
normalisation) and ``preprocess_eval`` run inside jitted steps
(:mod:`train.preprocessing`); they, ``Dataset``, ``DatasetError`` and ``download`` are
importable from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from train import data_readers as readers
from train.data_cache import cached, download
from train.dataset import IMAGE_SIZE, SPLITS, Dataset, DatasetError, checked
from train.preprocessing import MEAN, STD, augment, preprocess_eval

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DEFAULT_CACHE_DIR",
    "IMAGE_SIZE",
    "MEAN",
    "STD",
    "Dataset",
    "DatasetError",
    "augment",
    "download",
    "load_cifar10",
    "preprocess_eval",
]

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
        batches = readers.find_batches_dir(path)
        if batches is not None:
            files = [batches / name for name in readers.BATCH_FILES if (batches / name).is_file()]
            return readers.read_entries(readers.directory_entries(batches, files), path, workers)
        if all((path / split).is_dir() for split in SPLITS):
            files = sorted(f for split in SPLITS for f in (path / split).rglob("*") if f.is_file())
            listing = [(f.relative_to(path).as_posix(), *_stamp(f)) for f in files]
            return cached(
                cache,
                json.dumps([str(path.resolve()), listing]),
                lambda: readers.read_entries(readers.directory_entries(path, files), path, workers),
            )
        raise DatasetError(
            f"{path}: folder is in neither the cifar-10-batches-py layout (data_batch_1..5, "
            "test_batch, batches.meta) nor the image-folder layout (train/<class>/, test/<class>/)"
        )
    if path.is_file():
        return cached(
            cache,
            json.dumps([str(path.resolve()), *_stamp(path)]),
            lambda: readers.read_archive(path, workers),
        )
    raise DatasetError(f"{path}: no such file or folder")


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
    return checked(
        Dataset(*arrays, tuple(info.features["label"].names)), "tensorflow_datasets cifar10"
    )


def _fetch_official(cache_dir: Path) -> Path:
    path = cache_dir / "cifar-10-python.tar.gz"
    if not path.is_file():
        download(CIFAR10_URL, path, md5=CIFAR10_MD5)
    return path


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
