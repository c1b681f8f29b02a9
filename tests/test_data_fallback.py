"""Tests of ``load_cifar10("cifar10")`` when things go wrong: no network, a broken or failing
TensorFlow Datasets; and of the official archive put in the cache folder by hand.

The "download" reads a fake official archive made here through a ``file://`` URL, or
fails against a closed port on 127.0.0.1: no test needs the network.
"""

import builtins
import hashlib
import logging
import os
import socket
import sys
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from test_data import _write_batches

from train import data
from train.data import DatasetError


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, data.Dataset]:
    """A tiny cifar-10-python.tar.gz in the official layout, and what it loads as."""
    root = tmp_path_factory.mktemp("official")
    expected = _write_batches(root / "cifar-10-batches-py")
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path, expected


@pytest.fixture
def serve_official(official, monkeypatch):
    """Points the official download at the fake archive (through a file:// URL)."""
    path, expected = official
    monkeypatch.setattr(data, "CIFAR10_URL", path.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    return expected


@pytest.fixture
def offline(monkeypatch):
    """Points the official download at a closed port of 127.0.0.1: the connection fails."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(data, "CIFAR10_URL", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")


@pytest.fixture
def tfds_online(monkeypatch):
    """TFDS's download host counts as reachable (TFDS itself is mocked or made to fail)."""
    monkeypatch.setattr(data, "_reachable", lambda host: True)


def _assert_same(actual: data.Dataset, expected: data.Dataset) -> None:
    assert actual.class_names == expected.class_names
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), name)


def _warnings(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "train.data" and record.levelno >= logging.WARNING
    ]


# --- offline: one line naming the alternatives; the archive put in the cache is used ------


@pytest.mark.parametrize("default_cache", [False, True])
def test_offline_error_names_the_alternatives(
    offline, official, tmp_path, monkeypatch, default_cache
):
    monkeypatch.setattr(data, "_import_tfds", lambda: None)
    if default_cache:  # ~/.cache/swats_jax, with ~ in tmp_path
        monkeypatch.setenv("HOME", str(tmp_path))
        cache_dir, cache = None, tmp_path / ".cache" / "swats_jax"
    else:
        cache_dir = cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as error:
        data.load_cifar10("cifar10", cache_dir=cache_dir)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("cannot download CIFAR-10: http://127.0.0.1:")
    assert "failed: <urlopen error" in message
    expected_path = cache / "cifar-10-python.tar.gz"
    for alternative in [
        f"put cifar-10-python.tar.gz at {expected_path}, where the next run finds it",
        "--data PATH with a local cifar-10-python.tar.gz",
        "a cifar-10-batches-py folder",
        "an image-folder archive (train/<class>/*.jpg, test/<class>/*.jpg)",
        "--data synthetic for a smoke run",
    ]:
        assert alternative in message
    assert not expected_path.exists()

    # Following the advice works, still offline.
    archive, expected = official
    expected_path.write_bytes(archive.read_bytes())
    _assert_same(data.load_cifar10("cifar10", cache_dir=cache_dir), expected)


def test_an_archive_in_the_cache_is_used_before_tfds(official, offline, tmp_path, monkeypatch):
    archive, expected = official
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    calls = []
    monkeypatch.setattr(data, "_try_tfds", lambda *args: calls.append(args))
    _assert_same(data.load_cifar10("cifar10", cache_dir=tmp_path), expected)
    assert calls == []


# --- TensorFlow Datasets failing: one warning line, then the official archive -------------


def _broken_tfds_download():
    """The error TFDS 4.9 raised building cifar10 where importlib_resources was missing."""
    return ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")


def _failed_tfds_download():
    """Like the requests error TFDS raises offline, with a second line."""
    return ConnectionError(
        "HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max retries exceeded\n"
        "(Caused by NameResolutionError)"
    )


