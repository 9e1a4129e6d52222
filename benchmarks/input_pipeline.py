"""Input pipeline throughput: paired MNIST + 32x32x3 batches delivered to the devices.

Measures pairs/s through `mmvae_jax.data.batches` (host gather, uint8 -> float32, transfer to a
sharded global jax.Array, background prefetch), calling `block_until_ready` on every batch,
over --num_batches batches after --warmup batches. Uses mnist.npz and usps_colour.npz (an
SVHN-shaped stand-in, see experiments/make_usps_colour.py) from --data_dir when both are there
(default: the folder shared/data beside the repository), else random uint8 arrays of the same
shapes as MNIST and SVHN train; the JSON says which.

  python benchmarks/input_pipeline.py --json
  python benchmarks/input_pipeline.py --cpu_devices=4 --json   # 4 fake CPU devices
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", action="store_true", help="print one JSON object (else a text line)")
  p.add_argument("--batch_size", type=int, default=128, help="global batch size")
  p.add_argument("--num_batches", type=int, default=400, help="timed batches (>= 200)")
  p.add_argument("--warmup", type=int, default=20, help="untimed batches first")
  p.add_argument("--prefetch", type=int, default=2, help="prefetch queue size (0: synchronous)")
  p.add_argument("--partners", type=int, default=30, help="pairing partners per instance")
  p.add_argument("--data_dir", default=str(DEFAULT_DATA),
                 help="folder with mnist.npz and usps_colour.npz (random arrays if absent)")
  p.add_argument("--random", action="store_true", help="use random uint8 arrays even if data exist")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="fake this many CPU devices (jax_num_cpu_devices; 0: leave as is)")
  return p.parse_args(argv)


def make_sources(data_dir: str, force_random: bool):
  """Two sources ((N,28,28,1) and (N,32,32,3) uint8) and a description of where they came from."""
  from mmvae_jax.data import load_source, source_from_arrays  # pylint: disable=import-outside-toplevel
  mnist, colour = os.path.join(data_dir, "mnist.npz"), os.path.join(data_dir, "usps_colour.npz")
  if not force_random and os.path.isfile(mnist) and os.path.isfile(colour):
    return ([load_source(mnist, "train"), load_source(colour, "train")],
            "real: mnist.npz train + usps_colour.npz train (SVHN-shaped stand-in)")
  rng = np.random.default_rng(0)
  srcs = [source_from_arrays(rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
                             rng.integers(0, 10, n), name)
          for n, shape, name in ((60000, (28, 28, 1), "random_mnist"),
                                 (73257, (32, 32, 3), "random_svhn"))]
  return srcs, "random uint8 arrays shaped like MNIST train (60000,28,28,1) and SVHN train (73257,32,32,3)"


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from mmvae_jax import parallel  # pylint: disable=import-outside-toplevel
  from mmvae_jax.data import PairedDataset, batches  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  sources, data = make_sources(args.data_dir, args.random)
  dataset = PairedDataset(sources, partners=args.partners, seed=0)
  load_s = time.perf_counter() - t0
  mesh = parallel.data_mesh()
  need = args.warmup + args.num_batches
  epoch, seen, timed, start = 0, 0, 0, None
  while timed < args.num_batches:
    with batches(dataset, args.batch_size, mesh, seed=0, epoch=epoch, prefetch=args.prefetch,
                 drop_remainder=True) as it:
      for batch in it:
        jax.block_until_ready(batch)
        seen += 1
        if seen == args.warmup:
          start = time.perf_counter()
        elif seen > args.warmup:
          timed += 1
          if seen == need:
            break
    epoch += 1
  elapsed = time.perf_counter() - start
  result = {
      "benchmark": "input_pipeline",
      "pairs_per_s": round(timed * args.batch_size / elapsed, 1),
      "batches_per_s": round(timed / elapsed, 1),
      "timed_batches": timed,
      "warmup_batches": args.warmup,
      "global_batch_size": args.batch_size,
      "shapes": [list(s.image_shape) for s in sources],
      "storage_dtypes": [str(s.images.dtype) for s in sources],
      "pairs": len(dataset),
      "data": data,
      "prefetch": args.prefetch,
      "devices": len(mesh.devices.flat),
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "host": platform.machine(),
      "load_and_pair_s": round(load_s, 2),
  }
  if args.json:
    print(json.dumps(result))
  else:
    print(f"{result['pairs_per_s']:.0f} pairs/s ({result['batches_per_s']:.0f} batches/s of "
          f"{args.batch_size}) on {result['devices']} {result['platform']} device(s); {data}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
