"""Plots of training runs: a metric per epoch over several runs, and SWATS switch points.

A run directory holds ``config.json`` (with at least ``opt`` and ``model``; the legend
also names ``width``, ``dtype`` and ``seed`` when it has them), ``metrics.jsonl`` (one JSON
object per epoch) and, for SWATS runs, ``switches.csv`` (``layer,step,sgd_lr``), both read
through :mod:`train.metrics` (runs, once each, through :func:`train.results.read_run`).
Runs that differ only by seed are drawn as their mean ± std over seeds (grouped as in
:mod:`train.results`). Figures are drawn with Matplotlib's Agg canvas, so no display is
needed. From the command line::

    python -m train.plots runs/swats runs/adam runs/sgd --out test_accuracy.png
    python -m train.plots runs/swats-s0 runs/swats-s1 runs/swats-s2 --out seeds.png
    python -m train.plots runs/swats --out switches.png --switches
    python -m train.plots --rates runs/swats  # runs/swats/rates.png, from rates.csv
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
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from train import metrics, results

# Beyond this many layers, tick labels would overlap: the axis shows indices instead.
MAX_LABELLED_LAYERS = 70
# Runs of up to this many epochs show a marker per epoch; longer ones, a plain line.
MAX_MARKERS = 50
# The cells of rates plots where a layer is not in Adam.
BLANK_COLOUR = "0.7"
# The switch test a run's opt uses (the defaults of swats_jax.swats_local and swats_global,
# which train.config.make_optimizer keeps): the gap of rates.csv it compares, and with what.
SWITCH_TESTS = {
    "swats_local": ("absolute_gap", 1e-5, "switch_tol 1e-5: switches below"),
    "swats_global": ("relative_gap", 1e-5, "switch_rtol 1e-5 (+ switch_atol 1e-8 / |γ|)"),
}


def plot_runs(
    workdirs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    metric: str = "test_accuracy",
    labels: Sequence[str] | None = None,
    group_seeds: bool = True,
) -> Path:
    """Plots ``metric`` per epoch, one line per run or group of seeds, and saves the figure
    as a PNG.

    Runs that differ only by seed (see :mod:`train.results`) are one group, drawn as the mean
    over its runs with a band of ± the sample standard deviation (ddof=1), over the epochs
    that all of them have; a run without other seeds is drawn alone. Accuracies are shown in
    percent. If an epoch was logged twice (a run resumed from an earlier checkpoint), its
    last record is plotted.

    Args:
      workdirs: run directories.
      output: the PNG file to write; its folder is created if needed.
      metric: a key of the metrics records, e.g. ``test_accuracy`` or ``train_loss``.
      labels: legend entries, one per line (group), in the order of each group's first
        run; by default from the runs' ``config.json``, ``"{opt} ({model}, width {width},
        {dtype}, seed {seed})"`` (the fields it has; no width when unset, i.e. the published
        one), with ``"{n} seeds"`` for a group instead of the seed. Where two lines would
        agree, a run's directory name is added, or for groups the fields that tell them
        apart.
      group_seeds: group the runs that differ only by seed; ``False``: one line per run.

    Returns:
      The path of the PNG.

    Raises:
      ValueError: a run lacks its metrics or config, has no epoch with ``metric``, or
        shares no epoch with the other seeds of its group.
    """
    runs = [results.read_run(workdir) for workdir in workdirs]
    if not runs:
        raise ValueError("no run directory to plot")
    if group_seeds:
        groups = results.group_runs(runs)
    else:
        groups = [results.Group((run,)) for run in runs]
    if labels is None:
        labels = _default_labels(groups)
    elif len(labels) != len(groups):
        raise ValueError(f"got {len(labels)} labels for {len(groups)} runs or groups of seeds")
    percent = metric.endswith("accuracy")
    scale = 100 if percent else 1
    name = metric.replace("_", " ").capitalize() + (" (%)" if percent else "")

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    first, last = np.inf, -np.inf
    for group, label in zip(groups, labels):
        epochs, values = group.series(metric)
        mean = scale * values.mean(axis=0)
        (line,) = axes.plot(
            epochs,
            mean,
            label=label,
            linewidth=1.5,
            # A marker per epoch (a run of one epoch is one point); long runs are lines.
            marker="o" if len(epochs) <= MAX_MARKERS else None,
            markersize=4 if len(epochs) <= 20 else 2.5,
        )
        if len(values) > 1:
            std = scale * values.std(axis=0, ddof=1)
            colour = line.get_color()
            axes.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
            if len(epochs) == 1:  # a band one epoch wide is not drawn: an error bar instead
                axes.errorbar(epochs, mean, yerr=std, color=colour, capsize=4, linestyle="none")
        first, last = min(first, epochs[0]), max(last, epochs[-1])
    # Whole epochs only (one tick for a single epoch), and half an epoch or more of room on
    # either side, so that a first or single epoch is not drawn on the frame.
    margin = max(0.5, 0.03 * (last - first))
    axes.set_xlim(first - margin, last + margin)
    axes.set_xlabel("Epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_ylabel(name)
    spread = any(len(group.runs) > 1 for group in groups)
    axes.set_title(f"{name} per epoch" + (" (mean ± std over seeds)" if spread else ""))
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


def plot_rates(workdir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Plots how far each layer of a SWATS run was from switching, epoch by epoch.

    Reads ``rates.csv`` (the last switch test of every layer at the end of each epoch) and
    ``config.json``. The gap shown is the one the run's switch test compares: the absolute
    gap ``|Λ - γ|`` for ``swats_local`` (against ``switch_tol``), the relative gap
    ``|Λ - γ| / |γ|`` for ``swats_global`` (against ``switch_rtol``) and for a run whose
    optimizer is not known (no tolerance line then). Two panels share the epoch axis:

    - a heatmap, one row per layer, of the gap in log10 around the tolerance (blue:
      below it, red: above it); layers sorted by the epoch they switched in, the others
      after them by their last gap. A black mark is the epoch a layer switched in; gray
      cells are epochs in SGD (or before a layer's first test). Rows are named up
      to ``MAX_LABELLED_LAYERS`` layers (DenseNet-121 has 362: rows are numbered).
    - the median, the 10-90% band and the smallest gap of the layers still in Adam, with
      the tolerance as a dashed line, and the number of layers in Adam.

    Args:
      workdir: the run directory, holding ``rates.csv`` and ``config.json``.
      output: the PNG file to write; its folder is created if needed.

    Returns:
      The path of the PNG.

    Raises:
      ValueError: ``rates.csv`` is missing, malformed or empty.
    """
    workdir = Path(workdir)
    rows = metrics.read_rates(workdir)
    if not rows:
        raise ValueError(f"{workdir / 'rates.csv'} has no epoch yet")
    opt = _run_opt(workdir)  # read once: the tolerance and the title
    # An optimizer without a known test: the relative gap, and no tolerance line.
    gap_field, tolerance, tolerance_label = SWITCH_TESTS.get(opt, ("relative_gap", None, None))
    column = metrics.RATES_FIELDS.index(gap_field)
    epochs = np.arange(min(r[0] for r in rows), max(r[0] for r in rows) + 1)
    layers = list(dict.fromkeys(r[1] for r in rows))  # in the optimizer state's order
    row_of = {layer: i for i, layer in enumerate(layers)}
    gap = np.full((len(layers), len(epochs)), np.nan)
    in_adam = np.zeros(gap.shape, bool)
    for epoch, layer, phase, *values in rows:  # a repeated epoch: its last rows win
        index = row_of[layer], epoch - epochs[0]
        in_adam[index] = phase == "adam"
        gap[index] = values[column - 3]
    # The epoch a layer switched in: its first in SGD, among the epochs rates.csv has.
    in_sgd = ~in_adam & np.isin(epochs, [r[0] for r in rows])
    first_sgd = [int(np.argmax(row)) if row.any() else -1 for row in in_sgd]
    tested = in_adam & np.isfinite(gap)
    last_gap = [g[t][-1] if t.any() else np.inf for g, t in zip(gap, tested)]
    order = sorted(
        range(len(layers)),
        key=lambda i: (first_sgd[i] < 0, first_sgd[i], last_gap[i], i),
    )
    shown = np.where(in_adam, gap, np.nan)[order]
    positive = shown[np.isfinite(shown) & (shown > 0)]
    floor = positive.min() if positive.size else 1.0
    # A gap of 0 (the first step's test) is drawn at the smallest positive gap.
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(shown == 0, floor, shown))

    labelled = len(layers) <= MAX_LABELLED_LAYERS
    height = (1.5 + 0.18 * len(layers)) if labelled else 9.0
    figure = Figure(figsize=(9, max(3.0, height) + 3.0), layout="constrained")
    grid = figure.add_gridspec(2, 1, height_ratios=[max(3.0, height), 3.0])
    heat = figure.add_subplot(grid[0])
    summary = figure.add_subplot(grid[1], sharex=heat)

    centre = np.log10(tolerance) if tolerance else np.nanmedian(logs)
    finite = logs[np.isfinite(logs)]
    low = min(finite.min(initial=centre), centre) - 0.5
    high = max(finite.max(initial=centre), centre) + 0.5
    edges = np.append(epochs - 0.5, epochs[-1] + 0.5)
    mesh = heat.pcolormesh(
        edges,
        np.arange(len(layers) + 1) - 0.5,
        np.ma.masked_invalid(logs),
        cmap="RdBu_r",
        norm=TwoSlopeNorm(vcenter=centre, vmin=low, vmax=high),
    )
    bar = figure.colorbar(mesh, ax=heat, label=f"log10 {gap_field.replace('_', ' ')}")
    if tolerance:
        bar.ax.axhline(centre, color="black", linestyle="--", linewidth=1.5)
    # Blank cells show the background: gray, unlike the near-white of the tolerance.
    heat.set_facecolor(BLANK_COLOUR)
    heat.add_patch(Rectangle((0, 0), 0, 0, color=BLANK_COLOUR, label="in SGD (or not tested)"))
    marks = [(epochs[first_sgd[i]], row) for row, i in enumerate(order) if first_sgd[i] >= 0]
    if marks:
        heat.scatter(*zip(*marks), marker="|", color="black", s=40, label="switched to SGD")
    if labelled:
        heat.set_yticks(np.arange(len(layers)), [layers[i] for i in order], fontsize="x-small")
        heat.set_ylabel("Layer (by epoch of its switch)")
    else:
        heat.set_ylabel(f"Layer: {len(layers)}, numbered by epoch of their switch")
    heat.set_ylim(len(layers) - 0.5, -0.5)
    heat.set_title(f"Switch tests of {workdir.name} ({opt or 'unknown optimizer'})")
    heat.tick_params(labelbottom=False)

    adam_gaps = np.where(in_adam & np.isfinite(gap), gap, np.nan)
    has_adam = np.isfinite(adam_gaps).any(axis=0)
    values = adam_gaps[:, has_adam]
    if values.size:
        x = epochs[has_adam]
        summary.fill_between(
            x,
            np.nanpercentile(values, 10, axis=0),
            np.nanpercentile(values, 90, axis=0),
            alpha=0.25,
            label="10-90% of the layers in Adam",
        )
        summary.plot(x, np.nanmedian(values, axis=0), marker="o", markersize=3, label="median")
        summary.plot(x, np.nanmin(values, axis=0), linestyle=":", label="smallest")
        summary.set_yscale("log")
    if tolerance:
        summary.axhline(tolerance, color="black", linestyle="--", label=tolerance_label)
    summary.set_xlabel("Epoch")
    summary.set_ylabel(gap_field.replace("_", " "))
    summary.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    summary.grid(True, alpha=0.3)
    count = summary.twinx()
    count.step(epochs, in_adam.sum(axis=0), where="mid", color="gray", alpha=0.6)
    count.set_ylim(0, 1.05 * len(layers))
    count.set_ylabel("layers in Adam (gray)", color="gray")
    count.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = heat.get_legend_handles_labels()[0] + summary.get_legend_handles_labels()[0]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize="small")
    return _save(figure, output)


