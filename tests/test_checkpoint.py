"""Tests of train.checkpoint: exact round trips, retention and fallback past corrupt files."""

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import flip_a_byte_inside_an_array

from train.checkpoint import Checkpointer, CheckpointError, array_digests

# When some of a checkpoint's files are missing, a TensorStore read can complete after Orbax
# closed its event loop: Python then reports "RuntimeError: Event loop is closed" from a
# TensorStore thread. It is noise after the error that restore_latest already handled.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class FakeSwatsState(NamedTuple):
    """Like swats_jax.SwatsState: a scalar count, per-leaf trees and a None field."""

    count: jax.Array
    mu: dict
    nu_max: None
    switched: dict


def make_state(seed: int = 0) -> dict:
    """A small training state exercising int keys, bf16/int32/bool leaves and NamedTuples."""
    rng = np.random.default_rng(seed)
    params = {
        "layers": {
            0: {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.bfloat16)},
            1: {"bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
        }
    }
    return {
        "params": params,
        "adam": optax.adam(1e-3).init(params),
        "swats": FakeSwatsState(
            count=jnp.asarray(seed, jnp.int32),
            mu=jax.tree.map(lambda p: p + 1, params),
            nu_max=None,
            switched=jax.tree.map(lambda p: jnp.asarray(seed % 2 == 0), params),
        ),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "step": jnp.asarray(100 * seed, jnp.int32),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def assert_bit_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        as_bytes = [np.asarray(x).reshape(-1).view(np.uint8) for x in (a, e)]
        np.testing.assert_array_equal(*as_bytes)


def corrupt(step_directory, how: str):
    """Damages every data file of a checkpoint (OCDBT data and manifests, JSON metadata)."""
    files = [path for path in step_directory.rglob("*") if path.is_file()]
    assert files
    for path in files:
        if how == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(b"\x00garbage\xff" * 7)


@pytest.mark.parametrize("as_abstract", [False, True])
def test_round_trip_is_bit_exact_with_structure_and_dtypes(tmp_path, as_abstract):
    state = make_state(seed=3)
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(7, state)
        target = make_state(seed=0)
        epoch, restored = checkpointer.restore_latest(abstract(target) if as_abstract else target)
    assert epoch == 7
    assert_bit_identical(restored, state)
    assert type(restored["swats"]) is FakeSwatsState and restored["swats"].nu_max is None
    assert type(restored["adam"][0]) is optax.ScaleByAdamState
    assert list(restored["params"]["layers"]) == [0, 1]
    key = jax.random.wrap_key_data(restored["rng"])
    assert jax.random.key_data(key).dtype == jnp.uint32


def test_save_is_on_disk_when_it_returns(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, make_state(1))
    with Checkpointer(tmp_path) as reader:
        epoch, restored = reader.restore_latest(abstract(make_state()))
    assert epoch == 1
    assert_bit_identical(restored, make_state(1))
    checkpointer.close()


def test_keeps_the_last_n(tmp_path):
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        assert checkpointer.latest_epoch() is None
        for epoch in range(1, 5):
            checkpointer.save(epoch, make_state(epoch))
        assert checkpointer.latest_epoch() == 4
    assert sorted(int(path.name) for path in tmp_path.iterdir() if path.name.isdigit()) == [3, 4]
    with Checkpointer(tmp_path, keep=2) as checkpointer:
        assert checkpointer.restore_latest(make_state())[0] == 4


@pytest.mark.parametrize("how", ["truncate", "garbage", "delete"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, how):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, make_state(1))
        checkpointer.save(2, make_state(2))
    if how == "delete":
        for path in (tmp_path / "2").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                path.unlink()
    else:
        corrupt(tmp_path / "2", how)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        with Checkpointer(tmp_path) as checkpointer:
            epoch, restored = checkpointer.restore_latest(make_state())
    assert epoch == 1
    assert_bit_identical(restored, make_state(1))
    warnings = [r for r in caplog.records if r.name == "train.checkpoint"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert str(tmp_path / "2") in warnings[0].getMessage()


def test_saving_after_a_fallback_replaces_the_corrupt_checkpoint(tmp_path, caplog):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, make_state(1))
        checkpointer.save(2, make_state(2))
    corrupt(tmp_path / "2", "garbage")
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.restore_latest(make_state())[0] == 1
        checkpointer.save(2, make_state(5))
    with Checkpointer(tmp_path) as checkpointer:
        epoch, restored = checkpointer.restore_latest(make_state())
    assert epoch == 2
    assert_bit_identical(restored, make_state(5))


def test_all_corrupt_raises_naming_each_failure(tmp_path):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, make_state(1))
        checkpointer.save(2, make_state(2))
    corrupt(tmp_path / "1", "truncate")
    corrupt(tmp_path / "2", "garbage")
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError) as info:
            checkpointer.restore_latest(make_state())
    message = str(info.value)
    assert str(tmp_path) in message
    assert str(tmp_path / "1") in message and str(tmp_path / "2") in message
    assert "\n" not in message  # the CLI prints it as one line


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: {**s, "extra": jnp.zeros(2)}, "not in the checkpoint (extra)"),
        (lambda s: {k: v for k, v in s.items() if k != "step"}, "not in the target (step)"),
        (
            lambda s: {**s, "step": jnp.zeros((), jnp.float32)},
            "step is int32[] in the checkpoint, float32[] in the target",
        ),
        (
            lambda s: {**s, "rng": jnp.zeros((4,), jnp.uint32)},
            "rng is uint32[2] in the checkpoint, uint32[4] in the target",
        ),
        (lambda s: {**s, "swats": s["swats"]._replace(nu_max=s["params"])}, "swats/nu_max/"),
    ],
)
def test_structure_mismatch_raises_a_clear_error(tmp_path, change, expected):
    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, make_state(1))
        with pytest.raises(CheckpointError, match="does not match the target") as info:
            checkpointer.restore_latest(change(make_state()))
    assert expected in str(info.value)


