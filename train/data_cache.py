"""What ``train.data.load_cifar10`` keeps in its cache folder, each file written atomically.

``download`` fetches a file (the official CIFAR-10 archive) and checks its MD5;
``cached`` keeps the decoded arrays of a source as an ``.npz`` under a key.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import secrets
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from train.dataset import Dataset, DatasetError, checked

_CACHE_VERSION = 1

log = logging.getLogger(__name__)


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


def cached(cache_dir: Path, key: str, build: Callable[[], Dataset]) -> Dataset:
    """Returns the dataset cached under ``key``, building and caching it if needed."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\0{key}".encode()).hexdigest()[:20]
    path = cache_dir / f"cifar10-{digest}.npz"
    if path.is_file():
        try:
            # An open file, since np.load leaks the one it opens when the zip is corrupt.
            with path.open("rb") as file, np.load(file, allow_pickle=False) as arrays:
                fields = {name: arrays[name] for name in Dataset._fields}
            fields["class_names"] = tuple(str(name) for name in fields["class_names"])
            return checked(Dataset(**fields), str(path))
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


def _partial_path(path: Path) -> Path:
    """A unique hidden sibling of ``path`` to write before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
