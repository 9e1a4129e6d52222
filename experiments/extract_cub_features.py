r"""ResNet-101 features of CUB images for experiments/cub.py, on a connected machine.

    pip install torch torchvision          # not dependencies of mmvae_jax
    python experiments/extract_cub_features.py --data_root=data/cub --out=data/cub/resnet101

reads the official layout data/cub/{train,test}/<class folder>/<image> and writes
<out>/train.npy and <out>/test.npy ((N, 2048) float32) and <out>/{train,test}_files.txt (the image
order: sorted class folders, then sorted file names, as torchvision's ImageFolder). The captions
file of a split must list the 10 captions of each image in this same order (caption i ↔ image
i // 10).

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

from absl import app, flags

from mmvae_jax import cli

PROG = "extract_cub_features.py"
SHORTER_SIDE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the script's flags (only when it runs as a program, so that importing it for its
  functions defines no global flags)."""
  flags.DEFINE_string("data_root", None, "Folder with train/ and test/, each holding one folder "
                      "of images per class.")
  flags.DEFINE_string("out", None, "Output folder for train.npy, test.npy and *_files.txt.")
  flags.DEFINE_list("splits", ["train", "test"], "Sub-folders of --data_root to process.")
  flags.DEFINE_integer("batch_size", 256, "Images per forward pass (official: 256).")
  flags.DEFINE_string("device", "cpu", "torch device (official: cpu).")

def _fail(msg: str, code: int = 2):
  cli.fail(PROG, msg, code)


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.data_root or not FLAGS.out:
    _fail("--data_root and --out are required")
  if FLAGS.batch_size < 1:
    _fail(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  import numpy as np
  try:
    lists = {s: list_images(os.path.join(FLAGS.data_root, s)) for s in FLAGS.splits}
    backbone = resnet101_backbone(FLAGS.device)
  except (FileNotFoundError, ImportError) as e:
    _fail(str(e))
  os.makedirs(FLAGS.out, exist_ok=True)
  for split, files in lists.items():
    feats = extract(files, backbone, FLAGS.batch_size)
    np.save(os.path.join(FLAGS.out, f"{split}.npy"), feats)
    with open(os.path.join(FLAGS.out, f"{split}_files.txt"), "w") as f:
      f.write("\n".join(os.path.relpath(p, FLAGS.data_root) for p in files) + "\n")
    print(f"{split}: {feats.shape[0]} images -> {os.path.join(FLAGS.out, split + '.npy')}")


if __name__ == "__main__":
  define_flags()

  app.run(main, flags_parser=cli.flags_parser(PROG))
