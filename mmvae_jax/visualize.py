"""Image grids for samples, reconstructions and cross-generations (PNG via Pillow)."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image


def to_display(images: np.ndarray, size: int | None = None) -> np.ndarray:
  """(N, H, W, C) floats in [0, 1] -> (N, S, S, 3), grey broadcast to RGB, zero-padded to S.

  As the official display code, MNIST (28×28×1) is zero-padded to 32×32 and shown in 3 channels.
  """
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, _ = images.shape
  size = max(h, w) if size is None else size
  out = np.zeros((n, size, size, 3), np.float32)
  top, left = (size - h) // 2, (size - w) // 2
  out[:, top:top + h, left:left + w] = images[:, :size, :size]
  return out


def grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
  """(N, H, W, 3) -> one (rows·(H+pad)+pad, ncol·(W+pad)+pad, 3) image, row-major, white gaps."""
  n, h, w, c = images.shape
  nrow = -(-n // ncol)
  canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, q = divmod(i, ncol)
    canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return canvas


def save_png(path: str | os.PathLike, image: np.ndarray, upscale: int = 2) -> None:
  """Writes an (H, W, 3) float image in [0, 1] atomically (temp file, then rename)."""
  arr = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
  if upscale > 1:
    arr = arr.repeat(upscale, axis=0).repeat(upscale, axis=1)
  tmp = f"{os.fspath(path)}.tmp.png"
  Image.fromarray(arr).save(tmp)
  os.replace(tmp, path)


def side_by_side(panels: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
  """Concatenates (H_i, W_i, 3) panels horizontally (top-aligned, white gap)."""
  h = max(p.shape[0] for p in panels)
  parts = []
  for i, p in enumerate(panels):
    padded = np.ones((h, p.shape[1], 3), np.float32)
    padded[:p.shape[0]] = p
    parts.append(padded)
    if i + 1 < len(panels):
      parts.append(np.ones((h, gap, 3), np.float32))
  return np.concatenate(parts, axis=1)


def generation_figure(samples: Sequence[np.ndarray], ncol: int = 8) -> np.ndarray:
  """Prior samples decoded in every modality (each (N, H, W, C)), grids side by side."""
  size = max(max(s.shape[1:3]) for s in samples)
  return side_by_side([grid(to_display(s, size), ncol) for s in samples])


def reconstruction_figure(data: Sequence[np.ndarray], recon: Sequence[Sequence[np.ndarray]]
                          ) -> np.ndarray:
  """Rows: the data of each modality, then recon[e][d] for every (encoder e, decoder d).

  Args:
    data: M arrays (N, H_m, W_m, C_m), the observed test items.
    recon: M×M matrix of means, recon[e][d] of shape (N, H_d, W_d, C_d).
  """
  size = max(max(x.shape[1:3]) for x in data)
  rows = [to_display(x, size) for x in data]
  m = len(data)
  for e in range(m):
    for d in range(m):
      rows.append(to_display(recon[e][d], size))
  n = rows[0].shape[0]
  return grid(np.concatenate(rows, axis=0), ncol=n)
