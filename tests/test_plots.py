"""Tests of train.plots on fake run directories."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from train import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(directory, *, opt="swats_local", model="resnet18", epochs=3, seed=0):
    """Writes a run directory like the trainer's, with made-up metrics."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"opt": opt, "model": model, "lr": 1e-3}))
    lines = []
    for epoch in range(1, epochs + 1):
        record = {
            "epoch": epoch,
            "step": 391 * epoch,
            "train_loss": 2.0 / epoch,
            "train_accuracy": 1 - 0.5 / epoch,
            "test_loss": 2.2 / epoch,
            "test_accuracy": float(np.clip(1 - 0.6 / epoch + 0.02 * rng.normal(), 0, 1)),
            "learning_rate": 1e-3,
            "sgd_scale": 1.0,
            "num_switched": epoch,
            "epoch_time_s": 30.0,
            "images_per_s": 1600.0,
        }
        lines.append(json.dumps(record) + "\n")
    (directory / "metrics.jsonl").write_text("".join(lines))
    return directory


def assert_png_with_content(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    rgb = (255 * image[..., :3]).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    # Axes, lines and text: far more than a blank canvas's single colour.
    assert len(colours) > 20


def test_plot_runs_writes_a_png(tmp_path):
    run = make_run(tmp_path / "run")
    output = plots.plot_runs([run], tmp_path / "out" / "accuracy.png")
    assert output == tmp_path / "out" / "accuracy.png"
    assert_png_with_content(output)


def test_several_runs_overlay_with_labels_from_their_configs(tmp_path, monkeypatch):
    runs = [
        make_run(tmp_path / "a", opt="swats_local", seed=1),
        make_run(tmp_path / "b", opt="adam", model="densenet121", epochs=5, seed=2),
        make_run(tmp_path / "c", opt="adam", model="densenet121", seed=3),
    ]
    legends = []
    monkeypatch.setattr(
        plots.Figure,
        "savefig",
        lambda figure, *args, **kwargs: legends.append(
            [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        ),
    )
    plots.plot_runs(runs, tmp_path / "all.png", metric="train_loss")
    assert legends == [
        ["swats_local (resnet18)", "adam (densenet121) [b]", "adam (densenet121) [c]"]
    ]


def test_overlay_png_and_explicit_labels(tmp_path):
    runs = [make_run(tmp_path / str(i), seed=i) for i in range(3)]
    output = plots.plot_runs(
        runs, tmp_path / "loss.png", metric="test_loss", labels=["x", "y", "z"]
    )
    assert_png_with_content(output)
    with pytest.raises(ValueError, match="2 labels for 3 runs"):
        plots.plot_runs(runs, tmp_path / "bad.png", labels=["x", "y"])


def test_a_truncated_last_line_still_plots(tmp_path):
    run = make_run(tmp_path / "run", epochs=3)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 4, "step": 15')
    assert_png_with_content(plots.plot_runs([run], tmp_path / "p.png"))


def test_garbled_or_missing_metrics_raise_value_error_naming_the_file(tmp_path):
    run = make_run(tmp_path / "run")
    metrics = run / "metrics.jsonl"
    metrics.write_text("not json\n" + metrics.read_text())
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1"):
        plots.plot_runs([run], tmp_path / "p.png")
    metrics.unlink()
    with pytest.raises(ValueError, match=r"metrics\.jsonl"):
        plots.plot_runs([run], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_missing_metric_is_a_clear_error(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(ValueError, match="'top5'"):
        plots.plot_runs([run], tmp_path / "p.png", metric="top5")


def test_plot_switches(tmp_path):
    run = make_run(tmp_path / "run")
    rows = [f"layer{i}/conv/kernel,{100 * i + 50},{10.0 ** -(i % 4)}" for i in range(12)]
    (run / "switches.csv").write_text("layer,step,sgd_lr\n" + "\n".join(rows) + "\n")
    assert_png_with_content(plots.plot_switches(run, tmp_path / "switches.png"))


def test_plot_switches_rejects_a_rate_that_is_not_positive(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "switches.csv").write_text("layer,step,sgd_lr\nconv/kernel,300,0\n")
    with pytest.raises(ValueError, match=r"switches\.csv: SGD rates must be positive"):
        plots.plot_switches(run, tmp_path / "switches.png")


def test_plot_switches_without_any_switch(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "switches.csv").write_text("layer,step,sgd_lr\n")
    assert_png_with_content(plots.plot_switches(run, tmp_path / "switches.png"))


def test_cli_writes_the_plot(tmp_path, capsys):
    runs = [str(make_run(tmp_path / name)) for name in ("a", "b")]
    output = tmp_path / "cli.png"
    assert plots.main([*runs, "--out", str(output), "--metric", "train_accuracy"]) == 0
    assert_png_with_content(output)
    assert str(output) in capsys.readouterr().out


def test_cli_switches(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "switches.csv").write_text("layer,step,sgd_lr\nconv/kernel,300,0.5\n")
    assert plots.main([str(run), "--out", str(tmp_path / "s.png"), "--switches"]) == 0
    assert_png_with_content(tmp_path / "s.png")


@pytest.mark.parametrize("problem", ["missing_dir", "missing_metrics", "missing_switches"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, problem):
    run = make_run(tmp_path / "run")
    argv = [str(run), "--out", str(tmp_path / "p.png")]
    if problem == "missing_dir":
        argv[0] = str(tmp_path / "nope")
    elif problem == "missing_metrics":
        (run / "metrics.jsonl").unlink()
    else:
        argv.append("--switches")
    assert plots.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    expected = {"missing_dir": "nope", "missing_metrics": "metrics.jsonl"}
    assert expected.get(problem, "switches.csv") in err
    assert not (tmp_path / "p.png").exists()


def test_reading_and_plotting_runs_do_not_load_jax():
    script = "import sys, train.plots; assert 'jax' not in sys.modules, 'jax'"
    root = Path(__file__).resolve().parents[1]  # this checkout's train, not an installed one
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root)


def _drawn_figures(monkeypatch) -> list:
    """Collects the figures that plot_runs would save, instead of saving them."""
    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    return figures


def _trainer_config(**fields) -> dict:
    """A config.json as the trainer writes it (train.config.Config's fields, in part)."""
    return {"opt": "swats_local", "model": "resnet18", "width": None, "dtype": "float32",
            "seed": 0, "epochs": 1, "data": "synthetic", **fields}  # fmt: skip


def test_a_one_epoch_run_is_a_marked_point_on_an_integer_epoch_axis(tmp_path, monkeypatch):
    run = make_run(tmp_path / "smoke", epochs=1)
    config = _trainer_config(model="densenet121", width=4, dtype="bfloat16", seed=7)
    (run / "config.json").write_text(json.dumps(config))
    figures = _drawn_figures(monkeypatch)
    plots.plot_runs([run], tmp_path / "test_accuracy.png")

    (figure,) = figures
    axes = figure.axes[0]
    (line,) = axes.get_lines()
    assert list(line.get_xdata()) == [1]
    assert line.get_marker() not in (None, "", " ", "None", "none")
    assert line.get_markersize() > 0
    (label,) = [text.get_text() for text in axes.get_legend().get_texts()]
    assert label == "swats_local (densenet121, width 4, bfloat16, seed 7)"
    left, right = axes.get_xlim()
    assert left < 1 < right and right - left >= 1  # the point is inside, with room
    ticks = [tick for tick in axes.get_xticks() if left <= tick <= right]
    assert ticks == [1]


@pytest.mark.parametrize("epochs", [2, 7, 200])
def test_epoch_ticks_are_whole_numbers_and_only_long_runs_lack_markers(
    tmp_path, monkeypatch, epochs
):
    run = make_run(tmp_path / "run", epochs=epochs)
    figures = _drawn_figures(monkeypatch)
    plots.plot_runs([run], tmp_path / "p.png")
    axes = figures[0].axes[0]
    (line,) = axes.get_lines()
    left, right = axes.get_xlim()
    ticks = [tick for tick in axes.get_xticks() if left <= tick <= right]
    assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks)
    assert left < 1 and right > epochs
    marked = line.get_marker() not in (None, "", " ", "None", "none")
    assert marked == (epochs <= plots.MAX_MARKERS)


def test_runs_differing_by_seed_or_width_are_told_apart_by_their_labels(tmp_path, monkeypatch):
    runs = []
    for name, fields in [("a", {"seed": 0}), ("b", {"seed": 1}), ("c", {"width": 16})]:
        run = make_run(tmp_path / name)
        (run / "config.json").write_text(json.dumps(_trainer_config(**fields)))
        runs.append(run)
    figures = _drawn_figures(monkeypatch)
    plots.plot_runs(runs, tmp_path / "p.png", group_seeds=False)  # grouped: test_results.py
    assert [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()] == [
        "swats_local (resnet18, float32, seed 0)",
        "swats_local (resnet18, float32, seed 1)",
        "swats_local (resnet18, width 16, float32, seed 0)",
    ]
