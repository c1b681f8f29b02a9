"""rates.csv, the switch tests of a SWATS run per epoch: written and read by train.metrics,
kept across a resume by the trainer, drawn by ``python -m train.plots --rates``."""

import inspect
import json
import logging

import numpy as np
import pytest
from test_cli_newcomer import TINY
from test_plots import assert_png_with_content

import swats_jax
from train import cifar, metrics, plots
from train.metrics import MetricsError


def _rows(num_layers, epoch, *, switched=()):
    """Made-up diagnostics of one epoch: layer i's gap shrinks with the epochs."""
    return [
        swats_jax.SwitchDiagnostic(
            path=f"block{i // 4}/{i % 4}/conv/kernel",
            phase="sgd" if i in switched else "adam",
            switch_step=None,
            estimate=0.01 + 10.0 ** -(2 + epoch + i % 3),
            gamma=0.01,
            relative_gap=10.0 ** -(epoch + i % 3),
            absolute_gap=10.0 ** -(2 + epoch + i % 3),
        )
        for i in range(num_layers)
    ]


def _fake_run(directory, *, opt="swats_local", num_layers=6, epochs=4):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"opt": opt, "model": "densenet121"}))
    for epoch in range(1, epochs + 1):
        switched = range(min(epoch - 1, num_layers))  # one more layer in SGD each epoch
        metrics.append_rates(directory, epoch, _rows(num_layers, epoch, switched=switched))
    return directory


def test_rates_round_trip_and_keep_epochs_up_to(tmp_path):
    nan = float("nan")
    untested = swats_jax.SwitchDiagnostic("linear/bias", "adam", None, nan, nan, nan, nan)
    metrics.append_rates(tmp_path, 1, [*_rows(2, 1), untested])
    metrics.append_rates(tmp_path, 2, _rows(2, 2, switched={0}))
    lines = (tmp_path / "rates.csv").read_text().splitlines()
    assert lines[0] == ",".join(metrics.RATES_FIELDS)
    assert lines[1] == "1,block0/0/conv/kernel,adam,0.011,0.01,0.001,0.1"
    assert lines[3] == "1,linear/bias,adam,nan,nan,nan,nan"
    rows = metrics.read_rates(tmp_path)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (1, "block0/0/conv/kernel", "adam"),
        (1, "block0/1/conv/kernel", "adam"),
        (1, "linear/bias", "adam"),
        (2, "block0/0/conv/kernel", "sgd"),
        (2, "block0/1/conv/kernel", "adam"),
    ]
    assert rows[1][3:] == pytest.approx((0.01 + 1e-4, 0.01, 1e-4, 1e-2), rel=1e-9)
    assert np.isnan(rows[2][3:]).all()

    metrics.keep_rates_up_to(tmp_path, 1)
    assert [r[0] for r in metrics.read_rates(tmp_path)] == [1, 1, 1]
    assert not list(tmp_path.glob("*.tmp"))
    metrics.keep_rates_up_to(tmp_path / "no-such-run", 1)  # no file: nothing to keep


def test_a_row_cut_short_is_ignored_and_dropped_on_resume(tmp_path, caplog):
    metrics.append_rates(tmp_path, 1, _rows(2, 1))
    path = tmp_path / "rates.csv"
    path.write_text(path.read_text() + "2,block0/0/conv/ker")
    with caplog.at_level(logging.WARNING, logger="train.metrics"):
        assert len(metrics.read_rates(tmp_path)) == 2
    assert "truncated last line 4" in caplog.text
    metrics.keep_rates_up_to(tmp_path, 5)
    assert path.read_text().count("\n") == 3 and path.read_text().endswith("\n")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"cannot read .*rates\.csv"),
        ("layer,step\n", "expected the columns epoch,layer,phase"),
        ("", "expected the columns epoch,layer,phase"),
        (
            ",".join(metrics.RATES_FIELDS) + "\n1,a,adam,1,1,0,0\nsoon,a,adam,1,1,0,0\n1,a,x\n",
            r"rates\.csv, line 3",
        ),
        (",".join(metrics.RATES_FIELDS) + "\n1,a,lbfgs,1,1,0,0\n2,a,adam,1,1,0,0\n", "phase"),
    ],
)
def test_unreadable_rates_raise_metrics_error_naming_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "rates.csv").write_text(content)
    with pytest.raises(MetricsError, match=message):
        metrics.read_rates(tmp_path)
    if content is not None:
        with pytest.raises(MetricsError, match="repair or move the file"):
            metrics.keep_rates_up_to(tmp_path, 1)


