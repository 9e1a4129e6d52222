r"""ResNet-101 features of CUB images for experiments/cub.py, on a connected machine.

    pip install torch torchvision          # not dependencies of mmvae_jax
    python experiments/extract_cub_features.py --data_root=data/cub --out=data/cub/resnet101

reads the official layout data/cub/{train,test}/<class folder>/<image> and writes
<out>/train.npy and <out>/test.npy ((N, 2048) float32) and <out>/{train,test}_files.txt (the image
order: sorted class folders, then sorted file names, as torchvision's ImageFolder). The captions
file of a split must list the 10 captions of each image in this same order (caption i ↔ image
i // 10).

The preprocessing is the official one (mmvae_jax.data.cub_features).
"""
from __future__ import annotations

import os

from absl import app, flags

from mmvae_jax import cli
from mmvae_jax.data.cub_features import extract, list_images, resnet101_backbone

PROG = "extract_cub_features.py"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the script's flags."""
  flags.DEFINE_string("data_root", None, "Folder with train/ and test/, each holding one folder "
                      "of images per class.")
  flags.DEFINE_string("out", None, "Output folder for train.npy, test.npy and *_files.txt.")
  flags.DEFINE_list("splits", ["train", "test"], "Sub-folders of --data_root to process.")
  flags.DEFINE_integer("batch_size", 256, "Images per forward pass (official: 256).")
  flags.DEFINE_string("device", "cpu", "torch device (official: cpu).")

def _fail(msg: str, code: int = 2):
  cli.fail(PROG, msg, code)


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
