"""Comparisons across seeds: train.results' table and train.plots' bands of seed groups.

Four tiny runs are trained once, in-process through ``python -m train.cifar``'s ``main``:
``swats_local`` with seeds 0, 1 and 2, which differ only by seed, and ``adam`` with seed 0.
The expected numbers are computed here with NumPy from their ``metrics.jsonl``.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb

from train import cifar, plots, results

TINY = [*helpers.TINY, "--epochs=2"]  # 4 steps per epoch
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The run directories, by name: ``local-s0``, ``local-s1``, ``local-s2``, ``adam-s0``."""
    root = tmp_path_factory.mktemp("runs")
    trained = {}
    planned = [*((f"local-s{s}", "swats_local", s) for s in SEEDS), ("adam-s0", "adam", 0)]
    for name, opt, seed in planned:
        workdir = root / name
        assert cifar.main([*TINY, f"--opt={opt}", f"--seed={seed}", f"--workdir={workdir}"]) == 0
        trained[name] = workdir
    return trained


def accuracies(workdir: Path) -> np.ndarray:
    """The test accuracy per epoch, straight from the run's metrics.jsonl."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["test_accuracy"] for line in lines])


def expected_cell(values) -> str:
    values = 100 * np.asarray(values)
    std = f"{values.std(ddof=1):.2f}" if len(values) > 1 else "—"
    return f"{values.mean():.2f} ± {std} ({len(values)})"


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.strip().splitlines()
    header, rule, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert all(set(cell) <= set("-:") for cell in rule)
    return header, rows


def copy_run(source: Path, target: Path, *, epochs: int | None = None, **config) -> Path:
    """A copy of a run directory with ``config`` changed in its config.json and its metrics
    cut to the first ``epochs``."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))
    saved = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**saved, **config}))
    if epochs is not None:
        lines = (target / "metrics.jsonl").read_text().splitlines(keepends=True)
        (target / "metrics.jsonl").write_text("".join(lines[:epochs]))
    return target


def test_runs_that_differ_only_by_seed_are_one_group(runs):
    groups = results.group_runs([results.read_run(run) for run in runs.values()])
    assert [[run.workdir.name for run in group.runs] for group in groups] == [
        ["local-s0", "local-s1", "local-s2"],
        ["adam-s0"],
    ]
    assert groups[0].seeds == [0, 1, 2]
    # The configs differ in seed and workdir, which do not count.
    configs = [json.loads((run / "config.json").read_text()) for run in runs.values()]
    assert len({c["seed"] for c in configs}) == 3 and len({c["workdir"] for c in configs}) == 4


def test_table_gives_mean_std_over_seeds_from_the_metrics_files(runs, capsys):
    assert results.main([str(run) for run in runs.values()]) == 0
    header, rows = parse_table(capsys.readouterr().out)
    assert header == [
        "optimizer",
        "model",
        "seeds",
        "epochs",
        "final test accuracy (%)",
        "best test accuracy (%)",
        "published (%)",
    ]
    local = [accuracies(runs[f"local-s{seed}"]) for seed in SEEDS]
    adam = accuracies(runs["adam-s0"])
    assert rows == [
        [
            "swats_local",
            "resnet18",
            "0, 1, 2",
            "2",
            expected_cell([acc[-1] for acc in local]),
            expected_cell([acc.max() for acc in local]),
            "94.13",
        ],
        ["adam", "resnet18", "0", "2", expected_cell([adam[-1]]), expected_cell([adam.max()]), ""],
    ]
    assert rows[1][4].endswith(" ± — (1)")


def test_differing_fields_become_columns_and_repeats_stay_apart(runs, tmp_path):
    # Another learning rate: another group, told apart by an lr column.
    other_lr = [
        copy_run(runs[f"local-s{seed}"], tmp_path / f"lr-s{seed}", lr=0.01) for seed in (0, 1)
    ]
    # A longer run of seed 3 stopped after one epoch: epochs may differ within a group.
    short = copy_run(runs["local-s2"], tmp_path / "local-s3", epochs=1, seed=3, max_steps=4)
    # A repeat of seed 0 in another folder: not a spread over seeds.
    repeat = copy_run(runs["adam-s0"], tmp_path / "adam-again")
    workdirs = [*runs.values(), *other_lr, short, repeat]

    header, rows = parse_table(results.results_table(workdirs))
    local4 = ", ".join(f"local-s{seed}" for seed in range(4))
    assert header[:5] == ["optimizer", "model", "run", "lr", "seeds"]
    assert [row[:6] for row in rows] == [
        ["swats_local", "resnet18", local4, "unset", "0, 1, 2, 3", "1–2"],
        ["adam", "resnet18", "adam-s0", "unset", "0", "2"],
        ["adam", "resnet18", "adam-again", "unset", "0", "2"],
        ["swats_local", "resnet18", "lr-s0, lr-s1", "0.01", "0, 1", "2"],
    ]
    finals = [accuracies(runs[f"local-s{seed}"])[-1] for seed in SEEDS]
    finals.append(accuracies(runs["local-s2"])[0])  # the shortened run's last epoch
    assert rows[0][6] == expected_cell(finals)


