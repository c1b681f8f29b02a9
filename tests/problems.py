"""Small deterministic problems whose leaves switch at different steps."""

import numpy as np


def make_problem(seed: int = 0, sizes=(5, (3, 4), 1, 7)):
    """Returns (params, grad_fn): a noisy quadratic with one leaf per entry of ``sizes``.

    Each leaf has its own curvature and a deterministic oscillating noise term, so that
    the rate estimates settle (and the leaves switch) on different steps.
    """
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s) for s in sizes]
    curvature = [rng.uniform(0.5, 3.0, size=np.shape(p)) for p in params]
    noise = [rng.normal(size=np.shape(p)) for p in params]
    frequency = rng.uniform(0.3, 2.0, size=len(sizes))

    def grad_fn(count, current):
        return [
            c * np.asarray(w) + 0.05 * (1 + i) * np.sin(f * count) * z
            for i, (w, c, z, f) in enumerate(zip(current, curvature, noise, frequency))
        ]

    return params, grad_fn
