"""The arrays every data source loads into (``Dataset``), their checks, and ``DatasetError``.

Most code imports these through :mod:`train.data`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 32
SPLITS = ("train", "test")


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


def checked(dataset: Dataset, source: str) -> Dataset:
    """Returns ``dataset`` after checking its shapes, dtypes and labels."""
    for split in SPLITS:
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
