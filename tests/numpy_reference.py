"""Independent float64 NumPy reference for SWATS and AdaBound (test oracle).

Written from the algorithm's description only (not from the swats_jax sources),
with straightforward per-step Python loops: clarity over speed.  Section numbers
in the comments refer to docs/algorithm.md.

Conventions shared by both optimizers:

* ``params`` is a list of arrays (the leaves, in order); they are copied to
  float64 and never modified in place.
* ``grad_fn(count, params_list)`` returns the raw gradients (a list of arrays)
  for the current params, where ``count`` is the number of completed updates
  (0 on the first step).
* ``k = count + 1`` is the 1-based step used in the bias corrections
  ``bc1 = 1 - b1**k`` and ``bc2 = 1 - b2**k``.
* Schedules (``lr``, ``sgd_scale``) are a float or a callable of ``count``.
* The result holds ``"params"`` (the params after each step) and ``"updates"``
  (the update applied on each step), each a list of ``num_steps`` lists of
  arrays.
"""

import numpy as np


def _as_schedule(value):
    """A float or a callable ``f(count)`` -> a callable ``f(count)``."""
    if callable(value):
        return value
    return lambda count: value


def _sgd_direction(buf, g, b1, nesterov, momentum):
    """One SGD-with-momentum step for one leaf (section 3).

    ``buf`` is the leaf's momentum buffer, ``None`` before its first SGD step.
    Returns ``(new_buf, d)``; the applied update is ``-rate_scaled * d``.

    momentum="paper":      B = b1*B + g (B starts at zero at the switch);
                           d = (1-b1)*B, or with nesterov (1-b1)*(g + b1*B).
    momentum="reference":  the global reference code (Mrpatekful/swats), whose
                           buffer aliases the gradient tensor from the second
                           SGD step on, so the in-place scaling is stored:
        first step:  B = g;  d = (1-b1)*g, or with nesterov
                     (1-b1)*g + b1*B = g  (grad and buf are separate tensors).
        later steps: C = b1*B + g;  B = (1-b1)*C, and with nesterov
                     B = B + b1*B = (1+b1)*(1-b1)*C (``grad += b1*buf`` acts on
                     the one shared tensor);  d = B.
    """
    if momentum == "paper":
        new_buf = g if buf is None else b1 * buf + g
        d = (g + b1 * new_buf) if nesterov else new_buf
        return new_buf, (1 - b1) * d
    # momentum == "reference"
    if buf is None:
        new_buf = g.copy()
        d = (1 - b1) * g
        if nesterov:
            d = d + b1 * new_buf
        return new_buf, d
    new_buf = (1 - b1) * (b1 * buf + g)
    if nesterov:
        new_buf = new_buf + b1 * new_buf
    return new_buf, new_buf


def reference_sgd_magnitudes(n, momentum, *, b1=0.9, nesterov=False):
    """SGD update magnitudes for rate 1 and constant scalar gradient 1 (section 3).

    Test vectors from the spec: paper 0.1, 0.19, 0.271, 0.3439, ...;
    reference 0.1, 0.19, 0.1171, 0.1105, ...
    """
    if momentum not in ("paper", "reference"):
        raise ValueError(f"momentum must be 'paper' or 'reference', got {momentum!r}")
    g = np.array(1.0)
    buf = None
    magnitudes = []
    for _ in range(n):
        buf, d = _sgd_direction(buf, g, b1, nesterov, momentum)
        magnitudes.append(float(abs(d)))
    return magnitudes


