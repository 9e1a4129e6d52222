r"""Builds ``usps_colour.npz``, an SVHN-shaped colour stand-in made from real USPS digits.

    python experiments/make_usps_colour.py --usps=usps.npz --out=usps_colour.npz [--seed=0]

Input: ``usps.npz`` with ``x_train`` (7291, 16, 16) float32 in [-1, 1] (background -1),
``y_train``, ``x_test`` (2007, 16, 16) and ``y_test``. Output: ``x_train`` (N, 32, 32, 3) uint8,
``y_train`` int64, ``x_test`` and ``y_test`` likewise: the shape, dtype and layout of tfds
``svhn_cropped``, so the file can be passed wherever SVHN is expected (``--svhn=usps_colour.npz``).
Labels and their order are those of the input.

Recipe, per image (numpy and Pillow only):

* the USPS digit is resized (bilinear) to a random 22-26 px square and placed near the centre of
  a 32×32 canvas, with a jitter of up to 2 px;
* partial distractor digits (other random USPS digits of the same split, also 22-26 px) are cut
  at the left and/or right edge, so that only a 3-8 px strip of each shows, as the neighbouring
  digits of an SVHN crop;
* random foreground and background colours (resampled until they differ clearly), a linear
  brightness gradient in a random direction, a slight Gaussian blur and Gaussian pixel noise.

This produces a stand-in with the same recipe as the shipped offline ``usps_colour.npz`` (the
file behind docs/results.md), **not a byte-identical copy of it**: the random draws differ. It is
not SVHN: numbers measured on it (coherence, likelihoods, classifier accuracies) are not SVHN
numbers and cannot be compared with the paper's.

The output is written to a temporary file next to ``--out`` and renamed into place, so a failed
or interrupted run never leaves a half-written file. Errors print one line
``make_usps_colour.py: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image, ImageFilter

PROG = "make_usps_colour.py"
KEYS = ("x_train", "y_train", "x_test", "y_test")
SIZE = 32                  # output canvas: SIZE × SIZE × 3
DIGIT_PX = (22, 26)        # digit side in pixels, inclusive range
JITTER = 2                 # max offset of the main digit from the centre
DISTRACTOR_P = 0.6         # probability of a distractor at each of the two edges
VISIBLE_PX = (3, 8)        # visible strip of a distractor, inclusive range
MIN_COLOUR_DIST = 160.0    # minimum L1 distance between foreground and background (0..765)
GRADIENT = (0.1, 0.35)     # brightness gradient strength: factor 1 ± g across the image
BLUR_RADIUS = (0.3, 0.9)   # Gaussian blur radius in pixels
NOISE_STD = (2.0, 7.0)     # Gaussian noise std in grey levels


class UsageError(Exception):
  """A problem with the arguments or the input file: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):  # one line, no usage block
    raise UsageError(message)


def _resized(digit: np.ndarray, side: int) -> np.ndarray:
  """(H, W) intensities in [0, 1] -> (side, side) float32 in [0, 1] (bilinear)."""
  img = Image.fromarray(np.ascontiguousarray(digit, dtype=np.float32))  # mode "F"
  return np.clip(np.asarray(img.resize((side, side), Image.BILINEAR), np.float32), 0.0, 1.0)


