"""The command line as a newcomer meets it: progress, interrupts, bad input, exit codes.

Each test runs ``python -m train.cifar`` in-process (``train.cifar.main``) on a tiny model
and synthetic data, and checks the exit code and the one line on stderr.
"""

import csv
import errno
import fcntl
import json
import logging
import os
import pathlib
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
import types
from unittest import mock

import jax
import pytest
from helpers import TINY
from test_data_fallback import official, offline, serve_official, tfds_online  # noqa: F401

from train import cifar, data, trainer

# Adam at this rate overflows the parameters within the first epoch: a NaN training loss.
DIVERGES = [*TINY, "--opt=adam", "--recipe=none", "--lr=1e38"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_progress_is_logged_without_a_terminal(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    assert cifar.main([*TINY, "--epochs=1", f"--workdir={tmp_path / 'run'}"]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("train")]
    text = "\n".join(messages)
    assert "loading the data (synthetic)" in text
    assert "loaded 128 training and 64 test images" in text
    assert "compiled and ran the first training step(s) in" in text
    assert "evaluating on 64 test images" in text
    # About every 10% of the 4-step epoch: after steps 1, 2 and 3 (the 4th is the epoch line).
    steps = [m for m in messages if m.startswith("epoch 1: step ")]
    assert [m.split(",")[0] for m in steps] == [f"epoch 1: step {k}/4" for k in (1, 2, 3)]
    assert all("train loss" in m and "images/s" in m and "arrays switched" in m for m in steps)


def test_workdir_that_is_a_file(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    assert cifar.main([*TINY, f"--workdir={workdir}"]) == 2
    assert f"the workdir {workdir} is a file, not a folder" in _one_line(capsys)


def test_workdir_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):  # chmod does not stop root, so refuse by hand
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    workdir = tmp_path / "run"
    assert cifar.main([*TINY, f"--workdir={workdir}"]) == 2
    assert f"cannot write to the workdir {workdir}: Permission denied" in _one_line(capsys)


def test_failed_run_leaves_no_workdir_it_created(tmp_path, capsys):
    # Before training (no data) and during its first epoch (a non-finite loss).
    workdir = tmp_path / "new" / "run"
    assert cifar.main([*TINY[1:], "--data=/no/such/data", f"--workdir={workdir}"]) == 2
    _one_line(capsys)
    assert list(tmp_path.iterdir()) == []  # nor the parent it created
    argv = [*DIVERGES, f"--workdir={workdir}"]
    assert cifar.main(argv) == 3
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == []
    workdir.mkdir(parents=True)
    (workdir / "notes.txt").write_text("mine")
    assert cifar.main([*TINY[1:], "--data=/no/such/data", f"--workdir={workdir}"]) == 2
    assert (workdir / "notes.txt").read_text() == "mine"  # a folder it found is left alone


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr=inf"], "lr must be a finite number, got inf"),
        (["--max-train-loss=nan"], "max_train_loss must be a finite number, got nan"),
        (["--max-train-loss=-1"], "max_train_loss must be >= 0, got -1.0"),
        (["--coordinator=localhost:1234"], "--coordinator, --num-processes and --process-id go"),
    ],
)
def test_flag_errors_are_one_line_before_jax(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cifar.main(argv)
    assert exit_info.value.code == 2
    assert message in _one_line(capsys)


def test_non_finite_loss_stops_with_exit_3_and_saves_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()  # a folder the run did not create is kept, so what it saved can be seen
    argv = [*DIVERGES, "--epochs=2"]
    assert cifar.main([*argv, f"--workdir={workdir}"]) == 3
    err = _one_line(capsys)
    assert "the training loss became" in err and "stopped without saving this state" in err
    assert (workdir / "config.json").exists()  # the run got as far as training
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
    metrics = workdir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""


def test_ctrl_c_stops_at_a_step_boundary_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    argv = [*TINY, "--epochs=2", f"--workdir={workdir}"]
    update = trainer._EpochProgress.update

    def update_and_interrupt(self, size, done, *args):
        update(self, size, done, *args)
        if self.epoch == 2 and done == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: handled at the next boundary

    monkeypatch.setattr(trainer._EpochProgress, "update", update_and_interrupt)
    # Python's default handler, or SIG_IGN where pytest was started in the background.
    before = signal.getsignal(signal.SIGINT)
    assert cifar.main(argv) == 130
    err = _one_line(capsys)
    assert "interrupted at epoch 2 step 5; run the same command to resume from epoch 2" in err
    assert signal.getsignal(signal.SIGINT) is before  # restored

    monkeypatch.setattr(trainer._EpochProgress, "update", update)
    assert cifar.main(argv) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_partial_epoch_says_it_restarts(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    argv = [*TINY, "--max-steps=2", f"--workdir={tmp_path / 'run'}"]
    assert cifar.main(argv) == 0
    assert any(
        "stopped by --max-steps at step 2, inside epoch 1: a partial epoch is not "
        "checkpointed, so the same command restarts epoch 1 from scratch" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    assert cifar.main(argv) == 0
    assert any(
        "epoch 1 stopped part-way last time (--max-steps) and starts again" in r.getMessage()
        for r in caplog.records
    )


# --- the data and checkpoint routes, through the CLI ------------------------------------
# The fixtures serve a fake official archive (15 training and 3 test images) or a closed
# port: no test needs the network.
OFFICIAL = ["--batch-size=5", "--width=4", "--eval-batch-size=3", "--epochs=1"]


@pytest.mark.usefixtures("serve_official", "tfds_online")
def test_tfds_failure_falls_back_and_trains(tmp_path, caplog):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")

    def failing_download_and_prepare(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    caplog.set_level(logging.INFO, logger="train")
    argv = [*OFFICIAL, "--data=cifar10", f"--cache-dir={tmp_path / 'cache'}"]
    with tfds.testing.mock_data(num_examples=6):
        with mock.patch.object(
            tfds.core.DatasetBuilder, "download_and_prepare", failing_download_and_prepare
        ):
            assert cifar.main([*argv, f"--workdir={tmp_path / 'run'}"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "TensorFlow Datasets could not load cifar10 (ModuleNotFoundError: No module named "
        "'importlib_resources'); using the official cifar-10-python.tar.gz instead"
    ]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.usefixtures("offline")
def test_offline_says_what_to_do_and_leaves_no_workdir(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "_import_tfds", lambda: None)
    cache = tmp_path / "cache"
    argv = [*OFFICIAL, "--data=cifar10", f"--cache-dir={cache}", f"--workdir={tmp_path / 'run'}"]
    assert cifar.main(argv) == 2
    err = _one_line(capsys)
    assert "cannot download CIFAR-10" in err
    assert f"put cifar-10-python.tar.gz at {cache / 'cifar-10-python.tar.gz'}" in err
    assert "--data PATH" in err and "--data synthetic" in err
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint_is_one_line_by_epoch(tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    assert cifar.main([*TINY, "--epochs=1", f"--workdir={workdir}"]) == 0
    for path in (workdir / "checkpoints" / "1").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    caplog.set_level(logging.WARNING, logger="train")
    assert cifar.main([*TINY, "--epochs=2", f"--workdir={workdir}"]) == 2
    err = _one_line(capsys)
    assert f"No checkpoint in {workdir / 'checkpoints'} can be restored" in err
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "train.checkpoint"]
    assert warning.startswith("Skipping the checkpoint of epoch 1 (")
    for internals in ("pybind11", "TensorStore(", "<bound method"):
        assert internals not in warning and internals not in err


def test_one_epoch_plot_is_a_labelled_point(tmp_path, monkeypatch):
    from train import plots

    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda figure, *a, **k: figures.append(figure))
    assert cifar.main([*TINY, "--epochs=1", "--seed=3", f"--workdir={tmp_path / 'run'}"]) == 0
    (figure,) = figures  # test_accuracy.png
    axes = figure.axes[0]
    (line,) = axes.get_lines()
    assert list(line.get_xdata()) == [1] and line.get_marker() not in (None, "", "None")
    (label,) = [text.get_text() for text in axes.get_legend().get_texts()]
    assert label == "swats_local (resnet18, width 4, float32, seed 3)"


# --- what a new user met: divergence, gaps, throughput, terminals, Ctrl-C, the extra ------
# The subprocess tests run `python -m train.cifar` as a user does, with the session's
# compilation cache.
ROOT = pathlib.Path(__file__).resolve().parents[1]
PROG = "python -m train.cifar"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }


def test_a_diverging_loss_stops_with_exit_3_and_saves_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    assert cifar.main([*TINY, "--lr=1e9", "--epochs=2", f"--workdir={workdir}"]) == 3
    err = _one_line(capsys)
    assert "above --max-train-loss 2303: the run diverged" in err
    assert "stopped without saving this state" in err
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())
    metrics = workdir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""


def test_a_max_train_loss_below_the_loss_stops_a_normal_run_with_exit_3(tmp_path, capsys):
    # The loss of 10 classes starts near ln(10) = 2.3: a bound of 1 stops it at the first check.
    argv = [*TINY, "--max-train-loss=1", "--epochs=1", f"--workdir={tmp_path / 'run'}"]
    assert cifar.main(argv) == 3
    err = _one_line(capsys)
    assert "by step 1 (epoch 1), above --max-train-loss 1: the run diverged" in err


def test_no_gap_is_reported_as_0_where_no_test_compared(tmp_path, caplog):
    # With the guard off (--max-train-loss=0) the diverging run trains its epoch. Its
    # switch tests after the first step are skipped, so that the last test of most arrays
    # is the first step's, which compares gamma with itself. The loss must stay finite over
    # the 4 steps: at lr 1e9 it becomes NaN by step 3 or not depending on the rounding of
    # the convolution kernels (XLA:CPU's Eigen ones, train/xla_cpu.py, or its YNNPACK ones);
    # at 3e8 it stays finite with either.
    caplog.set_level(logging.INFO, logger="train")
    argv = [*TINY, "--lr=3e8", "--max-train-loss=0", "--epochs=1"]
    assert cifar.main([*argv, f"--workdir={tmp_path / 'run'}"]) == 0
    with (tmp_path / "run" / "rates.csv").open() as file:
        rows = list(csv.DictReader(file))
    first_step_only = [r for r in rows if r["estimate"] == r["gamma"]]
    assert first_step_only  # what this test is about happened
    assert all(r["absolute_gap"] == r["relative_gap"] == "nan" for r in first_step_only)
    assert all(float(r["absolute_gap"]) != 0 for r in rows if r["phase"] == "adam")
    (line,) = [r.getMessage() for r in caplog.records if "arrays switched (" in r.getMessage()]
    assert "median relative gap 0 " not in line


def test_images_per_s_exclude_compilation_and_the_partial_batch_compiles_on_its_own_line(
    tmp_path, caplog, monkeypatch
):
    # 136 images: 4 batches of 32 and a partial one of 8, which compiles its own program.
    # The trainer's clock ticks a quarter second per reading: its times are exact binary
    # fractions, and the record's rounding loses nothing.
    ticks = iter(range(10**6))
    monkeypatch.setattr(
        trainer, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) / 4)
    )
    caplog.set_level(logging.INFO, logger="train")
    argv = [*TINY, "--synthetic-size", "136", "64", "--epochs=1"]
    assert cifar.main([*argv, f"--workdir={tmp_path / 'run'}"]) == 0
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("train")]
    assert any(
        m.startswith("set up resnet18 (44,622 parameters in 62 arrays) and swats_local in ")
        for m in messages
    )
    compiles = [m for m in messages if m.startswith("compil")]
    assert compiles[0] == "compiling the training step"
    assert compiles[1].startswith("compiled and ran the first training step(s) in ")
    assert compiles[2] == "compiling the training step of the last, partial batch (8 images)"
    assert compiles[3].startswith("compiled and ran it in ")
    # The first progress line comes right after the compiling step: nothing to time yet.
    assert "epoch 1: step 1/5, train loss" in messages[messages.index(compiles[1]) + 1]
    assert ", ? images/s," in messages[messages.index(compiles[1]) + 1]
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    # The 96 images of steps 2-4 over their own time, not 136 over the epoch's.
    assert 0 < record["compile_time_s"] < record["epoch_time_s"]
    steps_s = record["epoch_time_s"] - record["compile_time_s"]
    assert record["images_per_s"] == round(96 / steps_s, 1)


