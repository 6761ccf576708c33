"""Image augmentation and normalisation on NumPy batches (used for the in-memory image sets).

The random choices are drawn for the whole global batch from one generator and then sliced per
process, so a run on 1 host and on N hosts sees exactly the same augmented examples.
"""
from __future__ import annotations

import numpy as np

# Data sets whose labels survive a horizontal mirror image (digits and letters do not). ImageNet
# (resmem_jax/data/imagenet.py) flips in its own tf.data pipeline.
MIRROR_SYMMETRIC = frozenset({"cifar10", "cifar100", "imagenet2012"})


def sample_crop_flip(rng: np.random.Generator, batch_size: int, pad: int,
                     flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """Crop offsets int [b, 2] in [0, 2 * pad] and horizontal-flip flags bool [b]."""
  offsets = rng.integers(0, 2 * pad + 1, size=(batch_size, 2))
  flips = rng.random(batch_size) < 0.5 if flip else np.zeros(batch_size, dtype=bool)
  return offsets, flips


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  pad: int) -> np.ndarray:
  """Zero-pads [b, H, W, C] by ``pad`` per side, crops H x W at ``offsets``, mirrors ``flips``."""
  _, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  # A loop of slice copies is ~4x faster here than one fancy-indexing gather.
  for i, ((top, left), flip) in enumerate(zip(offsets, flips, strict=True)):
    crop = padded[i, top:top + height, left:left + width]
    out[i] = crop[:, ::-1] if flip else crop
  return out


def channel_stats(images: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of ``images / scale`` (float64 accumulation)."""
  channels = images.shape[-1]
  mean = np.zeros(channels)
  sq = np.zeros(channels)
  flat = images.reshape(-1, channels)
  chunk = 1 << 22  # bounded float64 temporaries even for CIFAR-sized arrays
  for start in range(0, len(flat), chunk):
    part = flat[start:start + chunk].astype(np.float64) / scale
    mean += part.sum(0)
    sq += (part * part).sum(0)
  count = max(1, len(flat))
  mean /= count
  std = np.sqrt(np.maximum(sq / count - mean * mean, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32)


def normalise(images: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 (or any numeric) [b, H, W, C] -> float32 ``(images / scale - mean) / std``."""
  # One multiply-add in place instead of four temporaries.
  gain = (1.0 / (np.float64(scale) * std)).astype(np.float32)
  bias = (-mean / std).astype(np.float32)
  out = images.astype(np.float32)
  out *= gain
  out += bias
  return out
