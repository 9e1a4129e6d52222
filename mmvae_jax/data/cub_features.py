"""ResNet-101 features of CUB images, as the official code computes them.

Official preprocessing, reproduced on purpose (see
docs/official-code.md#resnet-101-feature-preprocessing):
  * torchvision ResNet-101 with the ImageNet V1 weights, every layer but the final fc: the
    2048-d global-average-pooled feature, network in eval mode (BatchNorm running statistics);
  * each image resized so that its SHORTER side is 224 (aspect ratio kept, bilinear), converted
    to a float tensor in [0, 1], with NO ImageNet mean/std normalisation and NO crop.
Images of different sizes are batched separately (the network is in eval mode, so a feature does
not depend on its batch).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

SHORTER_SIDE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def list_images(split_dir: str) -> list[str]:
  """Image paths in ImageFolder order: sorted class folders, then sorted file names."""
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"{split_dir}: no such folder (expected <data_root>/<split>/<class>/<image>)")
  classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  files = []
  for c in classes:
    folder = os.path.join(split_dir, c)
    files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not files:
    raise FileNotFoundError(f"{split_dir}: no images in class sub-folders")
  return files


def load_image(path: str, shorter_side: int = SHORTER_SIDE):
  """(3, H, W) float32 in [0, 1]: RGB, shorter side resized to `shorter_side`, no normalisation."""
  import numpy as np
  from PIL import Image
  with Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    if w <= h:
      size = (shorter_side, max(1, int(shorter_side * h / w)))
    else:
      size = (max(1, int(shorter_side * w / h)), shorter_side)
    im = im.resize(size, Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
  return np.ascontiguousarray(arr.transpose(2, 0, 1))


def extract(files: Sequence[str], backbone: Callable, batch_size: int = 256):
  """(N, 2048) float32 features of `files` in order.

  Args:
    backbone: maps a float32 array (B, 3, H, W) in [0, 1] to (B, 2048) features.
  Consecutive images of equal size are batched together (at most `batch_size`).
  """
  import numpy as np
  out, batch, shape = [], [], None

  def flush():
    if batch:
      feats = np.asarray(backbone(np.stack(batch)), np.float32)
      if feats.shape != (len(batch), 2048):
        raise ValueError(f"backbone returned features of shape {feats.shape}, expected "
                         f"({len(batch)}, 2048)")
      out.append(feats)
      batch.clear()

  for f in files:
    x = load_image(f)
    if shape is not None and (x.shape != shape or len(batch) == batch_size):
      flush()
    shape = x.shape
    batch.append(x)
  flush()
  return np.concatenate(out)


def resnet101_backbone(device: str = "cpu") -> Callable:
  """torchvision's ImageNet (V1) ResNet-101 without its fc layer, eval mode."""
  try:
    import torch
    import torchvision
  except ImportError:
    raise ImportError("feature extraction needs torch and torchvision (pip install torch "
                      "torchvision); they are not dependencies of mmvae_jax") from None
  weights = torchvision.models.ResNet101_Weights.IMAGENET1K_V1
  net = torchvision.models.resnet101(weights=weights)
  body = torch.nn.Sequential(*list(net.children())[:-1]).eval().to(device)

  def backbone(x):
    with torch.no_grad():
      return body(torch.from_numpy(x).to(device)).flatten(1).cpu().numpy()
  return backbone
