"""The training augmentation against its definition: torchvision's
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()`` and
``Normalize(MEAN, STD)``.

torchvision is not a dependency, so its semantics are written here with PyTorch tensor
ops on CHW images, as its tensor functional does them: ``pad`` with constant 0 on every
side, ``crop(img, top, left, 32, 32)`` at offsets drawn uniformly from ``0 ... 8``
(``torch.randint(0, h - th + 1)``), then ``img.flip(-1)`` with probability 1/2, then
division by 255 and ``(x - mean) / std`` per channel.
"""

import jax
import numpy as np
import pytest

from train.preprocessing import MEAN, STD, augment, crop_and_flip, preprocess_eval, random_crops

torch = pytest.importorskip("torch")

PADDING = 4


def _images(num: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth, photo-like uint8 NHWC images with edges reaching the borders (a coarse random
    pattern, upsampled, plus noise): the crop's black margins and the flip both show."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(num, 4, 4, 3))
    images = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    images = 128 + 50 * images + 10 * rng.normal(size=images.shape)
    return np.clip(images, 1, 255).astype(np.uint8)  # no zeros: padding is the only black


def _torchvision_crop_flip(image: np.ndarray, top: int, left: int, flip: bool) -> np.ndarray:
    """RandomCrop(32, padding=4) then RandomHorizontalFlip(), for given draws, on HWC uint8."""
    chw = torch.from_numpy(image).permute(2, 0, 1)
    height, width = chw.shape[1:]
    padded = torch.nn.functional.pad(chw, (PADDING,) * 4, mode="constant", value=0)
    crop = padded[:, top : top + height, left : left + width]
    if flip:
        crop = crop.flip(-1)
    return crop.permute(1, 2, 0).numpy()


def _torchvision_normalise(images: np.ndarray) -> np.ndarray:
    """ToTensor() and Normalize(MEAN, STD), in float64."""
    return (images / 255.0 - np.array(MEAN)) / np.array(STD)


def test_crop_and_flip_equal_torchvision_for_every_offset_and_flip():
    # Every one of the 81 offsets, with and without flip: offsets drawn on this side,
    # applied by the project and by the torchvision definition.
    draws = [(top, left, flip) for top in range(9) for left in range(9) for flip in (0, 1)]
    images = _images(len(draws))
    offsets = np.array([d[:2] for d in draws], np.int32)
    flips = np.array([d[2] for d in draws], bool)
    ours = np.asarray(jax.jit(crop_and_flip)(images, offsets, flips))
    for image, out, (top, left, flip) in zip(images, ours, draws):
        np.testing.assert_array_equal(out, _torchvision_crop_flip(image, top, left, flip))
    # The extreme offsets show four black rows or columns, the centre one none.
    assert np.all(ours[draws.index((0, 0, 0))][:PADDING] == 0)
    assert np.all(ours[draws.index((8, 8, 0))][-PADDING:, -PADDING:] == 0)
    np.testing.assert_array_equal(ours[draws.index((4, 4, 0))], images[draws.index((4, 4, 0))])


def test_augment_is_its_draws_applied_as_torchvision_does():
    images = _images(256, seed=1)
    key = jax.random.key(7)
    augmented = np.asarray(jax.jit(augment)(key, images))
    offsets, flips = map(np.asarray, random_crops(key, len(images), padding=PADDING))
    expected = np.stack(
        [
            _torchvision_crop_flip(image, top, left, flip)
            for image, (top, left), flip in zip(images, offsets, flips)
        ]
    )
    # Float32 normalisation against float64: XLA may round the division by 255 in the
    # last bit differently from NumPy (a few 1e-7 after dividing by std).
    np.testing.assert_allclose(augmented, _torchvision_normalise(expected), rtol=0, atol=2e-6)


def test_random_crops_are_uniform_like_torchvision():
    offsets, flips = map(np.asarray, random_crops(jax.random.key(0), 90_000, padding=PADDING))
    assert offsets.dtype == np.int32 and flips.dtype == bool
    for axis in range(2):
        counts = np.bincount(offsets[:, axis], minlength=9)
        assert len(counts) == 9  # torch.randint(0, 40 - 32 + 1): 0 ... 8, both ends included
        np.testing.assert_allclose(counts / len(offsets), 1 / 9, atol=0.006)  # 6 sigma
    assert abs(flips.mean() - 0.5) < 0.01
    # The two offsets and the flip are drawn independently.
    assert abs(np.corrcoef(offsets[:, 0], offsets[:, 1])[0, 1]) < 0.02
    assert abs(np.corrcoef(offsets[:, 0], flips)[0, 1]) < 0.02


def test_preprocess_eval_is_torchvision_normalisation():
    images = _images(8, seed=2)
    images[0, 0, 0] = (0, 255, 128)
    ours = np.asarray(jax.jit(preprocess_eval)(images))
    np.testing.assert_allclose(ours, _torchvision_normalise(images), rtol=0, atol=2e-6)
