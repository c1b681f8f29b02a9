"""CIFAR-10 as uint8 NumPy arrays from several sources.

``load_cifar10(source)`` accepts:

- ``"cifar10"``: the real dataset: the official ``cifar-10-python.tar.gz`` if it is in
  ``cache_dir`` (downloaded earlier, or put there by hand), else through TensorFlow
  Datasets when TensorFlow and ``tensorflow_datasets`` are installed, else downloaded from
  the CIFAR page, checked against its published MD5 and kept in ``cache_dir``. When TFDS
  fails (a broken install, a failed download), one warning names its error and the
  official archive is downloaded instead;
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

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from train import data_readers as readers
from train.data_cache import cached, download
from train.dataset import IMAGE_SIZE, SPLITS, Dataset, DatasetError, checked
from train.messages import one_line
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
# The name of the official archive in the cache folder, where a copy put by hand is found.
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"

log = logging.getLogger(__name__)


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
        is also TFDS's ``data_dir``. An official ``cifar-10-python.tar.gz`` put in it
        is used without any download.
      synthetic_size: numbers of train and test images for ``"synthetic"``.
      seed: seed of ``"synthetic"``.
      workers: processes decoding images; 1 decodes in this process.

    Returns:
      A ``Dataset`` with uint8 images [N, 32, 32, 3] and int32 labels [N].

    Raises:
      DatasetError: the source is missing, unreadable, corrupt, in neither layout,
        holds images that are not 32x32, or its download fails or fails its checksum
        (the message, one line, then names the ways to run without a download).
    """
    source = os.fspath(source)
    if source == "synthetic":
        return _synthetic(*synthetic_size, seed=seed)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    if source == "cifar10":
        path = cache / OFFICIAL_ARCHIVE
        if not path.is_file():
            dataset = _try_tfds(None if cache_dir is None else os.fspath(cache))
            if dataset is not None:
                return dataset
            _fetch_official(path)
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


def _try_tfds(data_dir: str | None) -> Dataset | None:
    """CIFAR-10 through TensorFlow Datasets; None when TFDS is not installed, or fails for
    another reason than bad data (logged as one warning line).

    Raises:
      DatasetError: TFDS delivered arrays that fail the checks of ``Dataset``.
    """
    with _quiet_tensorflow():
        try:
            tfds = _import_tfds()
            return None if tfds is None else _load_tfds(tfds, data_dir)
        except DatasetError:
            raise
        except Exception as err:  # a broken install, a failed download: TFDS raises anything
            log.warning(
                "TensorFlow Datasets could not load cifar10 (%s); using the official %s instead",
                one_line(err),
                OFFICIAL_ARCHIVE,
            )
            return None


@contextlib.contextmanager
def _quiet_tensorflow() -> Iterator[None]:
    """Mutes TensorFlow's logs and TFDS's warnings while TFDS runs.

    ``TF_CPP_MIN_LOG_LEVEL`` (TensorFlow's C++ logs) is set to 3, unless the user chose a
    level (JAX sets 1 when it is imported; a user who wants TensorFlow's logs sets 0):
    TensorFlow only reads data here, its C++ "errors" are about GPUs it is told not to use
    (cuInit, cuDNN factories), and what goes wrong reaches Python as an exception. The
    TensorFlow and absl Python loggers show errors only. All are restored afterwards, so as
    not to mute JAX's logs. (A few lines TensorFlow prints when imported ignore the level.)
    """
    saved_env = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if saved_env in (None, "1"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    loggers = [logging.getLogger("tensorflow")]
    try:
        from absl import logging as absl_logging  # TFDS logs through absl

        loggers.append(absl_logging.get_absl_logger())
    except ImportError:
        pass
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if saved_env is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = saved_env


def _import_tfds() -> Any:
    """Returns ``tensorflow_datasets`` if it and TensorFlow (needed to prepare cifar10) are
    installed, else None.

    TensorFlow is kept off the GPUs: it would otherwise reserve most of their memory, which
    JAX needs.

    Raises:
      ImportError: they are installed but fail to import (say, a dependency is missing).
    """
    try:
        import tensorflow
        import tensorflow_datasets
    except ModuleNotFoundError as err:
        if err.name in ("tensorflow", "tensorflow_datasets"):
            return None
        raise
    try:
        tensorflow.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices; nothing more to do
        pass
    return tensorflow_datasets


# Where TFDS downloads cifar10 from (the official archive's host).
TFDS_DOWNLOAD_HOST = "www.cs.toronto.edu"


def _reachable(host: str, port: int = 443, timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout_s``."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


# Read in batches of this size rather than with batch_size=-1, which needs the split sizes
# from the dataset's metadata (mock and custom builds may lack them).
TFDS_BATCH_SIZE = 10_000


def _load_tfds(tfds: Any, data_dir: str | None) -> Dataset | None:
    if not tfds.builder("cifar10", data_dir=data_dir).is_prepared() and not _reachable(
        TFDS_DOWNLOAD_HOST
    ):
        # Offline, TFDS would retry its download for minutes before failing; the official
        # route fails at once with the message that says what to do instead.
        log.info("%s is unreachable: skipping TensorFlow Datasets", TFDS_DOWNLOAD_HOST)
        return None
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


def _fetch_official(path: Path) -> None:
    """Downloads the official archive to ``path`` (in the cache folder), checking its MD5.

    Raises:
      DatasetError: the download failed; its one line names the ways to do without one.
    """
    try:
        download(CIFAR10_URL, path, md5=CIFAR10_MD5)
    except DatasetError as err:
        reason = " ".join(str(err).splitlines())
        raise DatasetError(
            f"cannot download CIFAR-10: {reason}. Without a download: put {OFFICIAL_ARCHIVE} "
            f"at {path}, where the next run finds it; or pass --data PATH with a local "
            f"{OFFICIAL_ARCHIVE}, a cifar-10-batches-py folder or an image-folder archive "
            "(train/<class>/*.jpg, test/<class>/*.jpg); or --data synthetic for a smoke run"
        ) from err


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