@pytest.mark.parametrize(
    ("make_error", "named"),
    [
        (_broken_tfds_download, "ModuleNotFoundError: No module named 'importlib_resources'"),
        (_failed_tfds_download, "ConnectionError: HTTPSConnectionPool(host="),
    ],
)
@pytest.mark.usefixtures("tfds_online")
def test_tfds_failure_falls_back_to_the_official_archive(
    serve_official, tmp_path, monkeypatch, caplog, make_error, named
):
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # as importing JAX leaves it
    seen = []

    def failing_download_and_prepare(*args, **kwargs):
        absl_logger = logging.getLogger("absl")
        seen.append((os.environ.get("TF_CPP_MIN_LOG_LEVEL"), absl_logger.getEffectiveLevel()))
        raise make_error()

    with tfds.testing.mock_data(num_examples=6):
        with mock.patch.object(
            tfds.core.DatasetBuilder, "download_and_prepare", failing_download_and_prepare
        ):
            with caplog.at_level(logging.INFO, logger="train.data"):
                dataset = data.load_cifar10("cifar10", cache_dir=tmp_path)

    _assert_same(dataset, serve_official)  # the official archive's content, not TFDS's mock
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    (warning,) = _warnings(caplog)
    assert "\n" not in warning
    assert warning.startswith("TensorFlow Datasets could not load cifar10 (")
    assert named in warning
    assert warning.endswith("; using the official cifar-10-python.tar.gz instead")
    # TensorFlow's logs were kept to errors while it ran, and restored after.
    assert seen == [("3", logging.ERROR)]
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    assert logging.getLogger("absl").level != logging.ERROR


@pytest.mark.parametrize(("before", "during"), [(None, "3"), ("1", "3"), ("0", "0"), ("2", "2")])
def test_tensorflow_log_level_is_raised_unless_the_user_chose_one(monkeypatch, before, during):
    if before is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", before)
    tensorflow_logger = logging.getLogger("tensorflow")
    level = tensorflow_logger.level
    with data._quiet_tensorflow():
        assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == during
        assert tensorflow_logger.level == logging.ERROR
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == before
    assert tensorflow_logger.level == level


@pytest.mark.usefixtures("tfds_online")
def test_a_bad_tfds_dataset_is_an_error_not_a_fallback(official, tmp_path, monkeypatch):
    """Arrays that TFDS delivered and that fail the checks are reported, not papered over."""
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "CIFAR10_URL", official[0].as_uri())
    downloads = []
    monkeypatch.setattr(data, "download", lambda *args, **kwargs: downloads.append(args))

    def bad(dataset, source):
        raise DatasetError(f"{source}: train labels lie outside 0..9")

    monkeypatch.setattr(data, "checked", bad)
    with tfds.testing.mock_data(num_examples=6):
        with pytest.raises(DatasetError, match="tensorflow_datasets cifar10: train labels"):
            data.load_cifar10("cifar10", cache_dir=tmp_path)
    assert downloads == []


# --- TensorFlow Datasets not installed (silent) or failing to import (one warning) ---------


def test_tfds_not_installed_uses_the_official_archive_silently(
    serve_official, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow: not found
    with caplog.at_level(logging.INFO, logger="train.data"):
        _assert_same(data.load_cifar10("cifar10", cache_dir=tmp_path), serve_official)
    assert _warnings(caplog) == []


def test_tfds_failing_to_import_warns_and_uses_the_official_archive(
    serve_official, tmp_path, monkeypatch, caplog
):
    real_import = builtins.__import__

    def import_(name, *args, **kwargs):
        if name == "tensorflow":  # installed, but one of its dependencies is missing
            raise ModuleNotFoundError("No module named 'ml_dtypes'", name="ml_dtypes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_)
    with caplog.at_level(logging.INFO, logger="train.data"):
        dataset = data.load_cifar10("cifar10", cache_dir=tmp_path)
    _assert_same(dataset, serve_official)
    assert _warnings(caplog) == [
        "TensorFlow Datasets could not load cifar10 (ModuleNotFoundError: No module named "
        "'ml_dtypes'); using the official cifar-10-python.tar.gz instead"
    ]


@pytest.mark.usefixtures("offline")
def test_offline_tfds_is_skipped_at_once(tmp_path, monkeypatch, caplog):
    """Offline, TFDS (which retries its download for minutes) is not tried: the official
    route's one-line error comes at once, with no warning before it."""
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_reachable", lambda host: False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("TFDS tried to download")

    with tfds.testing.mock_data(num_examples=6):
        with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run):
            with pytest.raises(DatasetError, match="cannot download CIFAR-10"):
                data.load_cifar10("cifar10", cache_dir=tmp_path)
    assert _warnings(caplog) == []


def test_reachable_says_no_for_a_closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert not data._reachable("127.0.0.1", port, timeout_s=1.0)