def _run_in_a_terminal(tmp_path, columns: int) -> str:
    """Runs a tiny epoch with stderr on a terminal of ``columns`` columns (0: a terminal
    without a size, as under ``script`` or on some CI runners); returns what it showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    argv = [sys.executable, "-m", "train.cifar", *TINY, "--epochs=1"]
    process = subprocess.Popen(
        [*argv, f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.wait(timeout=240) == 0, shown.decode()[-3000:]
    return shown.decode().replace("\r\n", "\n")  # the terminal's own line ends


@pytest.mark.parametrize("columns", [0, 100])
def test_progress_shows_in_a_terminal_of_any_size_never_on_a_log_line(tmp_path, columns):
    shown = _run_in_a_terminal(tmp_path, columns)
    log_lines = [line for line in shown.split("\n") if " train.trainer: " in line]
    assert any("epoch 1: train loss" in line for line in log_lines)
    for line in log_lines:  # what the terminal shows of it: after the last carriage return
        assert re.match(r"\d{4}-\d\d-\d\d ", line.split("\r")[-1].lstrip()), repr(line)
    if columns == 0:  # no bar: log lines about every 10% of the epoch
        assert "%|" not in shown
        assert any("epoch 1: step 1/4, train loss" in line for line in log_lines)
    else:
        assert "epoch 1: 100%|" in shown and "4/4" in shown


def test_a_second_ctrl_c_stops_at_once_even_while_compiling(tmp_path):
    # Without the compilation cache, so that XLA's compiler runs for seconds (7 s here), and
    # with JAX's compile log, to send the signals once it runs (Python traces the step
    # before, where a KeyboardInterrupt would stop it at once): a KeyboardInterrupt waits
    # for the compiler to return; only the watcher thread stops the process inside it.
    argv = [sys.executable, "-m", "train.cifar", *TINY, "--epochs=50", "--width=16"]
    env = {**_env(), "JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_LOG_COMPILES": "1"}
    process = subprocess.Popen(
        [*argv, f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in process.stderr:
            if "compiling the training step" in line:
                break
        for line in process.stderr:  # traced and lowered: XLA compiles it now
            if "MLIR" in line and "train_chunk" in line:
                break
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        start = time.perf_counter()
        assert process.wait(timeout=60) == 130
        elapsed = time.perf_counter() - start
        rest = process.stderr.read().splitlines()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert elapsed < 2, elapsed
    assert rest[-1] == f"{PROG}: {cifar.INTERRUPTED}"
    assert not any("compiled and ran" in line for line in rest), rest  # still compiling
    assert not any("Traceback" in line or "Segmentation" in line for line in rest)


def test_without_the_train_extra_it_says_what_to_install(tmp_path):
    # As after `pip install .`: no Flax.
    script = (
        "import sys, runpy; sys.modules['flax'] = None; sys.argv[0] = 'train.cifar'; "
        "runpy.run_module('train.cifar', run_name='__main__')"
    )
    argv = [*TINY, f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=ROOT, env=_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"{PROG}: error: the trainer needs its extra: pip install '.[train]' (no module flax)\n"
    )


# --- a full disk -------------------------------------------------------------------------
def _no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _assert_resumes_from_epoch_1(workdir, capsys, caplog):
    caplog.clear()
    caplog.set_level(logging.INFO, logger="train")
    assert cifar.main([*TINY, "--epochs=2", f"--workdir={workdir}"]) == 0
    capsys.readouterr()
    assert any("resumed from the checkpoint of epoch 1" in r.getMessage() for r in caplog.records)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_a_full_disk_while_writing_the_metrics(tmp_path, capsys, caplog, monkeypatch):
    workdir = tmp_path / "run"
    write_text = pathlib.Path.write_text
    writes = []

    def fill_up_at_epoch_2(self, *args, **kwargs):
        if self.name == "metrics.jsonl.tmp":
            writes.append(self)
            if len(writes) == 3:  # at start-up, after epoch 1, after epoch 2
                raise _no_space(self)
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", fill_up_at_epoch_2)
    assert cifar.main([*TINY, "--epochs=2", f"--workdir={workdir}"]) == 2
    err = _one_line(capsys)
    assert err == f"{PROG}: error: No space left on device ({workdir / 'metrics.jsonl.tmp'})\n"
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    _assert_resumes_from_epoch_1(workdir, capsys, caplog)


# Runs the CLI with no file allowed to grow past argv[1] bytes: writes past it fail with
# EFBIG ("File too large"), as on a full disk (SIGXFSZ, which would kill it, is ignored).
LIMITED_FILE_SIZE = (
    "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "sys.argv[0] = 'train.cifar'; runpy.run_module('train.cifar', run_name='__main__')"
)


def test_a_full_disk_while_saving_a_checkpoint(tmp_path, capsys, caplog):
    # Orbax writes the arrays through TensorStore, which reports a failed write as a
    # ValueError ("OUT_OF_RANGE: Error writing ... [os_error_code='27']"), not an OSError.
    # A real failed write, under a file-size limit between the run's other files (metrics,
    # the checkpoint's JSON metadata, under 100 kB) and the arrays' data files (over 300 kB).
    workdir = tmp_path / "run"
    assert cifar.main([*TINY, "--epochs=1", f"--workdir={workdir}"]) == 0
    capsys.readouterr()
    argv = [*TINY, "--epochs=2", f"--workdir={workdir}"]
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_FILE_SIZE, str(128 * 1024), *argv],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith(PROG)]
    prefix = f"{PROG}: error: cannot save the checkpoint of epoch 2 in {workdir / 'checkpoints'}: "
    assert line.startswith(f"{prefix}File too large (ValueError: OUT_OF_RANGE: "), line
    # Orbax, asyncio and TensorStore's callbacks log the failed writes of their threads with
    # tracebacks of their own (some after the error line, as the pending writes fail); none
    # passes through the trainer.
    assert f'File "{ROOT / "train"}' not in result.stderr, result.stderr[-3000:]
    _assert_resumes_from_epoch_1(workdir, capsys, caplog)
