"""Parity with the PyPI package pytorch-swats, the peer the reference global code borrows."""

import jax.numpy as jnp
import numpy as np
import pytest

import swats_jax

torch = pytest.importorskip("torch")
swats_torch = pytest.importorskip("swats")

NUM_STEPS = 80


def _curvature():
    return np.linspace(0.5, 3.0, 6)


def _torch_run(lr, **kwargs):
    weights = torch.nn.Parameter(10 * torch.linspace(1.0, 2.5, 6, dtype=torch.float64))
    curvature = torch.tensor(_curvature(), dtype=torch.float64)
    opt = swats_torch.SWATS([weights], lr=lr, **kwargs)
    history, phases = [], []
    for count in range(NUM_STEPS):
        opt.zero_grad()
        noise = 0.05 * np.sin(0.7 * count) * torch.arange(6, dtype=torch.float64)
        loss = 0.5 * (curvature * weights**2).sum() + (noise * weights).sum()
        loss.backward()
        opt.step()
        history.append(weights.detach().numpy().copy())
        phases.append(opt.param_groups[0]["phase"])
    return np.array(history), phases, opt.param_groups[0]["lr"]


def _our_run(lr, **kwargs):
    opt = swats_jax.swats_global(learning_rate=lr, switch_rtol=1e-6, momentum="reference", **kwargs)
    weights = 10 * jnp.linspace(1.0, 2.5, 6, dtype=jnp.float64)
    curvature = jnp.asarray(_curvature())
    state = opt.init(weights)
    history = []
    for count in range(NUM_STEPS):
        noise = 0.05 * np.sin(0.7 * count) * jnp.arange(6, dtype=jnp.float64)
        updates, state = opt.update(curvature * weights + noise, state, weights)
        weights = weights + updates
        history.append(np.asarray(weights))
    return np.array(history), state


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"nesterov": True}, {"weight_decay": 0.01, "amsgrad": True, "nesterov": True}],
    ids=["plain", "nesterov", "wd_amsgrad_nesterov"],
)
def test_matches_pytorch_swats_through_the_switch(x64, kwargs):
    torch.set_default_dtype(torch.float64)
    expected, phases, torch_rate = _torch_run(1e-3, **kwargs)
    assert phases[-1] == "SGD" and phases.index("SGD") < NUM_STEPS // 2
    ours, state = _our_run(1e-3, **kwargs)
    (event,) = swats_jax.switch_events(state)
    assert event.step == phases.index("SGD") + 1
    np.testing.assert_allclose(event.sgd_lr, torch_rate, rtol=1e-12)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-10)
    # The SGD steps are small next to the weights: compare the steps themselves too.
    np.testing.assert_allclose(np.diff(ours, axis=0), np.diff(expected, axis=0), rtol=1e-8)