def test_empty_directory_gives_none(tmp_path):
    with Checkpointer(tmp_path / "new") as checkpointer:
        assert checkpointer.latest_epoch() is None
        assert checkpointer.restore_latest(make_state()) is None


def _truncate_largest_file(step_directory):
    """Cuts the largest file (array chunks) in half: Orbax then wraps TensorStore's read error
    in one that prints ``<bound method ...spec of TensorStore({...`` (orbax-checkpoint 0.12)."""
    largest = max(
        (path for path in step_directory.rglob("*") if path.is_file()),
        key=lambda p: p.stat().st_size,
    )
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def _state_with_a_large_array(seed):
    # An array above TensorStore's inline limit (1 KiB compressed) is stored as a chunk of its
    # own, in the largest file of the checkpoint.
    w = np.random.default_rng(seed).normal(size=(64, 64))
    return {"params": make_state(seed)["params"], "w": jnp.asarray(w, jnp.float32)}


def _restore_after_damaging_epoch_2(tmp_path, caplog, state, damage, save_epoch_1=None):
    """Saves epochs 1 and 2 of ``state(epoch)`` (epoch 1 by ``save_epoch_1(checkpointer)``
    when given), damages epoch 2 with ``damage(step_directory)`` and restores: the restore
    must fall back to epoch 1, bit-exactly, with one warning, which it returns."""
    with Checkpointer(tmp_path) as checkpointer:
        if save_epoch_1 is None:
            checkpointer.save(1, state(1))
        else:
            save_epoch_1(checkpointer)
        checkpointer.save(2, state(2))
    damage(tmp_path / "2")
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        with Checkpointer(tmp_path) as checkpointer:
            epoch, restored = checkpointer.restore_latest(state(0))
    assert epoch == 1
    assert_bit_identical(restored, state(1))
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "train.checkpoint"]
    return warning


@pytest.mark.parametrize("how", ["truncate", "garbage", "chunks"])
def test_corrupt_checkpoint_warning_is_one_readable_line(tmp_path, caplog, how):
    def damage(step_directory):
        if how == "chunks":
            _truncate_largest_file(step_directory)
        else:
            corrupt(step_directory, how)

    warning = _restore_after_damaging_epoch_2(tmp_path, caplog, _state_with_a_large_array, damage)
    assert warning.startswith(f"Skipping the checkpoint of epoch 2 ({tmp_path / '2'}), which ")
    assert "\n" not in warning and len(warning) < 500
    for internals in ("pybind11", "TensorStore(", "<bound method", "tensorstore_spec"):
        assert internals not in warning
    assert "Error" in warning.split("cannot be restored: ")[1]  # the error's class


