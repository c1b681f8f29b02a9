"""Plots of training runs: a metric per epoch over several runs, and SWATS switch points.

A run directory holds ``config.json`` (with at least ``opt`` and ``model``; the legend
also names ``width``, ``dtype`` and ``seed`` when it has them), ``metrics.jsonl`` (one JSON
object per epoch) and, for SWATS runs, ``switches.csv`` (``layer,step,sgd_lr``), both read
through :mod:`train.metrics`. Figures are drawn with Matplotlib's Agg canvas, so no display
is needed. From the command line::

    python -m train.plots runs/swats runs/adam runs/sgd --out test_accuracy.png
    python -m train.plots runs/swats --out switches.png --switches
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from train import metrics

# Beyond this many layers, tick labels would overlap: the axis shows indices instead.
MAX_LABELLED_LAYERS = 70
# Runs of up to this many epochs show a marker per epoch; longer ones, a plain line.
MAX_MARKERS = 50


def plot_runs(
    workdirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    metric: str = "test_accuracy",
    labels: Sequence[str] | None = None,
) -> Path:
    """Plots ``metric`` per epoch, one line per run, and saves the figure as a PNG.

    Accuracies are shown in percent. If an epoch was logged twice (a run resumed from
    an earlier checkpoint), its last record is plotted.

    Args:
      workdirs: run directories.
      output: the PNG file to write; its folder is created if needed.
      metric: a key of the metrics records, e.g. ``test_accuracy`` or ``train_loss``.
      labels: legend entries, one per run; by default from each run's ``config.json``,
        ``"{opt} ({model}, width {width}, {dtype}, seed {seed})"`` (the fields it has; no
        width when unset, i.e. the published one), with the directory name added where two
        runs agree.

    Returns:
      The path of the PNG.

    Raises:
      ValueError: a run lacks its metrics or config, or has no epoch with ``metric``.
    """
    workdirs = [Path(workdir) for workdir in workdirs]
    if not workdirs:
        raise ValueError("no run directory to plot")
    if labels is None:
        labels = _default_labels(workdirs)
    elif len(labels) != len(workdirs):
        raise ValueError(f"got {len(labels)} labels for {len(workdirs)} runs")
    percent = metric.endswith("accuracy")
    name = metric.replace("_", " ").capitalize() + (" (%)" if percent else "")

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    first, last = np.inf, -np.inf
    for workdir, label in zip(workdirs, labels):
        epochs, values = _series(workdir, metric)
        axes.plot(
            epochs,
            100 * values if percent else values,
            label=label,
            linewidth=1.5,
            # A marker per epoch (a run of one epoch is one point); long runs are lines.
            marker="o" if len(epochs) <= MAX_MARKERS else None,
            markersize=4 if len(epochs) <= 20 else 2.5,
        )
        first, last = min(first, epochs[0]), max(last, epochs[-1])
    # Whole epochs only (one tick for a single epoch), and half an epoch or more of room on
    # either side, so that a first or single epoch is not drawn on the frame.
    margin = max(0.5, 0.03 * (last - first))
    axes.set_xlim(first - margin, last + margin)
    axes.set_xlabel("Epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_ylabel(name)
    axes.set_title(f"{name} per epoch")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, output)


def plot_switches(workdir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Plots when each layer of a SWATS run switched to SGD, coloured by its SGD rate.

    Layers are listed in the order of ``switches.csv`` (by switch step), with their
    names as tick labels up to ``MAX_LABELLED_LAYERS`` layers.

    Args:
      workdir: the run directory, holding ``switches.csv``.
      output: the PNG file to write; its folder is created if needed.

    Returns:
      The path of the PNG.

    Raises:
      ValueError: ``switches.csv`` is missing or malformed, or a rate is not positive.
    """
    rows = metrics.read_switch_table(workdir)
    layers = [layer for layer, _, _ in rows]
    steps = [step for _, step, _ in rows]
    rates = np.asarray([rate for _, _, rate in rows])
    if not np.all(rates > 0):
        path = Path(workdir) / "switches.csv"
        raise ValueError(f"{path}: SGD rates must be positive to be coloured by log10")
    figure = Figure(figsize=(8, max(4.0, 1.5 + 0.16 * len(layers))), layout="constrained")
    axes = figure.add_subplot()
    if layers:
        points = axes.scatter(steps, np.arange(len(layers)), c=np.log10(rates), cmap="viridis")
        figure.colorbar(points, ax=axes, label="log10 SGD learning rate")
        if len(layers) <= MAX_LABELLED_LAYERS:
            axes.set_yticks(np.arange(len(layers)), layers, fontsize="x-small")
        axes.invert_yaxis()
    else:
        axes.text(0.5, 0.5, "no layer switched to SGD", ha="center", transform=axes.transAxes)
    axes.set_xlabel("Step of the switch")
    axes.set_ylabel("Layer")
    axes.set_title(f"Switches from Adam to SGD in {Path(workdir).name}")
    axes.grid(True, alpha=0.3)
    return _save(figure, output)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.plots", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    parser.add_argument(
        "--metric", default="test_accuracy", help="metric per epoch (default: test_accuracy)"
    )
    parser.add_argument(
        "--switches", action="store_true", help="plot the SWATS switches of one run instead"
    )
    args = parser.parse_args(argv)
    if args.switches and len(args.runs) != 1:
        parser.error("--switches takes exactly one run directory")
    try:
        for run in args.runs:
            if not Path(run).is_dir():
                raise ValueError(f"no run directory {run}")
        if args.switches:
            path = plot_switches(args.runs[0], args.out)
        else:
            path = plot_runs(args.runs, args.out, metric=args.metric)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _default_labels(workdirs: list[Path]) -> list[str]:
    labels = []
    for workdir in workdirs:
        path = workdir / "config.json"
        try:
            config = json.loads(path.read_text())
            labels.append(f"{config['opt']} ({', '.join(_run_details(config))})")
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror or error}") from error
        except (json.JSONDecodeError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: expected a JSON object with 'opt' and 'model'") from error
    return [
        f"{label} [{workdir.name}]" if labels.count(label) > 1 else label
        for label, workdir in zip(labels, workdirs)
    ]


def _run_details(config: dict) -> list[str]:
    """Model, width, dtype and seed of a run, from its ``config.json`` (as far as it has them:
    no width when unset, the model's published one)."""
    details = [str(config["model"])]
    if config.get("width") is not None:
        details.append(f"width {config['width']}")
    if config.get("dtype") is not None:
        details.append(str(config["dtype"]))
    if config.get("seed") is not None:
        details.append(f"seed {config['seed']}")
    return details


def _series(workdir: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of ``metric``, sorted by epoch, the last record of an epoch winning."""
    records = metrics.read_metrics(workdir)
    path = workdir / "metrics.jsonl"
    if not records:
        raise ValueError(f"{path} has no epoch yet")
    by_epoch = {}
    for record in records:
        if "epoch" not in record or metric not in record:
            available = ", ".join(sorted(record))
            raise ValueError(f"{path}: a record lacks 'epoch' or {metric!r} (it has {available})")
        by_epoch[record["epoch"]] = record[metric]
    epochs = sorted(by_epoch)
    return np.asarray(epochs), np.asarray([by_epoch[e] for e in epochs], dtype=float)


def _save(figure: Figure, output: str | os.PathLike) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(output, format="png", dpi=150)
    return output


if __name__ == "__main__":
    sys.exit(main())
