"""A run's logs on disk: its metrics per epoch, its SWATS switch table and switch tests.

A run directory holds ``metrics.jsonl`` (one JSON object per epoch, appended as the run
goes) with ``metrics.csv`` (the same records, rewritten from it each epoch), and for SWATS
runs ``switches.md`` / ``switches.csv`` (the per-layer table of
:func:`swats_jax.format_switch_table`, whose CSV columns are ``layer,step,sgd_lr``) and
``rates.csv`` (each layer's last switch test at the end of every epoch, from
:func:`swats_jax.switch_diagnostics`; columns ``RATES_FIELDS``).
The trainer writes them through :class:`MetricsLog`, :func:`write_switch_table` and
:func:`append_rates`; ``train.plots`` reads them through :func:`read_metrics`,
:func:`read_switch_table` and :func:`read_rates`. Reading needs neither JAX nor Matplotlib.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.messages import describe_error

if TYPE_CHECKING:
    from swats_jax import SwitchDiagnostic, SwitchEvent

logger = logging.getLogger(__name__)

METRICS_FIELDS = (
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "sgd_scale",
    "num_switched",
    "epoch_time_s",
    "compile_time_s",
    "images_per_s",
    "complete",
)


# The columns of rates.csv: per epoch and layer, the fields of swats_jax.SwitchDiagnostic
# that change over a run (its switch step is in switches.csv).
RATES_FIELDS = ("epoch", "layer", "phase", "estimate", "gamma", "absolute_gap", "relative_gap")


class MetricsError(ValueError):
    """A run's ``metrics.jsonl``, ``switches.csv`` or ``rates.csv`` cannot be read."""


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads a run's ``metrics.jsonl``, one dict per line.

    A last line that does not parse, as left by a crash mid-write, is ignored with a
    logged warning.

    Raises:
      MetricsError: the file is missing, or a line before the last is not a JSON object.
    """
    path = Path(workdir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        reason = describe_error(error, with_file=False)
        raise MetricsError(f"cannot read {path}: {reason}") from error
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: ignoring the truncated last line %d", path, number)
                break
            raise MetricsError(f"{path}, line {number}: not JSON ({error})") from error
        if not isinstance(record, dict):
            raise MetricsError(f"{path}, line {number}: expected a JSON object")
        records.append(record)
    return records


class MetricsLog:
    """The metrics of a run being trained: ``metrics.jsonl`` and ``metrics.csv``.

    ``metrics.jsonl`` is replaced atomically on every write, and ``metrics.csv`` rewritten
    from the same records with the columns ``METRICS_FIELDS``.
    """

    def __init__(self, workdir: str | os.PathLike[str]):
        workdir = Path(workdir)
        self.jsonl = workdir / "metrics.jsonl"
        self.csv = workdir / "metrics.csv"

    def records(self) -> list[dict[str, Any]]:
        """The records so far; none before the first epoch.

        Raises:
          MetricsError: a line before the last does not parse. The run stops rather than
            rewrite the file without it.
        """
        if not self.jsonl.exists():
            return []
        try:
            return read_metrics(self.jsonl.parent)
        except MetricsError as err:
            raise MetricsError(f"{err}; repair or move the file to continue the run") from err

    def keep_epochs_up_to(self, epoch: int) -> None:
        """Drops the records past ``epoch``, and incomplete ones (after resuming from
        the checkpoint of ``epoch``)."""
        self._write([r for r in self.records() if r["epoch"] <= epoch and r["complete"]])

    def append(self, record: dict[str, Any]) -> None:
        """Adds the record of one epoch, with the keys ``METRICS_FIELDS``."""
        self._write([*self.records(), record])

    def _write(self, records: list[dict[str, Any]]) -> None:
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(_strict(r), allow_nan=False) + "\n" for r in records))
        os.replace(tmp, self.jsonl)
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
            writer.writeheader()
            writer.writerows(records)


def _strict(record: dict[str, Any]) -> dict[str, Any]:
    """The record with NaN and infinities as ``None`` (JSON ``null``, which strict readers
    accept, unlike ``NaN``)."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