def test_a_flipped_byte_fails_the_digest_and_falls_back(tmp_path, caplog):
    warning = _restore_after_damaging_epoch_2(
        tmp_path, caplog, _state_with_a_large_array, flip_a_byte_inside_an_array
    )
    assert warning.startswith(f"Skipping the checkpoint of epoch 2 ({tmp_path / '2'}), which ")
    assert "1 arrays differ from the digests saved with them (w)" in warning


def test_checkpoints_without_digests_restore_without_a_warning(tmp_path, caplog):
    # As saved before checkpoints had digests: Orbax's save without custom metadata.
    with Checkpointer(tmp_path) as checkpointer:
        saved = checkpointer._manager.save(1, args=ocp.args.StandardSave(make_state(1)))
        assert saved
    with caplog.at_level(logging.WARNING):
        with Checkpointer(tmp_path) as checkpointer:
            epoch, restored = checkpointer.restore_latest(make_state())
    assert epoch == 1
    assert_bit_identical(restored, make_state(1))
    assert [r for r in caplog.records if r.name.startswith("train")] == []


def test_digests_cover_dtype_shape_and_bytes():
    state = {"a": np.zeros(4, np.float32), "b": np.zeros((2, 2), np.float32)}
    digests = array_digests(state)
    assert digests["a"] != digests["b"]  # same bytes, other shape
    assert array_digests({"a": np.zeros(4, np.int32)})["a"] != digests["a"]
    assert array_digests(jax.tree.map(jnp.asarray, state)) == digests


def test_a_checkpoint_without_its_digests_in_a_directory_with_digests_is_corrupt(tmp_path, caplog):
    # Deleting a checkpoint's metadata file deletes its digests: without the directory's
    # record that its checkpoints have them, it would restore unchecked.
    def damage(step_directory):
        assert (tmp_path / "digests.json").exists()
        (step_directory / "_CHECKPOINT_METADATA").unlink()

    warning = _restore_after_damaging_epoch_2(tmp_path, caplog, make_state, damage)
    assert warning.startswith(f"Skipping the checkpoint of epoch 2 ({tmp_path / '2'}), which ")
    assert "its digests are missing" in warning


def test_checkpoints_older_than_the_digests_restore_unchecked(tmp_path, caplog):
    # A run of an earlier version, resumed by this one: its epoch 1 has no digests, its
    # epoch 2 has; a fallback to epoch 1 restores it unchecked, without a second warning.
    def save_without_digests(checkpointer):
        assert checkpointer._manager.save(1, args=ocp.args.StandardSave(make_state(1)))

    warning = _restore_after_damaging_epoch_2(
        tmp_path,
        caplog,
        make_state,
        lambda step_directory: corrupt(step_directory, "garbage"),
        save_epoch_1=save_without_digests,
    )
    assert "epoch 2" in warning


def test_a_failed_save_is_one_line_naming_the_epoch_and_directory(tmp_path, monkeypatch):
    # TensorStore reports a full disk (or a file-size limit) as a ValueError.
    def fail(self, *args, **kwargs):
        raise ValueError(
            "OUT_OF_RANGE: Error writing \"d/abc\": File too large [os_error_code='27'] "
            '[tensorstore_spec=\'{"driver": "ocdbt"}\']'
        )

    with Checkpointer(tmp_path) as checkpointer:
        checkpointer.save(1, make_state(1))
        monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fail)
        with pytest.raises(CheckpointError) as error:
            checkpointer.save(2, make_state(2))
    message = str(error.value)
    prefix = f"cannot save the checkpoint of epoch 2 in {tmp_path}: File too large (ValueError: "
    assert message.startswith(prefix), message
    assert "[os_error_code='27']" in message and "\n" not in message
    assert "tensorstore_spec" not in message
    monkeypatch.undo()
    with Checkpointer(tmp_path) as checkpointer:
        epoch, restored = checkpointer.restore_latest(make_state())
    assert epoch == 1
    assert_bit_identical(restored, make_state(1))
