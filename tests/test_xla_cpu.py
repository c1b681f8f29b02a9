"""The XLA:CPU options the trainer sets for itself (train/xla_cpu.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY

from train import xla_cpu

ROOT = Path(__file__).resolve().parents[1]
FLAG = "--xla_cpu_experimental_ynn_fusion_type="
IN_RANGE = xla_cpu.MEASURED_JAXLIB[0]


@pytest.fixture
def fresh_process(monkeypatch):
    """tune() as it behaves before JAX's first computation, on a measured jaxlib."""
    monkeypatch.setattr(xla_cpu, "_backends_exist", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: IN_RANGE)


def test_adds_the_options_after_the_users_own(fresh_process):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_cpu.tune(environ) == [FLAG]
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {FLAG}"
    assert xla_cpu.tune(environ) == []  # once only
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {FLAG}"


def test_sets_xla_flags_where_there_were_none(fresh_process):
    environ = {}
    assert xla_cpu.tune(environ) == [FLAG]
    assert environ == {"XLA_FLAGS": FLAG}


@pytest.mark.parametrize(
    "environ",
    [
        {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"},
        {xla_cpu.OPT_OUT: "1"},
        {xla_cpu.OPT_OUT: "1", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"},
    ],
    ids=["the user's own value", "opted out", "opted out, other flags"],
)
def test_leaves_the_users_choice_alone(fresh_process, environ):
    before = dict(environ)
    assert xla_cpu.tune(environ) == []
    assert environ == before


@pytest.mark.parametrize("version", [(0, 4, 35), (0, 10, 1), xla_cpu.MEASURED_JAXLIB[1], (1, 0, 0)])
def test_leaves_an_unmeasured_jaxlib_alone(monkeypatch, version):
    # XLA aborts the process on an option it does not know: only measured releases get them.
    monkeypatch.setattr(xla_cpu, "_backends_exist", lambda: False)
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: version)
    environ = {}
    assert xla_cpu.tune(environ) == []
    assert environ == {}


def test_too_late_once_jax_has_computed(monkeypatch):
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # JAX's backends exist from here on
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: IN_RANGE)
    environ = {}
    assert xla_cpu.tune(environ) == []
    assert environ == {}


def test_reads_the_installed_jaxlib_version():
    import jaxlib

    version = xla_cpu._jaxlib_version()
    assert len(version) == 3 and all(isinstance(part, int) for part in version)
    assert version[:2] == tuple(int(part) for part in jaxlib.__version__.split(".")[:2])


_CONVOLUTION = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from train import xla_cpu
added = xla_cpu.tune()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 16, 16, 8)), jnp.float32)
w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.1, jnp.float32)
layout = ("NHWC", "HWIO", "NHWC")
def loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=layout)
    return jnp.sum(jnp.tanh(y))
value, (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
flags = __import__("os").environ.get("XLA_FLAGS", "")
print(json.dumps({"added": added, "flags": flags, "value": float(value),
                  "dx": np.asarray(dx).tolist(), "dw": np.asarray(dw).tolist()}))
"""


def _fresh_python(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh process on the CPU, without this session's XLA_FLAGS or
    opt-out (plus ``env``); it must succeed."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _convolution_in_a_fresh_process(**env: str) -> dict:
    result = _fresh_python("-c", _CONVOLUTION, **env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_installed_xla_takes_the_options_and_computes_the_same():
    """In a fresh process on this jaxlib: XLA accepts what tune() sets (an unknown option
    would abort it), and a convolution and its gradients agree with XLA's defaults' to
    float32 rounding."""
    tuned = _convolution_in_a_fresh_process()
    default = _convolution_in_a_fresh_process(**{xla_cpu.OPT_OUT: "1"})
    if xla_cpu.measured_jaxlib():
        assert tuned["added"] == [FLAG] and tuned["flags"] == FLAG
    else:
        assert tuned["added"] == []
    assert default["added"] == [] and default["flags"] == ""
    np.testing.assert_allclose(tuned["value"], default["value"], rtol=1e-5)
    for name in ("dx", "dw"):
        np.testing.assert_allclose(tuned[name], default[name], rtol=1e-4, atol=1e-5)


def test_the_command_line_sets_the_options_before_jax_starts(tmp_path):
    argv = [*TINY, "--epochs=1", "--max-steps=1", f"--workdir={tmp_path / 'run'}"]
    result = _fresh_python("-m", "train.cifar", *argv)
    said = f"XLA:CPU options for a faster step: {FLAG} (SWATS_JAX_XLA_DEFAULTS=1 keeps XLA's)"
    assert (said in result.stderr) == xla_cpu.measured_jaxlib()
