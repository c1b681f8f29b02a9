"""The CIFAR-10 trainer end to end, on tiny models and data made here."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import TINY, flip_a_byte_inside_an_array
from PIL import Image

from train import cifar, models
from train.checkpoint import Checkpointer
from train.config import Config, make_optimizer
from train.trainer import init_model, train_and_evaluate


def tiny_config(**overrides) -> Config:
    values = dict(
        data="synthetic", synthetic_size=(128, 64), batch_size=32, width=4, eval_batch_size=32
    )
    return Config(**{**values, **overrides})


def _final_state(workdir: Path, config: Config, steps_per_epoch: int):
    _, params, stats = init_model(config, 10)
    target = {
        "params": params,
        "batch_stats": stats,
        "opt_state": make_optimizer(config, steps_per_epoch).optimizer.init(params),
    }
    with Checkpointer(workdir / "checkpoints") as checkpointer:
        return checkpointer.restore_latest(target)


# Reference schedule points: epoch e starts at count (e - 1) * 391.
E = 391


@pytest.mark.parametrize(
    "opt, model, count, lr, scale",
    [
        ("swats_local", "resnet18", 74 * E - 1, 1e-3, 1.0),
        ("swats_local", "resnet18", 74 * E, 1e-3, 0.1),
        ("swats_local", "densenet121", 99 * E, 1e-4, 0.1),
        ("swats_local", "resnet18", 149 * E, 1e-4, 0.01),
        ("swats_global", "resnet18", 99 * E - 1, 1e-3, 1.0),
        ("swats_global", "resnet18", 99 * E, 1e-3, 0.1),
        ("swats_global", "densenet121", 99 * E, 1e-3, 1.0),
        ("swats_global", "densenet121", 149 * E, 1e-3, 0.1),
        ("adabound", "resnet18", 100 * E - 1, 1e-3, 1.0),
        ("adabound", "resnet18", 100 * E, 1e-4, 1.0),
        ("adabound", "densenet121", 150 * E, 1e-4, 1.0),
        ("sgd", "resnet18", 149 * E, 1e-3, 1.0),
    ],
)
def test_reference_recipes(opt, model, count, lr, scale):
    setup = make_optimizer(Config(opt=opt, model=model), E)
    np.testing.assert_allclose(float(setup.learning_rate(count)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(setup.sgd_scale(count)), scale, rtol=1e-6)
    constant = make_optimizer(Config(opt=opt, model=model, recipe="none", lr=0.5), E)
    assert float(constant.learning_rate(count)) == 0.5 and float(constant.sgd_scale(count)) == 1


def test_swats_global_momentum_follows_the_recipe():
    params = {"w": jax.numpy.ones(2)}
    grads = {"w": jax.numpy.full(2, 0.5)}

    def sgd_updates(config):
        opt = make_optimizer(config, E).optimizer
        state = opt.init(params)
        out = []
        for _ in range(5):
            updates, state = opt.update(grads, state)
            out.append(float(updates["w"][0]))
        return out

    reference = sgd_updates(Config(opt="swats_global"))
    paper = sgd_updates(Config(opt="swats_global", swats_momentum="paper"))
    assert reference[:3] == paper[:3] and reference[4] != paper[4]


@pytest.mark.parametrize(
    "field, value", [("opt", "lion"), ("epochs", 0), ("dtype", "float16"), ("lr", -1.0)]
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_cli_end_to_end_resnet18(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cifar.main([*TINY, "--epochs=2", f"--workdir={workdir}"]) == 0
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "switches.md", "switches.csv"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "test_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [4, 8]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in records)
    checkpoints = workdir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["1", "2"]
    assert (checkpoints / "digests.json").is_file()  # from which epoch they have digests
    table = (workdir / "switches.csv").read_text().splitlines()
    assert table[0] == "layer,step,sgd_lr" and len(table) - 1 == records[-1]["num_switched"]


def test_cli_end_to_end_densenet121_bfloat16(tmp_path, monkeypatch):
    # The CLI's DenseNet route in bfloat16 with AdaBound. Compiling the 121 layers took 70 s
    # here while the depth is not what this test is about, so the preset is built with two
    # bottleneck layers per dense block (the blocks, transitions and concatenations are
    # still all there; test_models pins the full preset's 362 arrays and 6,956,298
    # parameters). The data is as small as the checks allow: 4 steps per epoch, so that
    # --max-steps=2 stops within the first epoch.
    def shallow(num_classes, growth_rate, *, rngs, dtype):
        return models.DenseNet((2, 2, 2, 2), growth_rate, num_classes, dtype=dtype, rngs=rngs)

    monkeypatch.setattr(models, "DenseNet121", shallow)
    workdir = tmp_path / "run"
    tiny = ["--data=synthetic", "--synthetic-size", "32", "16", "--batch-size=8", "--width=4"]
    args = [*tiny, "--eval-batch-size=16", "--model=densenet121", "--dtype=bfloat16"]
    args += ["--opt=adabound", "--max-steps=2"]
    assert cifar.main([*args, f"--workdir={workdir}"]) == 0
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and not record["complete"] and np.isfinite(record["train_loss"])
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


def test_resume_is_bit_exact(tmp_path):
    config = tiny_config(opt="swats_local", epochs=3)
    straight = train_and_evaluate(config, tmp_path / "straight")
    train_and_evaluate(tiny_config(opt="swats_local", epochs=1), tmp_path / "resumed")
    resumed = train_and_evaluate(config, tmp_path / "resumed")
    times = ("epoch_time_s", "compile_time_s", "images_per_s")
    drop_time = lambda rs: [{k: v for k, v in r.items() if k not in times} for r in rs]  # noqa: E731
    assert drop_time(resumed) == drop_time(straight)
    (epoch_a, state_a), (epoch_b, state_b) = (
        _final_state(tmp_path / name, config, 4) for name in ("straight", "resumed")
    )
    assert epoch_a == epoch_b == 3
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_flipped_byte_in_the_latest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    # Bit-exact with the same run resumed from the checkpoint of epoch 1 directly.
    corrupt, direct = tmp_path / "corrupt", tmp_path / "direct"
    argv = [*TINY, "--opt=swats_local"]
    assert cifar.main([*argv, "--epochs=2", f"--workdir={corrupt}"]) == 0
    shutil.copytree(corrupt, direct)
    shutil.rmtree(direct / "checkpoints" / "2")
    flip_a_byte_inside_an_array(corrupt / "checkpoints" / "2")
    caplog.set_level(logging.INFO, logger="train")
    assert cifar.main([*argv, "--epochs=3", f"--workdir={corrupt}"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (warning,) = [w for w in warnings if w.startswith("Skipping")]
    assert warning.startswith("Skipping the checkpoint of epoch 2 (")
    assert "differ from the digests saved with them" in warning
    assert any("resumed from the checkpoint of epoch 1" in r.getMessage() for r in caplog.records)
    assert cifar.main([*argv, "--epochs=3", f"--workdir={direct}"]) == 0
    config = tiny_config(opt="swats_local", epochs=3)
    (epoch_a, state_a), (epoch_b, state_b) = (
        _final_state(run, config, 4) for run in (corrupt, direct)
    )
    assert epoch_a == epoch_b == 3
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _write_image_folder_archive(path: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:xz") as tar:
        for split, count in (("train", per_class), ("test", max(1, per_class // 4))):
            for label in range(10):
                for i in range(count):
                    image = np.full((32, 32, 3), 25 * label, np.uint8)
                    image += rng.integers(0, 20, image.shape, dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"cifar/{split}/class{label}/{i:04d}.png")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)


def test_cli_on_an_image_folder_archive(tmp_path):
    archive = tmp_path / "fake-cifar.tar.xz"
    _write_image_folder_archive(archive, per_class=4)
    workdir = tmp_path / "run"
    args = [
        "--batch-size=8",
        "--width=4",
        "--eval-batch-size=10",
        "--epochs=1",
        "--opt=swats_global",
    ]
    assert cifar.main([*args, f"--data={archive}", f"--workdir={workdir}",
                       f"--cache-dir={tmp_path / 'cache'}"]) == 0  # fmt: skip
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 5 and record["complete"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--opt=lion"], "argument --opt: invalid choice: 'lion'"),
        (["--epochs=0"], "epochs must be >= 1"),
        (["--data=/no/such/cifar.tar.gz"], "/no/such/cifar.tar.gz: no such file or folder"),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path, capsys, argv, message):
    with (
        pytest.raises(SystemExit)
        if argv[0].startswith("--opt") or "epochs" in argv[0]
        else (_no_exit())
    ):
        status = cifar.main([*argv, f"--workdir={tmp_path / 'run'}"])
        assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_resuming_with_another_config_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(tiny_config(opt="adam").to_json()))
    assert cifar.main([*TINY, f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    assert "different configuration (opt: 'adam' -> 'swats_local')" in err


def test_garbled_metrics_stop_the_run_instead_of_being_dropped(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    garbled = '{"epoch": 1, "complete": true}\n{"epoch": 2, "comp\n{"epoch": 3, "complete": true}\n'
    (workdir / "metrics.jsonl").write_text(garbled)
    assert cifar.main([*TINY, f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl, line 2: not JSON" in err and "repair or move the file" in err
    assert err.count("\n") == 1
    assert (workdir / "metrics.jsonl").read_text() == garbled


def test_help_runs_without_jax():
    out = subprocess.run(
        [sys.executable, "-m", "train.cifar", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--opt" in out and "--max-steps" in out and "--recipe" in out


def test_importing_the_trainer_does_not_load_matplotlib():
    script = "import sys, train.trainer; assert 'matplotlib' not in sys.modules, 'matplotlib'"
    root = Path(__file__).resolve().parents[1]  # this checkout's train, not an installed one
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root)


def test_sharded_run_equals_single_device_run(tmp_path):
    # Plain SGD with a small rate over three steps: the rounding differences of the sharded
    # sums stay small. (Adam's normalised first steps, large rates, or longer runs of this
    # width-4 BatchNorm network amplify them: on this data the fourth step already reaches
    # 5% on some leaves, while per-shard batch statistics or fast-variance cancellation
    # show up as several percent from the first step.) The parameter *changes* are
    # compared, leaf by leaf, relative to the largest change of the leaf, within 1%: the
    # BatchNorm scales sit near 1.0, where one float32 step is 1.2e-7, so a change of 5e-5
    # is only resolved to about 0.2%, and the sharded sums moved some leaves by 0.6%.
    script = textwrap.dedent(
        f"""
        import pathlib
        import jax, numpy as np
        from tests.test_trainer import tiny_config, _final_state
        from train.trainer import init_model, train_and_evaluate
        assert len(jax.devices()) == 4
        moves = []
        for n in (1, 4):
            config = tiny_config(
                opt="sgd", recipe="none", lr=1e-3, epochs=1, num_devices=n,
                synthetic_size=(96, 64),
            )
            workdir = pathlib.Path("{tmp_path}") / str(n)
            train_and_evaluate(config, workdir)
            _, state = _final_state(workdir, config, 3)
            initial = init_model(config, 10)[1]
            moves.append(jax.tree.map(lambda a, b: np.asarray(a) - b, state["params"], initial))
            assert max(np.abs(m).max() for m in jax.tree.leaves(moves[-1])) > 1e-4
        for a, b in zip(*map(jax.tree.leaves, moves)):
            assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max(), np.abs(a - b).max()
        print("OK")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(root / "tests"),  # test_trainer imports the tests' helpers
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
