r"""Head-to-head: our training step vs the official PyTorch code's, interleaved; prints JSON.

    python benchmarks/compare_official.py --k=1 --json

The official code's step is reproduced by the independent PyTorch port in
``tests/official_torch.py`` (the released MMVAE, ``m_dreg_looser`` with its inert gradient hook,
Adam with AMSGrad, lr 1e-3); ours is ``benchmarks/train_step.py``'s step (DReG, looser bound).
Both run on random data of the right shapes, batch --batch_size, K = --k.

--official picks which builds of the official side run (comma-separated, each its own worker):
``as_is`` (the C library's malloc, as the official code runs by default), ``jemalloc``
(jemalloc preloaded and told never to give memory back, ``MALLOC_CONF`` =
``retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1``: the "allocator-tuned" official code of the
README's performance table; needs libjemalloc, e.g. Debian's ``libjemalloc2``) and ``glibc_kept`` (glibc
malloc with `mmvae_jax.hostmem.keep_freed_memory`'s settings, the same the JAX side uses at
small K).

Why interleaved: this machine's speed drifts by 10-20% within hours, so step times taken at
different times of day cannot be compared. Each side runs in its own worker process (own thread
pools, own allocator settings), started once; the parent then alternates --rounds blocks of
--steps_per_round steps between them, so both see the same minutes. The first step of every
block is discarded (thread pools waking up). The JSON gives each side's median, 25th percentile
and minimum step time, examples/s at the median and the worker's peak RSS, and ``speedup`` =
that official median / ours for each official build.

Requires torch (CPU build); --torch_threads defaults to the number of CPUs JAX sees.
"""
from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL_BUILDS = ("as_is", "jemalloc", "glibc_kept")
# jemalloc that never returns memory to the kernel: freed pages stay mapped and are reused.
JEMALLOC_NEVER_RELEASE = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def _jax_worker(args) -> tuple:
  from mmvae_jax import hostmem
  huge_pages = hostmem.restart_with_huge_pages(args.huge_pages)  # may re-execute this worker
  hostmem.apply_policy(args.retain_host_memory, 2 * args.k * args.batch_size)
  import jax
  import numpy as np

  from mmvae_jax import model as model_lib, parallel, train

  model = model_lib.mnist_svhn(20)
  config = train.TrainConfig(k=args.k, batch_size=args.batch_size, estimator="dreg", looser=True)
  mesh = parallel.data_mesh()
  config.validate(mesh.devices.size)
  opt = train.make_optimizer(config)
  state = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  step_fn = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({
      "x": tuple(rng.uniform(size=(args.batch_size,) + m.data_shape).astype(np.float32)
                 for m in model.modalities),
      "mask": np.ones((args.batch_size,), np.float32)}, mesh)
  holder = {"state": state, "i": 0}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch, train.step_key(0, holder["i"]))
    holder["i"] += 1
    jax.block_until_ready(metrics)

  info = {"huge_pages": huge_pages, "jax": jax.__version__, "devices": jax.device_count(),
          "backend": jax.default_backend()}
  return step, info


def _torch_worker(args) -> tuple:
  if args.worker == "torch_glibc_kept":
    from mmvae_jax import hostmem
    if not hostmem.keep_freed_memory():
      raise SystemExit("compare_official: --official=glibc_kept needs glibc malloc")
  import torch
  sys.path.insert(0, str(REPO / "tests"))
  import official_torch

  torch.manual_seed(0)
  torch.set_num_threads(args.torch_threads)
  model = official_torch.MMVAE(20).float()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
  xs = [torch.rand(args.batch_size, 1, 28, 28), torch.rand(args.batch_size, 3, 32, 32)]

  def step():
    opt.zero_grad()
    loss = -official_torch.m_dreg_looser(model, xs, args.k)
    loss.backward()
    opt.step()

  info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
  if args.worker == "torch_jemalloc":
    info["malloc_conf"] = os.environ.get("MALLOC_CONF")
  return step, info


def _serve(args) -> None:
  """Worker loop: build the step, warm it up, then time blocks of steps on request."""
  step, info = (_jax_worker if args.worker == "jax" else _torch_worker)(args)
  t0 = time.perf_counter()
  step()
  info["first_step_s"] = round(time.perf_counter() - t0, 3)
  for _ in range(args.warmup):
    step()
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    times = []
    for _ in range(int(line)):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_rss_mb": round(peak_mb, 1)}), flush=True)


