"""Tests for train.models: sizes and names of the presets, shapes, dtypes, initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import models

# Full-size models are only traced (nnx.eval_shape); the ones that run are tiny.
# RBG keys because threefry initialisers take ~0.5 s each to compile on CPU.


def _rngs() -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _params(model: nnx.Module) -> dict[str, jax.Array]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): param.get_value() for path, param in flat}


@pytest.fixture(scope="module")
def resnet18() -> models.ResNet:
    return nnx.eval_shape(lambda: models.create_model("resnet18", rngs=_rngs()))


@pytest.fixture(scope="module")
def densenet121() -> models.DenseNet:
    return nnx.eval_shape(lambda: models.create_model("densenet121", rngs=_rngs()))


@pytest.fixture(scope="module")
def tiny_resnet() -> models.ResNet:
    return models.ResNet18(width=4, rngs=_rngs())


@nnx.jit
def _forward(model: nnx.Module, images: jax.Array) -> jax.Array:
    return model(images)


def _images(batch: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))


@pytest.mark.parametrize(
    ("name", "num_params", "num_arrays"),
    [("resnet18", 11_173_962, 62), ("densenet121", 6_956_298, 362)],
)
def test_preset_sizes_match_pytorch_reference(name, num_params, num_arrays, request):
    model = request.getfixturevalue(name)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(params) == num_arrays
    assert sum(math.prod(p.shape) for p in params) == num_params
    assert all(p.dtype == jnp.float32 for p in params)


def test_parameter_paths_are_readable(resnet18, densenet121):
    paths = _params(resnet18)
    assert paths["conv1/kernel"].shape == (3, 3, 3, 64)
    assert paths["layer1/0/conv1/kernel"].shape == (3, 3, 64, 64)
    assert paths["layer2/0/shortcut/conv/kernel"].shape == (1, 1, 64, 128)
    assert paths["layer4/1/bn2/scale"].shape == (512,)
    assert paths["linear/kernel"].shape == (512, 10)
    assert not any("layer1" in p and "shortcut" in p for p in paths)

    paths = _params(densenet121)
    assert paths["conv1/kernel"].shape == (3, 3, 3, 64)
    assert paths["dense1/0/conv1/kernel"].shape == (1, 1, 64, 128)
    assert paths["trans3/conv/kernel"].shape == (1, 1, 1024, 512)
    assert paths["dense4/15/conv2/kernel"].shape == (3, 3, 128, 32)
    assert paths["linear/kernel"].shape == (1024, 10)


def test_batch_stats_are_not_params(tiny_resnet):
    stats = nnx.to_flat_state(nnx.state(tiny_resnet, nnx.BatchStat))
    assert len(stats) == 2 * 20  # mean and var of every BatchNorm
    assert all(path[-1] in ("mean", "var") for path, _ in stats)


def test_create_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="'vgg16'"):
        models.create_model("vgg16", rngs=_rngs())


def test_create_model_passes_width_and_classes():
    model = nnx.eval_shape(
        lambda: models.create_model("ResNet18", num_classes=100, width=8, rngs=_rngs())
    )
    assert isinstance(model, models.ResNet)
    assert _params(model)["linear/kernel"].shape == (64, 100)


def test_tiny_resnet_train_and_eval(tiny_resnet):
    model = nnx.clone(tiny_resnet)
    images = _images()
    model.train()
    logits = _forward(model, images)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # PyTorch momentum 0.1: one step from zero moves the running mean 10% of the way.
    batch_mean = jnp.mean(model.conv1(images), axis=(0, 1, 2))
    np.testing.assert_allclose(model.bn1.mean[...], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)

    model.eval()
    stats = nnx.state(model, nnx.BatchStat)
    first, second = _forward(model, images), _forward(model, images)
    assert first.shape == (2, 10)
    np.testing.assert_array_equal(first, second)
    jax.tree.map(np.testing.assert_array_equal, stats, nnx.state(model, nnx.BatchStat))
    # In eval mode an example's logits do not depend on the rest of the batch.
    other = _forward(model, images.at[1].set(0.0))
    np.testing.assert_allclose(other[0], first[0], rtol=1e-5, atol=1e-6)


def test_tiny_densenet_train_and_eval():
    model = models.DenseNet((2, 1, 1), growth_rate=4, num_classes=7, rngs=_rngs())
    assert _params(model)["trans1/conv/kernel"].shape == (1, 1, 16, 8)
    logits = _forward(model, _images())
    assert logits.shape == (2, 7) and np.all(np.isfinite(logits))
    model.eval()
    assert _forward(model, _images()).shape == (2, 7)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    def build_and_run():
        model = models.ResNet18(width=4, dtype=jnp.bfloat16, rngs=_rngs())
        images = _images()
        return model, model.conv1(images), model.layer2[0](model.conv1(images)), model(images)

    model, stem, block, logits = nnx.eval_shape(build_and_run)
    assert stem.dtype == jnp.bfloat16 and block.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))


def test_initialisation_matches_pytorch_defaults(tiny_resnet):
    params = _params(tiny_resnet)
    for path, value in params.items():
        if path.endswith("kernel"):
            bound = 1 / math.sqrt(math.prod(value.shape[:-1]))
            assert np.abs(value).max() <= bound, path
        elif path == "linear/bias":
            assert np.abs(value).max() <= 1 / math.sqrt(32)
        elif path.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        else:
            assert path.endswith(("bn/bias", "bn1/bias", "bn2/bias")), path
            np.testing.assert_array_equal(value, 0.0)
    assert np.abs(params["conv1/kernel"]).max() <= 1 / math.sqrt(27)
    # Uniform on [-b, b] has standard deviation b / sqrt(3) and reaches close to b.
    big = np.asarray(params["layer4/1/conv2/kernel"])  # 3x3x32x32: fan_in 288
    bound = 1 / math.sqrt(288)
    assert big.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert np.abs(big).max() > 0.99 * bound
    assert abs(big.mean()) < 0.02 * bound
    bn = tiny_resnet.layer1[0].bn1
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