def write_switch_table(workdir: str | os.PathLike[str], events: list[SwitchEvent]) -> None:
    """Writes ``switches.md`` and ``switches.csv`` in ``workdir``.

    Args:
      workdir: the run directory.
      events: as :func:`swats_jax.switch_events` returns them.
    """
    # Imported here, where the caller has JAX loaded already, so that reading a run does not.
    from swats_jax import format_switch_table

    workdir = Path(workdir)
    (workdir / "switches.md").write_text(format_switch_table(events))
    (workdir / "switches.csv").write_text(format_switch_table(events, "csv"))


def read_switch_table(workdir: str | os.PathLike[str]) -> list[tuple[str, int, float]]:
    """Reads a run's ``switches.csv``.

    Returns:
      One ``(layer, step, sgd_lr)`` per switched layer, in the order of the file (by
      switch step).

    Raises:
      MetricsError: the file is missing or lacks the columns ``layer,step,sgd_lr``.
    """
    path = Path(workdir) / "switches.csv"
    try:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
    except OSError as error:
        reason = describe_error(error, with_file=False)
        raise MetricsError(f"cannot read {path}: {reason}") from error
    try:
        return [(row["layer"], int(row["step"]), float(row["sgd_lr"])) for row in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise MetricsError(f"{path}: expected the columns layer,step,sgd_lr ({error})") from error


def append_rates(workdir: str | os.PathLike[str], epoch: int, rows: list[SwitchDiagnostic]) -> None:
    """Appends one epoch's switch tests to ``rates.csv`` in ``workdir`` (with its header
    when the file is new).

    Args:
      workdir: the run directory.
      epoch: the 1-based epoch the rows end.
      rows: as :func:`swats_jax.switch_diagnostics` returns them. NaN (no test ran yet)
        is written as ``nan``; floats with 9 significant digits, enough for float32.
    """
    path = Path(workdir) / "rates.csv"
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(RATES_FIELDS)
        for row in rows:
            values = (row.estimate, row.gamma, row.absolute_gap, row.relative_gap)
            writer.writerow([epoch, row.path, row.phase, *(f"{v:.9g}" for v in values)])


def read_rates(
    workdir: str | os.PathLike[str],
) -> list[tuple[int, str, str, float, float, float, float]]:
    """Reads a run's ``rates.csv``.

    A last row cut short, as left by a crash mid-write, is ignored with a logged warning.

    Returns:
      One ``(epoch, layer, phase, estimate, gamma, absolute_gap, relative_gap)`` per
      row, in the order of the file (by epoch, then in the optimizer state's order).

    Raises:
      MetricsError: the file is missing, lacks the columns ``RATES_FIELDS``, or has a
        malformed row before the last.
    """
    path = Path(workdir) / "rates.csv"
    try:
        with path.open(newline="") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            rows = list(reader)
    except OSError as error:
        reason = describe_error(error, with_file=False)
        raise MetricsError(f"cannot read {path}: {reason}") from error
    if header is None or tuple(header) != RATES_FIELDS:
        raise MetricsError(f"{path}: expected the columns {','.join(RATES_FIELDS)}")
    parsed = []
    for number, row in enumerate(rows, start=2):
        try:
            if len(row) != len(RATES_FIELDS) or row[2] not in ("adam", "sgd"):
                raise ValueError(f"expected {len(RATES_FIELDS)} fields, phase adam or sgd")
            parsed.append((int(row[0]), row[1], row[2], *(float(v) for v in row[3:])))
        except ValueError as error:
            if number == len(rows) + 1:
                logger.warning("%s: ignoring the truncated last line %d", path, number)
                break
            raise MetricsError(f"{path}, line {number}: {error}") from error
    return parsed


def keep_rates_up_to(workdir: str | os.PathLike[str], epoch: int) -> None:
    """Drops the rows of ``rates.csv`` past ``epoch`` (after resuming from the checkpoint
    of ``epoch``), and a last row cut short; nothing to do without the file.

    Raises:
      MetricsError: the file cannot be read (see :func:`read_rates`). The run stops rather
        than rewrite the file without its rows.
    """
    path = Path(workdir) / "rates.csv"
    if not path.exists():
        return
    try:
        rows = read_rates(workdir)
    except MetricsError as err:
        raise MetricsError(f"{err}; repair or move the file to continue the run") from err
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(RATES_FIELDS)
        for row in rows:
            if row[0] <= epoch:
                writer.writerow([*row[:3], *(f"{v:.9g}" for v in row[3:])])
    os.replace(tmp, path)