def _run_opt(workdir: Path) -> str | None:
    """The ``opt`` of a run's ``config.json``; ``None`` if it has none."""
    try:
        config = json.loads((workdir / "config.json").read_text())
        return str(config["opt"])
    except (OSError, json.JSONDecodeError, TypeError, KeyError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.plots", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out", metavar="FILE.png", help="the PNG to write (with --rates: RUN/rates.png)"
    )
    parser.add_argument(
        "--metric", default="test_accuracy", help="metric per epoch (default: test_accuracy)"
    )
    parser.add_argument(
        "--switches", action="store_true", help="plot the SWATS switches of one run instead"
    )
    parser.add_argument(
        "--each-run",
        action="store_true",
        help="one line per run, rather than the mean ± std of the runs that differ only by seed",
    )
    parser.add_argument(
        "--rates",
        metavar="RUN",
        help="plot how far each layer of the SWATS run RUN was from switching (rates.csv)",
    )
    args = parser.parse_args(argv)
    if args.rates is not None:
        return _main_rates(parser, args)
    if not args.runs or args.out is None:
        parser.error("give run directories and --out (or --rates RUN)")
    if args.switches and len(args.runs) != 1:
        parser.error("--switches takes exactly one run directory")
    try:
        for run in args.runs:
            if not Path(run).is_dir():
                raise ValueError(f"no run directory {run}")
        if args.switches:
            path = plot_switches(args.runs[0], args.out)
        else:
            path = plot_runs(args.runs, args.out, metric=args.metric, group_seeds=not args.each_run)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _main_rates(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--rates RUN [--out FILE]``: :func:`plot_rates` of one run."""
    if args.runs or args.switches:
        parser.error("--rates takes one run directory and no other")
    run = Path(args.rates)
    try:
        if not run.is_dir():
            raise ValueError(f"no run directory {run}")
        path = plot_rates(run, args.out if args.out is not None else run / "rates.png")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _default_labels(groups: list[results.Group]) -> list[str]:
    labels = [f"{group.config['opt']} ({', '.join(_run_details(group))})" for group in groups]
    named = []
    for label, group in zip(labels, groups):
        alike = [other for other, same in zip(groups, labels) if same == label]
        if len(alike) == 1:
            named.append(label)
        elif len(group.runs) == 1:
            named.append(f"{label} [{group.runs[0].workdir.name}]")
        else:  # groups alike but for other fields (lr, recipe, ...): name those
            fields = results.differing_fields(alike)
            values = ", ".join(f"{f} {results.format_value(group.config.get(f))}" for f in fields)
            named.append(f"{label} [{values}]")
    return named


def _run_details(group: results.Group) -> list[str]:
    """Model, width, dtype and seed (or number of seeds) of a run or group, from the
    ``config.json`` of its runs (as far as they have them: no width when unset, the
    model's published one)."""
    config = group.runs[0].config
    details = [str(config["model"])]
    if config.get("width") is not None:
        details.append(f"width {config['width']}")
    if config.get("dtype") is not None:
        details.append(str(config["dtype"]))
    if len(group.runs) > 1:
        details.append(f"{len(group.runs)} seeds")
    elif config.get("seed") is not None:
        details.append(f"seed {config['seed']}")
    return details


def _save(figure: Figure, output: str | os.PathLike) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(output, format="png", dpi=150)
    return output


if __name__ == "__main__":
    sys.exit(main())