def _paste_max(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
  """canvas = max(canvas, patch placed at (top, left)), clipped to the canvas."""
  h, w = patch.shape
  t0, l0 = max(top, 0), max(left, 0)
  t1, l1 = min(top + h, canvas.shape[0]), min(left + w, canvas.shape[1])
  if t0 >= t1 or l0 >= l1:
    return
  region = patch[t0 - top:t1 - top, l0 - left:l1 - left]
  np.maximum(canvas[t0:t1, l0:l1], region, out=canvas[t0:t1, l0:l1])


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Foreground and background RGB colours (float) that differ by at least MIN_COLOUR_DIST."""
  while True:
    fg, bg = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    if np.abs(fg - bg).sum() >= MIN_COLOUR_DIST:
      return fg, bg


def _render(digits: np.ndarray, i: int, rng: np.random.Generator) -> np.ndarray:
  """One 32×32×3 uint8 image of digit i of `digits` ((N, H, W) intensities in [0, 1])."""
  n = len(digits)
  mask = np.zeros((SIZE, SIZE), np.float32)
  side = int(rng.integers(DIGIT_PX[0], DIGIT_PX[1] + 1))
  centre = (SIZE - side) // 2
  top = int(np.clip(centre + rng.integers(-JITTER, JITTER + 1), 0, SIZE - side))
  left = int(np.clip(centre + rng.integers(-JITTER, JITTER + 1), 0, SIZE - side))
  _paste_max(mask, _resized(digits[i], side), top, left)

  for edge in ("left", "right"):
    if n < 2 or rng.random() >= DISTRACTOR_P:
      continue
    j = int(rng.integers(0, n - 1))
    j += int(j >= i)  # any digit but this one
    side2 = int(rng.integers(DIGIT_PX[0], DIGIT_PX[1] + 1))
    visible = int(rng.integers(VISIBLE_PX[0], VISIBLE_PX[1] + 1))
    left2 = visible - side2 if edge == "left" else SIZE - visible
    top2 = (SIZE - side2) // 2 + int(rng.integers(-JITTER - 1, JITTER + 2))
    _paste_max(mask, _resized(digits[j], side2), top2, left2)

  fg, bg = _colours(rng)
  image = bg * (1.0 - mask[..., None]) + fg * mask[..., None]

  angle = rng.uniform(0.0, 2.0 * np.pi)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) * 2.0 - 1.0
  ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / np.sqrt(2.0)  # in [-1, 1]
  image = image * (1.0 + rng.uniform(*GRADIENT) * ramp)[..., None]

  pil = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))  # mode "RGB"
  image = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS))), np.float32)
  image = image + rng.normal(0.0, rng.uniform(*NOISE_STD), size=image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_split(x: np.ndarray, seed: int, split: int) -> np.ndarray:
  """(N, H, W) USPS digits in [-1, 1] -> (N, 32, 32, 3) uint8; deterministic in (seed, split)."""
  digits = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  rng = np.random.default_rng([seed, split])
  out = np.empty((len(digits), SIZE, SIZE, 3), np.uint8)
  for i in range(len(digits)):
    out[i] = _render(digits, i, rng)
  return out


def load_usps(path: str) -> dict[str, np.ndarray]:
  """The four arrays of a usps.npz, checked; raises UsageError naming the problem."""
  if not os.path.isfile(path):
    raise UsageError(f"--usps: no such file: {path}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [k for k in KEYS if k not in npz.files]
      if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)} "
                         f"(has: {', '.join(npz.files) or 'none'})")
      arrays = {k: np.asarray(npz[k]) for k in KEYS}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UsageError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim != 3 or min(x.shape[1:], default=0) < 2:
      raise UsageError(f"{path}: x_{split} must be (N, H, W) grey images, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
      raise UsageError(f"{path}: x_{split} must be numeric, got dtype {x.dtype}")
    if x.size and (x.min() < -1.0 or x.max() > 1.0):
      raise UsageError(f"{path}: x_{split} must lie in [-1, 1] (USPS convention), got "
                       f"[{x.min()}, {x.max()}]")
    if y.ndim != 1 or len(y) != len(x):
      raise UsageError(f"{path}: y_{split} must be 1-D with {len(x)} labels, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.number)
                   or not np.array_equal(y, np.round(y))):
      raise UsageError(f"{path}: y_{split} must hold integer labels")
  return arrays


def _out_folder(path: str) -> str:
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UsageError(f"--out: no such folder: {folder}")
  return folder


def write_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
  """np.savez_compressed into a temporary file beside `path`, then os.replace."""
  folder = _out_folder(path)
  fd, tmp = tempfile.mkstemp(prefix=".make_usps_colour.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def main(argv=None) -> int:
  parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--usps", required=True, help="input usps.npz (x/y_train, x/y_test)")
  parser.add_argument("--out", required=True, help="output .npz path (e.g. usps_colour.npz)")
  parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
  args = None
  try:
    args = parser.parse_args(argv)
    _out_folder(args.out)  # fail before the work, not after it
    usps = load_usps(args.usps)
    out = {}
    for split_id, split in enumerate(("train", "test")):
      out[f"x_{split}"] = make_split(usps[f"x_{split}"], args.seed, split_id)
      out[f"y_{split}"] = np.asarray(usps[f"y_{split}"]).astype(np.int64)
    write_atomic(args.out, out)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    where = e.filename or (args.out if args else "")
    print(f"{PROG}: error: {e.strerror or e} ({where})", file=sys.stderr)
    return 2
  print(f"{PROG}: wrote {args.out}: x_train {out['x_train'].shape}, x_test {out['x_test'].shape} "
        f"(uint8), seed {args.seed}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
