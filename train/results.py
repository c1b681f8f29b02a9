"""Results of runs over seeds: runs that differ only by seed, grouped, in one table.

Runs are grouped when their ``config.json`` agree on every field except ``seed``,
``workdir`` and the fields a resumed run may change (``train.config.MAY_CHANGE_ON_RESUME``:
``epochs``, ``max_steps``, ...), and their seeds all differ. A field missing from an older
``config.json`` counts as its default. Runs with the same configuration and the same seed
(repeats) are not grouped: each is a group of one.

The table has one row per group: optimizer, model and every other grouped field whose
value differs between the rows, the seeds, the epochs reached, then the final and the best
test accuracy as ``mean ± std (n)`` in percent over the group's runs, and the published
number where ``train.config.PUBLISHED_TEST_ACCURACY`` has one for the model and optimizer.
``std`` is the sample standard deviation (``ddof=1``) for ``n >= 2``, and ``—`` for a
single run. "Final" is each run's last epoch; where the runs of a group reached different
epochs, the epochs column gives the range. From the command line::

    python -m train.results runs/local-s0 runs/local-s1 runs/local-s2 runs/adam-s0

Reading needs neither JAX nor Matplotlib: metrics are read through :mod:`train.metrics`,
``config.json`` as plain JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train import metrics
from train.config import MAY_CHANGE_ON_RESUME, PUBLISHED_TEST_ACCURACY, Config

# What may differ between the runs of a group, besides the seed.
NOT_GROUPED = frozenset({"seed", "workdir"}) | MAY_CHANGE_ON_RESUME
# The fields of a config.json that lacks some, as the trainer would write them (JSON types).
_DEFAULTS: dict[str, Any] = json.loads(json.dumps(Config().to_json()))
_FIELD_ORDER = list(_DEFAULTS)
# Always columns of the table, so never among the differing fields.
_NAMED = ("opt", "model")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory, read once: its ``config.json`` and its metrics records."""

    workdir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def seed(self) -> Any:
        return self.config.get("seed", _DEFAULTS["seed"])

    @property
    def shared(self) -> dict[str, Any]:
        """The fields that the runs of a group agree on (defaults where the file lacks them)."""
        config = {**_DEFAULTS, **self.config}
        return {k: v for k, v in config.items() if k not in NOT_GROUPED}

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Epochs and values of ``metric``, by epoch, the last record of an epoch winning
        (an epoch logged twice, as by a run resumed from an earlier checkpoint).

        Raises:
          ValueError: the run has no epoch yet, or a record lacks ``epoch`` or ``metric``.
        """
        path = self.workdir / "metrics.jsonl"
        if not self.records:
            raise ValueError(f"{path} has no epoch yet")
        by_epoch = {}
        for record in self.records:
            if "epoch" not in record or metric not in record:
                available = ", ".join(sorted(record))
                raise ValueError(
                    f"{path}: a record lacks 'epoch' or {metric!r} (it has {available})"
                )
            by_epoch[record["epoch"]] = record[metric]
        epochs = sorted(by_epoch)
        return np.asarray(epochs), np.asarray([by_epoch[e] for e in epochs], dtype=float)

    def last_epoch_complete(self) -> bool:
        """Whether the last record is a whole epoch (not one cut by ``--max-steps``)."""
        return bool(self.records and self.records[-1].get("complete", True))


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs that differ only by seed (or a single run), in the order they were given."""

    runs: tuple[Run, ...]

    @property
    def config(self) -> dict[str, Any]:
        """The fields the runs agree on (those of :attr:`Run.shared`)."""
        return self.runs[0].shared

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """The epochs that every run of the group has, and ``metric`` at those epochs, one
        row per run (shape ``(runs, epochs)``).

        Raises:
          ValueError: as :meth:`Run.series`, or no epoch is common to all the runs.
        """
        series = [run.series(metric) for run in self.runs]
        common = sorted(set.intersection(*(set(epochs.tolist()) for epochs, _ in series)))
        if not common:
            names = ", ".join(str(run.workdir) for run in self.runs)
            raise ValueError(f"the runs {names} (seeds of one configuration) share no epoch")
        values = [vals[np.searchsorted(epochs, common)] for epochs, vals in series]
        return np.asarray(common), np.stack(values)


