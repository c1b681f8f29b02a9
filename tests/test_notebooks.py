"""The Colab notebooks: stored clean and in sync with their scripts, and run top to bottom.

Each notebook is executed with papermill, its ``parameters`` cell overridden with a tiny
configuration (synthetic data, a width-4 network, a few steps), the way a user or CI
would run it headless.
"""

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from train.config import OPTIMIZERS, Config

jupytext = pytest.importorskip("jupytext")
papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ["swats_quickstart", "swats_cifar10"]


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """The environment the notebook kernels inherit.

    The kernels run in a temporary folder: ``PYTHONPATH`` makes them import this checkout's
    ``swats_jax`` and ``train``, not whichever copy is installed. They also share the test
    session's compilation cache (conftest.py), so that a program compiled in one kernel, or
    by the trainer tests, is not compiled again.
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(min_time))
    for module in ("swats_jax", "train"):
        find = f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)"
        origin = subprocess.run(
            [sys.executable, "-c", find], capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout.strip()
        assert origin == str(ROOT / module / "__init__.py"), origin


def _execute(name: str, output: Path, parameters: dict) -> dict:
    """Runs a notebook with ``parameters``; returns the executed notebook as JSON."""
    declared = papermill.inspect_notebook(str(COLAB / f"{name}.ipynb"))
    unknown = set(parameters) - set(declared)
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    papermill.execute_notebook(
        str(COLAB / f"{name}.ipynb"),
        str(output),
        parameters=parameters,
        cwd=str(output.parent),
        progress_bar=False,
        kernel_name="python3",
    )
    return json.loads(output.read_text())


def _outputs(notebook: dict, output_type: str, mime: str | None = None) -> list[str]:
    found = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] != output_type:
                continue
            if mime is None:
                text = output.get("text", "")
            elif mime in output["data"]:
                text = output["data"][mime]
            else:
                continue
            found.append(text if isinstance(text, str) else "".join(text))
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    notebook = json.loads((COLAB / f"{name}.ipynb").read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"]
    tagged = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0]["cell_type"] == "code"
    assert "colab.research.google.com/github/" in "".join(notebook["cells"][0]["source"])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_jupytext_script(name):
    """The .ipynb and the .py (percent format) hold the same cells: edit either, then
    ``jupytext --sync colab/*.ipynb``."""
    notebook = jupytext.read(COLAB / f"{name}.ipynb")
    script = jupytext.read(COLAB / f"{name}.py")

    def cells(nb):
        return [(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in nb.cells]

    assert cells(notebook) == cells(script)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"


def test_cifar10_parameters_are_the_config_fields():
    """Every run option is a parameter of the notebook, with the command line's default, so
    that a new ``Config`` field cannot be left out of it; ``opt`` and ``seed`` are lists,
    ``optimizers`` and ``seeds``, whose runs the notebook makes (by default the one seed of
    the command line)."""
    declared = papermill.inspect_notebook(str(COLAB / "swats_cifar10.ipynb"))
    options = {field.name for field in dataclasses.fields(Config)} - {"opt", "seed"}
    assert set(declared) == options | {"optimizers", "seeds", "workdir"}
    defaults = {name: ast.literal_eval(declared[name]["default"]) for name in options}
    assert Config.from_values(defaults) == Config()
    assert set(ast.literal_eval(declared["optimizers"]["default"])) <= set(OPTIMIZERS)
    assert ast.literal_eval(declared["seeds"]["default"]) == [Config().seed]


def test_quickstart_runs(tmp_path, kernel_env):
    notebook = _execute("swats_quickstart", tmp_path / "out.ipynb", {"steps": 300})
    printed = "".join(_outputs(notebook, "stream"))
    assert "swats_local: test accuracy" in printed
    assert "swats_global (switch_rtol=1e-3): test accuracy" in printed
    markdown = _outputs(notebook, "display_data", "text/markdown")
    assert any("| layer | step | sgd_lr |" in md for md in markdown)
    # The diagnostics: where each array stands, and which tolerance would switch which.
    assert any("| array | phase | switch step | Λ | γ |" in md for md in markdown)
    assert any("| array | `switch_tol=0.001` |" in md for md in markdown)
    assert "switch_tol=1e-05 would switch" in printed
    assert len(_outputs(notebook, "display_data", "image/png")) == 5


def test_cifar10_runs_and_resumes(tmp_path, kernel_env):
    # The data and model of test_trainer.TINY: the trainer tests find these programs in the
    # session's compilation cache (and the second session finds the first one's).
    tiny = {
        "data": "synthetic",
        "synthetic_size": [128, 64],
        "batch_size": 32,
        "width": 4,
        "workdir": str(tmp_path / "runs"),
    }
    notebook = _execute("swats_cifar10", tmp_path / "first.ipynb", {**tiny, "epochs": 1})
    optimizers = ["swats_local", "swats_global", "adabound"]
    for opt in optimizers:
        records = (tmp_path / "runs" / f"{opt}-resnet18" / "metrics.jsonl").read_text()
        assert len(records.splitlines()) == 1
    figures = tmp_path / "runs" / "figures-resnet18"
    assert {p.name for p in figures.iterdir()} == {
        "test_accuracy.png",
        "train_loss.png",
        "switches-swats_local.png",
        "switches-swats_global.png",
    }
    tables = _outputs(notebook, "display_data", "text/markdown")
    assert sum("| layer | step | sgd_lr |" in md for md in tables) == 2
    assert "| swats_local | resnet18 | 0 | 1 |" in tables[-1] and "| 94.13 |" in tables[-1]
    assert " ± — (1) |" in tables[-1]

    # A second session with more epochs picks the run up from its checkpoint, as after a
    # Colab disconnect: epoch 1 is not trained again. Seed 1 is new: a run of its own.
    run = tmp_path / "runs" / "swats_local-resnet18"
    first_epoch = (run / "metrics.jsonl").read_text().splitlines()[0]
    notebook = _execute(
        "swats_cifar10",
        tmp_path / "second.ipynb",
        {**tiny, "epochs": 2, "optimizers": ["swats_local"], "seeds": [0, 1]},
    )
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == first_epoch
    seed_1 = tmp_path / "runs" / "swats_local-resnet18-seed1"
    assert json.loads((seed_1 / "config.json").read_text())["seed"] == 1
    assert len((seed_1 / "metrics.jsonl").read_text().splitlines()) == 2
    assert (figures / "switches-swats_local-seed1.png").exists()
    table = _outputs(notebook, "display_data", "text/markdown")[-1]
    assert "| swats_local | resnet18 | 0, 1 | 2 |" in table and " (2) |" in table
