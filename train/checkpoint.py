"""Per-epoch checkpoints of a training state with Orbax, with fallback past corrupt ones.

A state is any pytree of arrays: nested dicts (``flax.nnx.to_pure_dict`` output, int keys
included), tuples and NamedTuples such as optax's and ``swats_jax.SwatsState`` (``None``
fields included). Orbax stores NamedTuples as dicts and int keys as strings, so restoring
needs a ``target`` of the same structure, which gives back the exact types.

Before restoring, each checkpoint's metadata (leaf paths, shapes and dtypes) is compared
with the target: Orbax would otherwise silently cast dtypes and drop leaves that the
checkpoint lacks. Orbax stores no checksums either, so bytes flipped inside an array's data
would restore without error: each save records a SHA-256 digest of every array (of its
dtype, shape and bytes) in the checkpoint's metadata, and a restore checks them. The first
save with digests also writes ``digests.json`` in the directory, saying from which epoch
the checkpoints have them: a checkpoint of that epoch or later without its digests (its
metadata file deleted or lost) is corrupt, while checkpoints saved without digests, by
earlier versions, restore unchecked. A checkpoint that cannot be
read, does not match or fails its digests is reported and skipped for the one before it; if
none can be restored, :class:`CheckpointError` says why rather than letting the run start
over and overwrite the user's progress.

Example::

    with Checkpointer(workdir / "checkpoints") as checkpointer:
        restored = checkpointer.restore_latest(state)
        start_epoch, state = restored if restored is not None else (0, state)
        for epoch in range(start_epoch + 1, num_epochs + 1):
            state = train_one_epoch(state)
            checkpointer.save(epoch, state)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.messages import one_line

logger = logging.getLogger(__name__)

# Orbax's name for the only item of a single-item CheckpointManager.
_ITEM_NAME = "default"
# Orbax and TensorStore errors embed whole JSON specs; the first line says what went wrong.
_MAX_ERROR_CHARS = 300
_MAX_LISTED_PATHS = 5
# The key of the per-array digests in a checkpoint's custom metadata.
_DIGESTS = "sha256_by_array"
# In the checkpoint directory: from which epoch its checkpoints have digests.
_DIGESTS_MARKER = "digests.json"
_DIGESTS_FROM = "digests_from_epoch"
# How TensorStore's errors end when a write failed in the operating system.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


class CheckpointError(RuntimeError):
    """A checkpoint directory holds checkpoints but none can be restored into the target,
    or a checkpoint cannot be saved (a full disk, say)."""


class Checkpointer:
    """Saves one checkpoint per epoch under ``directory``, keeping the ``keep`` latest.

    Saving is blocking: the checkpoint is complete on disk when :meth:`save` returns
    (Orbax writes it to a temporary directory and renames it, so a crash mid-save leaves
    no partial checkpoint behind). Use as a context manager, or call :meth:`close`.

    Args:
      directory: folder of the checkpoints, one subfolder per epoch; created if missing.
      keep: number of most recent checkpoints to keep (at least 1).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        # Registered up front so that a fresh manager can read the metadata of existing
        # checkpoints before any save or restore has told it the handler.
        registry.add(_ITEM_NAME, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(_ITEM_NAME, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def save(self, epoch: int, state: Any) -> None:
        """Saves ``state`` as the checkpoint of ``epoch``; blocks until it is on disk.

        Checkpoints of ``epoch`` or later already in the directory are deleted first: they
        belong to a history this run abandoned, such as a corrupt checkpoint that
        :meth:`restore_latest` skipped. Orbax would otherwise skip the save (it only saves
        epochs past its latest), and the stale checkpoint would shadow the new one on resume.
        """
        stale = [step for step in self._manager.all_steps() if step >= epoch]
        if stale:
            logger.warning(
                "Replacing checkpoints of epochs %s in %s with the new one of epoch %d.",
                stale,
                self.directory,
                epoch,
            )
            for step in stale:
                self._manager.delete(step)
        # The digests go into the checkpoint's own metadata, which Orbax writes before it
        # renames the finished checkpoint into place: a checkpoint has them or is not there.
        digests = array_digests(state)
        try:
            self._mark_digests_from(epoch)
            saved = self._manager.save(
                epoch,
                args=ocp.args.StandardSave(state),
                force=True,
                custom_metadata={_DIGESTS: digests},
            )
        except Exception as error:  # TensorStore's write errors are ValueErrors, not OSErrors
            raise CheckpointError(
                f"cannot save the checkpoint of epoch {epoch} in {self.directory}: "
                f"{_describe_save_error(error)}"
            ) from error
        if not saved:
            raise CheckpointError(f"Orbax did not save epoch {epoch} in {self.directory}.")

    def latest_epoch(self) -> int | None:
        """Returns the latest saved epoch (whether or not it can be restored), or None."""
        return self._manager.latest_step()

    def restore_latest(self, target: Any) -> tuple[int, Any] | None:
        """Restores the latest checkpoint that can be restored into ``target``.

        Args:
          target: a pytree with the structure, shapes and dtypes of the saved state, of
            arrays or ``jax.ShapeDtypeStruct``s.

        Returns:
          ``(epoch, state)``, ``state`` having exactly the structure of ``target``; None
          when the directory holds no checkpoint.

        Raises:
          CheckpointError: there are checkpoints but none can be restored, because they
            are corrupt or do not match ``target`` (say, another model or optimizer).
        """
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            step_directory = self.directory / str(step)
            try:
                return step, self._restore(step, target)
            except Exception as error:  # Orbax and TensorStore raise many kinds.
                message = _describe(error)
                failures.append(f"epoch {step} ({step_directory}): {message}")
                logger.warning(
                    "Skipping the checkpoint of epoch %d (%s), which cannot be restored: %s",
                    step,
                    step_directory,
                    message,
                )
        if failures:
            raise CheckpointError(
                f"No checkpoint in {self.directory} can be restored; move the directory away "
                "to start over; " + "; ".join(failures)
            )
        return None

    def close(self) -> None:
        """Waits for pending operations and releases Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _restore(self, step: int, target: Any) -> Any:
        metadata = self._manager.item_metadata(step)
        if metadata is None:
            raise CheckpointError("its metadata is missing")
        mismatch = _describe_mismatch(_leaf_specs(metadata.tree), _leaf_specs(target))
        if mismatch:
            raise CheckpointError(f"it does not match the target: {mismatch}")
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        saved = (self._manager.metadata(step).custom_metadata or {}).get(_DIGESTS)
        digests_from = self._digests_from()
        if saved is None and digests_from is not None and step >= digests_from:
            raise CheckpointError(
                f"its digests are missing, although the checkpoints of this directory have "
                f"them from epoch {digests_from}: the checkpoint is corrupt"
            )
        if saved is not None:  # None: saved before checkpoints had digests
            current = array_digests(restored)
            differing = sorted(
                p for p in current.keys() | saved.keys() if current.get(p) != saved.get(p)
            )
            if differing:
                raise CheckpointError(
                    f"{len(differing)} arrays differ from the digests saved with them "
                    f"{_some(differing)}: the checkpoint is corrupt"
                )
        return restored

    def _digests_from(self) -> int | None:
        """The first epoch whose checkpoints have digests, from the marker; None without one
        (a directory of an earlier version). A marker that cannot be read counts as epoch 0:
        every checkpoint must then have its digests."""
        path = self.directory / _DIGESTS_MARKER
        try:
            return int(json.loads(path.read_text())[_DIGESTS_FROM])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            return 0

    def _mark_digests_from(self, epoch: int) -> None:
        """Records (process 0) that the checkpoints from ``epoch`` on have digests, before
        the first of them is saved (or one before the recorded epoch, after a fallback)."""
        digests_from = self._digests_from()
        if jax.process_index() != 0 or (digests_from is not None and digests_from <= epoch):
            return
        path = self.directory / _DIGESTS_MARKER
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps({_DIGESTS_FROM: epoch}) + "\n")
        os.replace(temporary, path)


def array_digests(state: Any) -> dict[str, str]:
    """The SHA-256 digest (hex) of every array of ``state``, of its dtype, shape and bytes,
    by readable path (``opt_state/0/mu/conv/kernel``).

    A leaf must be fully addressable or fully replicated (a replicated array of a
    multi-process run is read from its first local shard). This is one host transfer of
    the state, as a save makes anyway.
    """
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                raise ValueError(
                    f"cannot digest {_path(path)}: it is neither addressable nor replicated"
                )
            leaf = leaf.addressable_shards[0].data
        value = np.ascontiguousarray(leaf)
        digest = hashlib.sha256(f"{value.dtype.name}{list(value.shape)}".encode())
        digest.update(value.reshape(-1).view(np.uint8))
        digests[_path(path)] = digest.hexdigest()
    return digests


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Maps the readable path of each leaf (``opt/0/mu/conv/kernel``) to its shape and dtype."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path(path): (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in leaves}


def _describe_mismatch(saved: dict, target: dict) -> str:
    """Says how the saved leaves differ from the target's; empty when they agree."""
    problems = []
    missing = sorted(target.keys() - saved.keys())
    if missing:
        problems.append(f"{len(missing)} target leaves not in the checkpoint {_some(missing)}")
    extra = sorted(saved.keys() - target.keys())
    if extra:
        problems.append(f"{len(extra)} checkpoint leaves not in the target {_some(extra)}")
    differing = [
        f"{path} is {_spec(saved[path])} in the checkpoint, {_spec(target[path])} in the target"
        for path in sorted(saved.keys() & target.keys())
        if saved[path] != target[path]
    ]
    if differing:
        problems.append(f"{len(differing)} leaves differ {_some(differing)}")
    return "; ".join(problems)


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_PATHS])
    return f"({shown}, ...)" if len(items) > _MAX_LISTED_PATHS else f"({shown})"