def swats_reference(
    params,
    grad_fn,
    num_steps,
    *,
    mode,
    lr=1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    switch_tol=1e-5,
    switch_rtol=1e-5,
    switch_atol=1e-8,
    require_positive=True,
    sgd_scale=1.0,
    weight_decay=0.0,
    amsgrad=False,
    nesterov=False,
    momentum="paper",
    skip_nonfinite=True,
):
    """SWATS, local or global switch (sections 1-5).

    mode="local":  each leaf switches on its own and keeps its own rate; the
                   test is ``|Lam - gamma| < switch_tol`` (and ``Lam > 0`` if
                   ``require_positive``).
    mode="global": the first step on which any leaf passes
                   ``|Lam - gamma| <= switch_atol + switch_rtol*|gamma|`` and
                   ``Lam > 0`` moves every leaf to SGD from the next step, with
                   the ``Lam`` of the first triggering leaf in list order.

    ``lr`` scales the Adam phase only; ``sgd_scale`` multiplies the adopted SGD
    rate only.  ``weight_decay`` is L2 added to the gradient before everything,
    in both phases; ``amsgrad`` uses the running max of ``v`` in the
    denominator.  ``momentum`` selects the SGD recursion (see
    ``_sgd_direction``); it is applied per leaf in either mode.

    Returns a dict with "params", "updates", "events" (a list of
    ``(leaf_index, k, rate)``, the rate before ``sgd_scale``: one per switched
    leaf for local, one for the triggering leaf for global), "lam" (final
    per-leaf EMA), "switched" (final per-leaf flags), and "lam_hat" and "gamma":
    per leaf, the bias-corrected estimate and the projected rate of the last step
    whose switch test ran (NaN if none did).
    """
    if mode not in ("local", "global"):
        raise ValueError(f"mode must be 'local' or 'global', got {mode!r}")
    if momentum not in ("paper", "reference"):
        raise ValueError(f"momentum must be 'paper' or 'reference', got {momentum!r}")
    lr_fn = _as_schedule(lr)
    scale_fn = _as_schedule(sgd_scale)

    params = [np.array(p, dtype=np.float64) for p in params]
    n = len(params)
    # Section 4: per-leaf buffers and scalars.
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    v_max = [np.zeros_like(p) for p in params]  # AMSGrad only
    buf = [None] * n  # SGD momentum buffer, created at the first SGD step
    lam = [0.0] * n  # EMA of gamma
    switched = [False] * n
    rate = [None] * n  # adopted SGD rate (before sgd_scale)
    last_lam_hat = [np.nan] * n  # of the last step whose test ran
    last_gamma = [np.nan] * n
    events = []
    params_history, updates_history = [], []

    for count in range(num_steps):
        k = count + 1
        bc1 = 1 - b1**k
        bc2 = 1 - b2**k
        grads = grad_fn(count, list(params))
        updates = []
        triggered = []  # (leaf_index, Lam) of leaves whose test fires this step

        for i in range(n):
            g = np.asarray(grads[i], dtype=np.float64) + weight_decay * params[i]

            if switched[i]:
                # Section 3: SGD phase.
                buf[i], d = _sgd_direction(buf[i], g, b1, nesterov, momentum)
                updates.append(-(rate[i] * scale_fn(count)) * d)
                continue

            # Section 1: Adam phase, eps on the un-corrected sqrt(v).
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if amsgrad:
                v_max[i] = np.maximum(v_max[i], v[i])
                denom = np.sqrt(v_max[i]) + eps
            else:
                denom = np.sqrt(v[i]) + eps
            p = -lr_fn(count) * np.sqrt(bc2) / bc1 * m[i] / denom
            updates.append(p)

            # Section 2: projection and switch test.
            pg = np.sum(p * g)
            if pg == 0:
                continue
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                gamma = np.sum(p * p) / (-pg)
                if skip_nonfinite and not np.isfinite(gamma):
                    continue  # Section 5: documented deviation from the reference
                lam[i] = b2 * lam[i] + (1 - b2) * gamma
                lam_hat = lam[i] / bc2
                last_lam_hat[i], last_gamma[i] = float(lam_hat), float(gamma)
                diff = abs(lam_hat - gamma)
                if mode == "local":
                    passes = diff < switch_tol and (lam_hat > 0 or not require_positive)
                else:
                    passes = diff <= switch_atol + switch_rtol * abs(gamma) and lam_hat > 0
            if k > 1 and passes:
                triggered.append((i, float(lam_hat)))

        # Switches take effect from the next step (the Adam step above is applied).
        if mode == "local":
            for i, lam_hat in triggered:
                switched[i] = True
                rate[i] = lam_hat
                events.append((i, k, lam_hat))
        elif triggered:
            i, lam_hat = triggered[0]  # first triggering leaf in list order
            switched = [True] * n
            rate = [lam_hat] * n
            events.append((i, k, lam_hat))

        params = [w + u for w, u in zip(params, updates)]
        params_history.append(params)
        updates_history.append(updates)

    return {
        "params": params_history,
        "updates": updates_history,
        "events": events,
        "lam": [float(x) for x in lam],
        "switched": list(switched),
        "lam_hat": last_lam_hat,
        "gamma": last_gamma,
    }


def adabound_bounds(final_t, gamma, k):
    """AdaBound step-size bounds at 1-based step ``k`` (section 7)."""
    lower = final_t * (1 - 1 / (gamma * k + 1))
    upper = final_t * (1 + 1 / (gamma * k))
    return lower, upper


def adabound_reference(
    params,
    grad_fn,
    num_steps,
    *,
    lr=1e-3,
    final_lr=0.1,
    gamma=1e-3,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    amsbound=False,
    base_lr=None,
):
    """AdaBound / AMSBound in the official code's form (section 7).

    ``lr`` may be a schedule; the bounds follow it through
    ``final_t = final_lr * lr_t / base_lr``, with ``base_lr`` defaulting to the
    lr at count 0.  ``weight_decay`` is L2 added to the gradient.
    """
    lr_fn = _as_schedule(lr)
    if base_lr is None:
        base_lr = lr_fn(0)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")

    params = [np.array(p, dtype=np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    v_max = [np.zeros_like(p) for p in params]  # AMSBound only
    params_history, updates_history = [], []

    for count in range(num_steps):
        k = count + 1
        bc1 = 1 - b1**k
        bc2 = 1 - b2**k
        lr_t = lr_fn(count)
        step_size = lr_t * np.sqrt(bc2) / bc1
        final_t = final_lr * lr_t / base_lr
        lower, upper = adabound_bounds(final_t, gamma, k)
        grads = grad_fn(count, list(params))
        updates = []
        for i, w in enumerate(params):
            g = np.asarray(grads[i], dtype=np.float64) + weight_decay * w
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            if amsbound:
                v_max[i] = np.maximum(v_max[i], v[i])
                denom = np.sqrt(v_max[i]) + eps
            else:
                denom = np.sqrt(v[i]) + eps
            updates.append(-np.clip(step_size / denom, lower, upper) * m[i])
        params = [w + u for w, u in zip(params, updates)]
        params_history.append(params)
        updates_history.append(updates)

    return {"params": params_history, "updates": updates_history}
