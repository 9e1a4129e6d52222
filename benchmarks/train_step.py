r"""Times the MNIST-SVHN training step on random data of the right shapes; prints JSON.

    python benchmarks/train_step.py --k=30 --batch_size=128 --estimator=dreg --json

Reports compile time (first call: trace + compile + run), the median, min, max and
interquartile range of the step time over --steps steps, examples/s at the median, and the
process's peak resident memory. For a comparison with the released official code, time both
in the same minutes with benchmarks/compare_official.py (machines drift and differ; figures
and where the time goes: docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--k", type=int, default=30, help="samples per expert (1, 10, 30, ...)")
  parser.add_argument("--batch_size", type=int, default=128, help="global batch")
  parser.add_argument("--estimator", default="dreg", choices=["dreg", "legacy", "iwae", "dreg_moe"])
  parser.add_argument("--looser", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--steps", type=int, default=20, help="timed steps (>= 20)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  parser.add_argument("--decoder_impl", default="auto", choices=["auto", "matmul", "conv"])
  parser.add_argument("--retain_host_memory", default="auto", choices=["auto", "always", "never"],
                      help="keep freed host memory for reuse, as the training scripts do "
                      "(mmvae_jax.hostmem; auto: when a step decodes at most 512 latents)")
  parser.add_argument("--huge_pages", default="auto", choices=["auto", "never"],
                      help="restart with glibc malloc asking for transparent huge pages, as the "
                      "training scripts do (mmvae_jax.hostmem.restart_with_huge_pages)")
  parser.add_argument("--json", action="store_true", help="print only the JSON object")
  args = parser.parse_args(argv)
  if args.k < 1 or args.batch_size < 1 or args.steps < 1:
    parser.error("--k, --batch_size and --steps must be >= 1")

  from mmvae_jax import hostmem
  huge_pages = hostmem.restart_with_huge_pages(args.huge_pages)  # may re-execute this program
  # Before JAX starts its threads; two modalities decode 2·K·B latents per step.
  retained = hostmem.apply_policy(args.retain_host_memory, 2 * args.k * args.batch_size)

  import jax
  import numpy as np

  from mmvae_jax import model as model_lib, parallel, train

  model = model_lib.mnist_svhn(20, decoder_impl=args.decoder_impl)
  config = train.TrainConfig(k=args.k, batch_size=args.batch_size, estimator=args.estimator,
                             looser=args.looser)
  mesh = parallel.data_mesh()
  config.validate(mesh.devices.size)
  opt = train.make_optimizer(config)
  state = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  step = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({
      "x": tuple(rng.uniform(size=(args.batch_size,) + m.data_shape).astype(np.float32)
                 for m in model.modalities),
      "mask": np.ones((args.batch_size,), np.float32)}, mesh)

  t0 = time.perf_counter()
  state, metrics = step(state, batch, train.step_key(0, 0))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    state, metrics = step(state, batch, train.step_key(0, 1 + i))
  jax.block_until_ready(metrics)
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, train.step_key(0, 100 + i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  times = np.asarray(times)
  median = float(np.median(times))
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  result = {
      "benchmark": "train_step", "model": "mnist_svhn", "k": args.k,
      "batch_size": args.batch_size, "estimator": args.estimator, "looser": args.looser,
      "decoder_impl": args.decoder_impl, "retain_host_memory": retained, "huge_pages": huge_pages,
      "steps": args.steps,
      "compile_s": round(compile_s, 3),
      "step_s_median": round(median, 4), "step_s_min": round(float(times.min()), 4),
      "step_s_max": round(float(times.max()), 4),
      "step_s_iqr": round(float(np.percentile(times, 75) - np.percentile(times, 25)), 4),
      "examples_per_s": round(args.batch_size / median, 1),
      "peak_rss_mb": round(peak_kb / 1024, 1),
      "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "host": platform.machine(),
      "jax": jax.__version__,
  }
  # On a GPU or TPU, also the device's peak memory in use (the CPU backend keeps no statistics).
  stats = jax.local_devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    result["peak_device_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  print(json.dumps(result) if args.json else json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