def read_run(workdir: str | os.PathLike[str]) -> Run:
    """Reads a run directory's ``config.json`` and ``metrics.jsonl``.

    Raises:
      ValueError: the directory, its config (a JSON object with ``opt`` and ``model``) or
        its metrics are missing or malformed (``train.metrics.MetricsError`` for these).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"no run directory {workdir}")
    path = workdir / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(config, dict) or "opt" not in config or "model" not in config:
        raise ValueError(f"{path}: expected a JSON object with 'opt' and 'model'")
    return Run(workdir, config, metrics.read_metrics(workdir))


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups the runs that differ only by seed (see the module docstring), in the order of
    each group's first run."""
    by_config: dict[str, list[Run]] = {}
    for run in runs:
        by_config.setdefault(json.dumps(run.shared, sort_keys=True), []).append(run)
    groups = []
    for same in by_config.values():
        seeds = [json.dumps(run.seed) for run in same]
        if len(set(seeds)) == len(seeds):
            groups.append(Group(tuple(same)))
        else:  # repeats of one seed: not a spread over seeds
            groups.extend(Group((run,)) for run in same)
    return groups


def differing_fields(groups: Sequence[Group]) -> list[str]:
    """The grouped fields, other than ``opt`` and ``model``, whose values differ between
    ``groups``, in the order of :class:`train.config.Config` (unknown fields last)."""
    configs = [group.config for group in groups]
    names = {name for config in configs for name in config} - set(_NAMED)
    differ = {n for n in names if len({json.dumps(c.get(n)) for c in configs}) > 1}
    known = [n for n in _FIELD_ORDER if n in differ]
    return known + sorted(differ - set(known))


def format_value(value: Any) -> str:
    """A config value as a table cell or label shows it (``None``: ``unset``)."""
    if value is None:
        return "unset"
    return value if isinstance(value, str) else json.dumps(value)


def mean_std(values: Sequence[float] | np.ndarray, *, percent: bool = True) -> str:
    """``"mean ± std (n)"``: the sample std (ddof=1) for n >= 2, ``—`` for n = 1."""
    values = np.asarray(values, dtype=float) * (100 if percent else 1)
    std = f"{values.std(ddof=1):.2f}" if len(values) >= 2 else "—"
    return f"{values.mean():.2f} ± {std} ({len(values)})"


def summary_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the results table (cells as text)."""
    fields = differing_fields(groups)
    header = [
        "optimizer",
        "model",
        *fields,
        "seeds",
        "epochs",
        "final test accuracy (%)",
        "best test accuracy (%)",
        "published (%)",
    ]
    rows = []
    for group in groups:
        finals, bests, reached = [], [], []
        for run in group.runs:
            epochs, values = run.series("test_accuracy")
            finals.append(values[-1])
            bests.append(values.max())
            reached.append(int(epochs[-1]))
        low, high = min(reached), max(reached)
        epochs = str(low) if low == high else f"{low}–{high}"
        if not all(run.last_epoch_complete() for run in group.runs):
            epochs += " (partial)"
        config = group.config
        published = PUBLISHED_TEST_ACCURACY.get((config["model"], config["opt"]))
        rows.append(
            [
                str(config["opt"]),
                str(config["model"]),
                *(format_value(config.get(name)) for name in fields),
                ", ".join(format_value(seed) for seed in group.seeds),
                epochs,
                mean_std(finals),
                mean_std(bests),
                "" if published is None else f"{published:.2f}",
            ]
        )
    # Repeats of one configuration and seed would be rows alike: name their directories.
    keys = [tuple(row[: len(fields) + 3]) for row in rows]
    if len(set(keys)) < len(keys):
        header.insert(2, "run")
        for row, group in zip(rows, groups):
            row.insert(2, ", ".join(run.workdir.name for run in group.runs))
    return header, rows


def format_table(groups: Sequence[Group], fmt: str = "markdown") -> str:
    """The results table of ``groups`` (see the module docstring) as Markdown."""
    if fmt != "markdown":
        raise ValueError(f"unknown table format {fmt!r}; known: markdown")
    header, rows = summary_rows(groups)
    numeric = {"epochs", "final test accuracy (%)", "best test accuracy (%)", "published (%)"}
    lines = [
        _markdown_row(header),
        _markdown_row(["---:" if name in numeric else "---" for name in header]),
        *(_markdown_row(row) for row in rows),
    ]
    return "\n".join(lines) + "\n"


def results_table(workdirs: Sequence[str | os.PathLike[str]], fmt: str = "markdown") -> str:
    """Reads the runs in ``workdirs``, groups them by seed and returns their table.

    Raises:
      ValueError: no run, or a run directory, its config or its metrics is missing or
        malformed, or lacks ``test_accuracy``.
    """
    if not workdirs:
        raise ValueError("no run directory")
    return format_table(group_runs([read_run(workdir) for workdir in workdirs]), fmt)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.results",
        description="Final and best test accuracy of runs, mean ± std over seeds (sample "
        "std, ddof=1; '—' for a single run), next to the published numbers.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--format", default="markdown", choices=["markdown"], help="table format (markdown)"
    )
    args = parser.parse_args(argv)
    try:
        table = results_table(args.runs, args.format)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