def test_the_plotted_tolerances_are_those_the_trainer_uses():
    local = inspect.signature(swats_jax.swats_local).parameters
    global_ = inspect.signature(swats_jax.swats_global).parameters
    assert plots.SWITCH_TESTS["swats_local"][:2] == ("absolute_gap", local["switch_tol"].default)
    assert plots.SWITCH_TESTS["swats_global"][:2] == (
        "relative_gap",
        global_["switch_rtol"].default,
    )


def _drawn(monkeypatch):
    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    return figures


@pytest.mark.parametrize(
    "opt, gap, tolerance",
    [
        ("swats_local", "absolute gap", 1e-5),
        ("swats_global", "relative gap", 1e-5),
        ("?", "relative gap", None),
    ],
)
def test_plot_rates_shows_the_gap_the_test_compares_and_its_tolerance(
    tmp_path, monkeypatch, opt, gap, tolerance
):
    run = _fake_run(tmp_path / "run", opt=opt)
    figures = _drawn(monkeypatch)
    plots.plot_rates(run, tmp_path / "rates.png")
    (figure,) = figures
    heat, summary = figure.axes[:2]
    assert summary.get_ylabel() == gap
    dashed = [line.get_ydata()[0] for line in summary.get_lines() if line.get_linestyle() == "--"]
    assert dashed == ([tolerance] if tolerance else [])
    # Rows by the epoch of their switch: block0/0 switched first (epoch 2), then 1, 2.
    labels = [tick.get_text() for tick in heat.get_yticklabels()]
    assert labels[:3] == [f"block0/{i}/conv/kernel" for i in range(3)]
    marks = heat.collections[-1].get_offsets()
    assert [tuple(m) for m in np.asarray(marks)] == [(2, 0), (3, 1), (4, 2)]


def test_plot_rates_of_densenet_size_is_one_readable_png(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "run", num_layers=362, epochs=5)
    assert_png_with_content(plots.plot_rates(run, tmp_path / "rates.png"))
    figures = _drawn(monkeypatch)
    plots.plot_rates(run, tmp_path / "again.png")
    heat = figures[0].axes[0]
    assert "362" in heat.get_ylabel() and len(heat.get_yticklabels()) < 20
    width, height = figures[0].get_size_inches()
    assert height <= 15


def test_cli_rates_default_output_and_bad_input(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert plots.main(["--rates", str(run)]) == 0
    assert_png_with_content(run / "rates.png")
    assert plots.main(["--rates", str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert_png_with_content(tmp_path / "r.png")
    capsys.readouterr()
    assert plots.main(["--rates", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: no run directory {tmp_path / 'nope'}\n"
    (run / "rates.csv").unlink()
    assert plots.main(["--rates", str(run)]) == 2
    assert "rates.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        plots.main(["--rates", str(run), str(run)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        plots.main([str(run)])  # neither --out nor --rates


def test_a_cli_run_writes_rates_and_keeps_them_across_a_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    workdir = tmp_path / "run"
    assert cifar.main([*TINY, "--epochs=2", f"--workdir={workdir}"]) == 0
    rows = metrics.read_rates(workdir)
    layers = list(dict.fromkeys(r[1] for r in rows))
    assert [r[0] for r in rows] == [1] * len(layers) + [2] * len(layers)
    assert "linear/kernel" in layers and not any(layer.endswith("/value") for layer in layers)
    switched = {layer for layer, _, _ in metrics.read_switch_table(workdir)}
    assert {r[1] for r in rows if r[0] == 2 and r[2] == "sgd"} == switched
    epoch_lines = [r.getMessage() for r in caplog.records if "evaluated in" in r.getMessage()]
    assert len(epoch_lines) == 2
    assert all("over the" in m and "in Adam" in m or "none left in Adam" in m for m in epoch_lines)

    assert plots.main(["--rates", str(workdir)]) == 0
    assert_png_with_content(workdir / "rates.png")

    # Rows written after the last checkpoint (as by a crash between the two) are dropped
    # when the run resumes from it.
    metrics.append_rates(workdir, 7, _rows(2, 7))
    assert cifar.main([*TINY, "--epochs=3", f"--workdir={workdir}"]) == 0
    epochs = [r[0] for r in metrics.read_rates(workdir)]
    assert epochs == [1] * len(layers) + [2] * len(layers) + [3] * len(layers)


def test_runs_without_swats_write_no_rates(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    workdir = tmp_path / "run"
    assert cifar.main([*TINY, "--opt=adam", "--epochs=1", f"--workdir={workdir}"]) == 0
    assert not (workdir / "rates.csv").exists()
    (line,) = [r.getMessage() for r in caplog.records if "evaluated in" in r.getMessage()]
    assert "0 arrays switched, evaluated in" in line