def test_final_is_the_last_epoch_and_best_the_highest(runs, tmp_path):
    """The tiny runs are near chance, often at the same accuracy on both epochs: here the
    first epoch of each copy is made the best, by a different margin per seed."""
    copies = []
    for seed in SEEDS:
        run = copy_run(runs[f"local-s{seed}"], tmp_path / f"s{seed}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        records[0]["test_accuracy"] = 0.5 + 0.1 * seed
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        copies.append(run)
    _, [row] = parse_table(results.results_table(copies))
    assert row[4] == expected_cell([accuracies(run)[-1] for run in copies])
    assert row[5] == expected_cell([0.5, 0.6, 0.7]) == "60.00 ± 10.00 (3)"


def test_plot_draws_a_band_per_group_of_seeds(runs, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    plots.plot_runs(list(runs.values()), tmp_path / "seeds.png")

    (figure,) = figures
    axes = figure.axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == [
        "swats_local (resnet18, width 4, float32, 3 seeds)",
        "adam (resnet18, width 4, float32, seed 0)",
    ]
    local_line, adam_line = axes.get_lines()
    local = 100 * np.stack([accuracies(runs[f"local-s{seed}"]) for seed in SEEDS])
    np.testing.assert_allclose(local_line.get_xdata(), [1, 2])
    np.testing.assert_allclose(local_line.get_ydata(), local.mean(axis=0))
    np.testing.assert_allclose(adam_line.get_ydata(), 100 * accuracies(runs["adam-s0"]))

    # One band, for the group of seeds only, in its line's colour: mean ± sample std.
    (band,) = [c for c in axes.collections if isinstance(c, PolyCollection)]
    np.testing.assert_allclose(band.get_facecolor()[0][:3], to_rgb(local_line.get_color()))
    vertices = band.get_paths()[0].vertices
    mean, std = local.mean(axis=0), local.std(axis=0, ddof=1)
    for epoch, low, high in zip([1, 2], mean - std, mean + std):
        at_epoch = np.sort(vertices[np.isclose(vertices[:, 0], epoch), 1])
        np.testing.assert_allclose([at_epoch.min(), at_epoch.max()], [low, high])
    assert "mean ± std over seeds" in axes.get_title()


def test_plot_cli_groups_seeds_unless_asked_for_each_run(runs, tmp_path, monkeypatch, capsys):
    workdirs = [str(run) for run in runs.values()]
    assert plots.main([*workdirs, "--out", str(tmp_path / "grouped.png")]) == 0
    assert (tmp_path / "grouped.png").read_bytes()[:4] == b"\x89PNG"
    assert str(tmp_path / "grouped.png") in capsys.readouterr().out

    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    assert plots.main([*workdirs, "--out", str(tmp_path / "each.png"), "--each-run"]) == 0
    axes = figures[0].axes[0]
    assert len(axes.get_lines()) == 4
    assert not [c for c in axes.collections if isinstance(c, PolyCollection)]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels[:3] == [f"swats_local (resnet18, width 4, float32, seed {s})" for s in SEEDS]


def test_a_single_common_epoch_gets_an_error_bar(runs, tmp_path, monkeypatch):
    short = [copy_run(runs[f"local-s{seed}"], tmp_path / f"s{seed}", epochs=1) for seed in (0, 1)]
    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    plots.plot_runs(short, tmp_path / "p.png")
    axes = figures[0].axes[0]
    assert list(axes.get_lines()[0].get_xdata()) == [1]
    assert axes.containers, "an error bar for the single epoch"


def test_groups_without_a_common_epoch_are_an_error(runs, tmp_path):
    later = copy_run(runs["local-s1"], tmp_path / "later")
    lines = (later / "metrics.jsonl").read_text().splitlines(keepends=True)
    (later / "metrics.jsonl").write_text(lines[1])  # epoch 2 only
    first = copy_run(runs["local-s0"], tmp_path / "first", epochs=1)
    with pytest.raises(ValueError, match="share no epoch"):
        plots.plot_runs([first, later], tmp_path / "p.png")


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("problem", ["missing_dir", "missing_metrics", "missing_config", "empty"])
def test_results_cli_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, problem):
    run = copy_run(runs["adam-s0"], tmp_path / "run")
    expected = {
        "missing_dir": "no run directory",
        "missing_metrics": "metrics.jsonl",
        "missing_config": "config.json",
        "empty": "has no epoch yet",
    }[problem]
    if problem == "missing_dir":
        run = tmp_path / "nope"
    elif problem == "missing_metrics":
        (run / "metrics.jsonl").unlink()
    elif problem == "missing_config":
        (run / "config.json").unlink()
    else:
        (run / "metrics.jsonl").write_text("")
    assert results.main([str(runs["local-s0"]), str(run)]) == 2
    assert expected in _one_line_error(capsys)


def test_results_cli_usage_errors_exit_2(capsys):
    for argv in ([], ["run", "--format", "html"]):
        with pytest.raises(SystemExit) as exit_info:
            results.main(argv)
        assert exit_info.value.code == 2
        assert "usage: python -m train.results" in capsys.readouterr().err


def test_reading_results_does_not_load_jax_or_matplotlib():
    script = (
        "import sys, train.results; "
        "assert not {'jax', 'matplotlib'} & set(sys.modules), 'jax or matplotlib'"
    )
    root = Path(__file__).resolve().parents[1]  # this checkout's train, not an installed one
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root)