def _summary(times, batch_size) -> dict:
  import numpy as np
  t = np.asarray(times)
  median = float(np.median(t))
  return {"steps": len(t), "step_s_median": round(median, 4),
          "step_s_p25": round(float(np.percentile(t, 25)), 4),
          "step_s_min": round(float(t.min()), 4),
          "examples_per_s": round(batch_size / median, 1)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--k", type=int, default=1, help="samples per expert")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=6, help="blocks per side, alternating")
  parser.add_argument("--steps_per_round", type=int, default=6,
                      help="steps per block (the first is discarded)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  parser.add_argument("--retain_host_memory", default="auto", choices=["auto", "always", "never"],
                      help="our side's host-memory policy, as in the training scripts")
  parser.add_argument("--huge_pages", default="auto", choices=["auto", "never"],
                      help="our side's huge-page policy, as in the training scripts")
  parser.add_argument("--official", default="as_is",
                      help="official builds to time, comma-separated: " + ", ".join(OFFICIAL_BUILDS)
                      + " (module docstring)")
  parser.add_argument("--worker", choices=["jax"] + [f"torch_{b}" for b in OFFICIAL_BUILDS],
                      help=argparse.SUPPRESS)
  parser.add_argument("--json", action="store_true", help="print only the JSON object")
  args = parser.parse_args(argv)
  if min(args.k, args.batch_size, args.rounds, args.torch_threads) < 1 or args.steps_per_round < 2:
    parser.error("--k, --batch_size, --rounds, --torch_threads must be >= 1 and "
                 "--steps_per_round >= 2")
  if args.worker:
    _serve(args)
    return {}
  builds = [b for b in args.official.split(",") if b]
  unknown = sorted(set(builds) - set(OFFICIAL_BUILDS))
  if unknown or not builds:
    parser.error(f"--official: unknown build(s) {unknown}; expected some of {OFFICIAL_BUILDS}")
  # A soname is enough for LD_PRELOAD: it is searched like a dependency.
  jemalloc = ctypes.util.find_library("jemalloc") if "jemalloc" in builds else None
  if "jemalloc" in builds and not jemalloc:
    parser.error("--official=jemalloc: libjemalloc not found (Debian: apt-get install "
                 "libjemalloc2)")

  forwarded = [f"--k={args.k}", f"--batch_size={args.batch_size}", f"--warmup={args.warmup}",
               f"--torch_threads={args.torch_threads}",
               f"--retain_host_memory={args.retain_host_memory}",
               f"--huge_pages={args.huge_pages}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  sides = {"ours": ("jax", env)}
  for build in builds:
    name = "official" if build == "as_is" else f"official_{build}"
    sides[name] = (f"torch_{build}", dict(env, LD_PRELOAD=jemalloc,
                                          MALLOC_CONF=JEMALLOC_NEVER_RELEASE)
                   if build == "jemalloc" else env)
  workers, infos = {}, {}
  try:
    for side, (worker, worker_env) in sides.items():  # one after the other: clean compile times
      proc = subprocess.Popen(
          [sys.executable, __file__, f"--worker={worker}"] + forwarded, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env)
      workers[side] = proc
      line = proc.stdout.readline()
      if not line:
        raise SystemExit(f"compare_official: the {side} worker exited with status "
                         f"{proc.wait()} (is {'jax' if side == 'ours' else 'torch'} installed?)")
      infos[side] = json.loads(line)
    times = {side: [] for side in workers}
    for _ in range(args.rounds):
      for side, proc in workers.items():
        proc.stdin.write(f"{args.steps_per_round}\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        times[side] += reply["times"][1:]
        infos[side]["peak_rss_mb"] = reply["peak_rss_mb"]
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()
  summaries = {side: {**_summary(times[side], args.batch_size), **infos[side]}
               for side in workers}
  ours_median = summaries["ours"]["step_s_median"]
  result = {
      "benchmark": "compare_official", "model": "mnist_svhn", "k": args.k,
      "batch_size": args.batch_size, "rounds": args.rounds,
      "steps_per_round": args.steps_per_round, **summaries,
      "speedup": {side: round(summaries[side]["step_s_median"] / ours_median, 3)
                  for side in summaries if side != "ours"},
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }
  print(json.dumps(result) if args.json else json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