def _spec(spec: tuple[tuple[int, ...], np.dtype]) -> str:
    shape, dtype = spec
    return f"{dtype.name}{list(shape)}"


def _describe(error: Exception) -> str:
    """One line about ``error``: ours in full, Orbax's and TensorStore's reduced to the class
    and first line of the error at the root of the chain (Orbax wraps TensorStore's read
    errors in one that prints a whole TensorStore spec), without their internals."""
    if isinstance(error, CheckpointError):
        return str(error)
    for _ in range(10):  # a chain is short; a cycle must not hang the restore
        if error.__cause__ is None or not str(error.__cause__).strip():
            break
        error = error.__cause__
    return one_line(error, limit=_MAX_ERROR_CHARS)


def _describe_save_error(error: Exception) -> str:
    """One line about a failed save. TensorStore reports a failed write (a full disk, a
    file-size limit) as a ValueError whose message names every file of the write before its
    reason, ``[os_error_code='28']``: the reason, as the system says it, comes first."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({error.filename})" if error.filename else error.strerror
    for _ in range(10):
        match = _OS_ERROR_CODE.search(str(error))
        if match:
            return f"{os.strerror(int(match[1]))} ({_describe(error)})"
        if error.__cause__ is None:
            break
        error = error.__cause__
    return _describe(error)
