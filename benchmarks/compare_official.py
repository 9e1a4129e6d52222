r"""Head-to-head: our training step vs the released official code's, interleaved; prints JSON.

    git clone https://github.com/iffsid/mmvae ../iffsid-mmvae
    python benchmarks/compare_official.py --official_src=../iffsid-mmvae/src --k=30 --json

The official side is the released MMVAE code itself (github.com/iffsid/mmvae, its ``src``
folder, GPL-3.0: nothing of it is copied here, the benchmark imports it from
--official_src): its ``MNIST_SVHN`` model (latent_dim 20, one hidden layer, learned prior,
llik_scaling 0, the options of the paper's MNIST-SVHN run), its ``m_dreg_looser`` objective
and its training step as ``main.py`` runs it (``zero_grad``, ``-objective(...)``,
``backward``, ``step`` of ``torch.optim.Adam(lr=1e-3, amsgrad=True)``, ``loss.item()``).
Modules the training step never uses but the official files import at the top (its ``vis``
and ``datasets`` modules, and torchvision/torchnet when they are not installed) are replaced
by stubs that raise if called; ``models/__init__.py`` (which imports the CUB models too) is
bypassed. Ours is ``benchmarks/train_step.py``'s step (DReG, looser bound, B = --batch_size,
learned prior). Both run on random data of the right shapes.

--official picks the builds of the official side (comma-separated, each its own worker):
``as_is`` (the C library's malloc, as the official code runs by default), ``jemalloc``
(jemalloc preloaded and told never to give memory back, ``MALLOC_CONF`` =
``retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1``: the "allocator-tuned" official code;
needs libjemalloc, e.g. Debian's ``libjemalloc2``) and ``glibc_kept`` (glibc malloc with
`mmvae_jax.hostmem.keep_freed_memory`'s settings). ``auto`` (default): ``as_is`` plus
``jemalloc`` when libjemalloc is found. On a machine with CUDA the official side runs on the
GPU (--torch_device=auto) and ours on JAX's default backend.

Why interleaved: a machine's speed drifts by 10-20% within hours (and more when shared), so
step times taken at different times cannot be compared. Each side runs in its own worker
process (own thread pools, own allocator), started once; the parent then alternates --rounds
blocks of --steps_per_round steps between them, so all see the same minutes. The first step of
every block is discarded (thread pools waking up). The JSON gives each side's median, 25th
percentile and minimum step time, examples/s at the median, the worker's peak RSS (and peak
device memory on a GPU), the median process CPU time per step (all threads; on a busy machine
a measure of work that waiting for the CPU does not inflate, though spinning threads do), and
``speedup`` = that official median / ours for each build (``speedup_min``: the ratio of the
fastest steps, the least disturbed by other jobs). On a machine shared with other jobs, a
multi-threaded step suffers more than its share (a thread that loses its core stalls the
others at the next barrier): ``--pin=0`` runs every side on one core with one thread, which
is closer to a fair comparison there; the JSON records the load average.

Roofline (--roofline, default on): between rounds our worker also times XLA's float32 matmul
on the SVHN decoder's dot shapes (`matmul_shapes`: the forward, input-gradient and
weight-gradient products of its layers at the decoder's chunk of 32 latents, and one
1024-cube for reference), in the same process as our step. ``roofline`` reports the
step's FLOPs (XLA's cost analysis of the step's HLO, see `step_gflop`), its GFLOP/s at the median step time, the decoder-shape matmul rate (total FLOPs
over total time of one pass over the shapes, median over rounds) and the fraction of it the
step reaches. (With --decoder_impl=conv, the default on GPU, the decoder runs as XLA
convolutions, and the rate is a reference for the device rather than for these products.)

Requires torch; --torch_threads defaults to the number of CPUs.
"""
from __future__ import annotations

import argparse
import ctypes.util
import importlib.util
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL_BUILDS = ("as_is", "jemalloc", "glibc_kept")
# jemalloc that never returns memory to the kernel: freed pages stay mapped and are reused.
JEMALLOC_NEVER_RELEASE = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# A large square product timed beside the decoder's shapes (not counted in their rate).
REFERENCE_MATMUL = (1024, 1024, 1024)
# Files of the official src/ the benchmark needs.
OFFICIAL_FILES = ("objectives.py", "utils.py", "models/mmvae.py", "models/mmvae_mnist_svhn.py",
                  "models/vae.py", "models/vae_mnist.py", "models/vae_svhn.py")
# Third-party modules the official files import but the training step never uses.
OPTIONAL_IMPORTS = ("torchvision", "torchvision.utils", "torchvision.datasets",
                    "torchvision.transforms", "torchvision.models", "torchnet",
                    "torchnet.dataset")


def matmul_shapes(chunk: int = 32, latent_dim: int = 20, width: int = 32) -> list:
  """(M, K, N) of the SVHN decoder's dots on one chunk of latents, forward and backward.

  Layer 1 (1×1 → 4×4) is (chunk, D) · (D, 16·4w); layers 2-4 are col2im matmuls
  (chunk·H·W, C_in) · (C_in, 16·C_out) on an H×W input. Their input gradients are
  (chunk·H·W, 16·C_out) · (16·C_out, C_in) and weight gradients (C_in, chunk·H·W) ·
  (chunk·H·W, 16·C_out).
  """
  shapes = [(chunk, latent_dim, 16 * 4 * width)]
  for (h, c_in, c_out) in ((4, 4 * width, 2 * width), (8, 2 * width, width), (16, width, 3)):
    rows = chunk * h * h
    shapes += [(rows, c_in, 16 * c_out), (rows, 16 * c_out, c_in), (c_in, rows, 16 * c_out)]
  return shapes


def _matmul_rate(shapes, reps: int = 5) -> dict:
  """GFLOP/s of XLA's float32 matmul on `shapes` (jitted one by one, best of `reps` calls)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  fn = jax.jit(jnp.dot)
  total_flops, total_s, per_shape = 0.0, 0.0, []
  for m, k, n in shapes:
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    fn(a, b).block_until_ready()
    # Enough calls per timing for ~2 ms (timer and dispatch noise).
    calls = max(1, int(2e-3 * 2e11 / (2 * m * k * n)))
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fn(a, b)
      out.block_until_ready()
      best = min(best, (time.perf_counter() - t0) / calls)
    flops = 2.0 * m * k * n
    per_shape.append({"mkn": [m, k, n], "gflops": round(flops / best / 1e9, 1)})
    if (m, k, n) != REFERENCE_MATMUL:
      total_flops += flops
      total_s += best
  return {"decoder_gflops": total_flops / total_s / 1e9, "per_shape": per_shape}


def step_gflop(args, batch) -> float | None:
  """GFLOP our training step executes (XLA's cost analysis of its HLO), or None.

  XLA counts a loop body once, not once per iteration, so the step is lowered (not
  compiled) a second time with the SVHN decoder in one chunk (``DEFAULT_CHUNK_SIZE = 0``:
  the same products, including the layers its backward pass recomputes, without the loop).
  """
  import jax

  from mmvae_jax import model as model_lib, networks, parallel, train
  saved = networks.DEFAULT_CHUNK_SIZE
  networks.DEFAULT_CHUNK_SIZE = 0
  try:
    model = model_lib.mnist_svhn(20, decoder_impl=args.decoder_impl)
    config = train.TrainConfig(k=args.k, batch_size=args.batch_size, estimator="dreg",
                               looser=True)
    mesh = parallel.data_mesh()
    opt = train.make_optimizer(config)
    state = jax.eval_shape(lambda: train.init_state(model, opt, jax.random.key(0)))
    step_fn = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
    cost = step_fn.lower(state, batch, train.step_key(0, 0)).cost_analysis()
  finally:
    networks.DEFAULT_CHUNK_SIZE = saved
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get("flops")
  return round(float(flops) / 1e9, 2) if flops else None


def _jax_worker(args) -> tuple:
  from mmvae_jax import hostmem
  huge_pages = hostmem.restart_with_huge_pages(args.huge_pages)  # may re-execute this worker
  hostmem.apply_policy(args.retain_host_memory, 2 * args.k * args.batch_size)
  import jax
  import numpy as np

  from mmvae_jax import model as model_lib, parallel, train

  model = model_lib.mnist_svhn(20, decoder_impl=args.decoder_impl)
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
  info = {"huge_pages": huge_pages, "jax": jax.__version__, "devices": jax.device_count(),
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "decoder_impl": args.decoder_impl}
  if args.roofline:
    info["step_gflop"] = step_gflop(args, batch)

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch, train.step_key(0, holder["i"]))
    holder["i"] += 1
    jax.block_until_ready(metrics)

  def extra():
    out = {}
    stats = jax.local_devices()[0].memory_stats() if args.device_memory else None
    if stats and "peak_bytes_in_use" in stats:
      out["peak_device_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return out

  def roofline():
    return _matmul_rate(matmul_shapes() + [REFERENCE_MATMUL])

  return step, info, extra, roofline


class _Stub(types.ModuleType):
  """A module whose every attribute is a function raising: imported, never used."""

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)

    def unused(*_, **__):
      raise RuntimeError(f"compare_official: {self.__name__}.{name} is stubbed out "
                         "(not needed by the training step)")
    return unused


def import_official(src: pathlib.Path) -> tuple:
  """(MNIST_SVHN class, objectives module) of the released code at `src`, with stubs.

  The official ``vis`` and ``datasets`` modules (plots, UMAP, NLTK, CUB) and absent
  torchvision/torchnet modules are stubbed; the ``models`` package is created without running
  its ``__init__`` (which imports the CUB models).
  """
  for name in ("vis", "datasets"):
    sys.modules[name] = _Stub(name)
  absent = {name.split(".")[0] for name in OPTIONAL_IMPORTS
            if importlib.util.find_spec(name.split(".")[0]) is None}
  for name in OPTIONAL_IMPORTS:  # parents before children
    top = name.split(".")[0]
    if top in absent:
      sys.modules[name] = _Stub(name)
      if "." in name:
        setattr(sys.modules[top], name.split(".", 1)[1], sys.modules[name])
  package = types.ModuleType("models")
  package.__path__ = [str(src / "models")]
  sys.modules["models"] = package
  sys.path.insert(0, str(src))
  import objectives  # noqa: E402  (the official module)
  from models.mmvae_mnist_svhn import MNIST_SVHN  # noqa: E402
  return MNIST_SVHN, objectives


def _torch_worker(args) -> tuple:
  if args.worker == "torch_glibc_kept":
    from mmvae_jax import hostmem
    if not hostmem.keep_freed_memory():
      raise SystemExit("compare_official: --official=glibc_kept needs glibc malloc")
  import torch

  mnist_svhn, objectives = import_official(pathlib.Path(args.official_src))
  device = args.torch_device
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True  # as main.py sets it
  torch.manual_seed(0)
  torch.set_num_threads(args.torch_threads)
  params = argparse.Namespace(latent_dim=20, num_hidden_layers=1, learn_prior=True,
                              llik_scaling=0.0)
  model = mnist_svhn(params).to(device)
  model.train()
  optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-3,
                               amsgrad=True)
  data = [torch.rand(args.batch_size, 1, 28, 28, device=device),
          torch.rand(args.batch_size, 3, 32, 32, device=device)]

  def step():
    optimizer.zero_grad()
    loss = -objectives.m_dreg_looser(model, data, K=args.k)
    loss.backward()
    optimizer.step()
    loss.item()  # as main.py's loop; also waits for the GPU

  def extra():
    if device == "cuda":
      return {"peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {}

  info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "torch_device": device}
  if args.worker == "torch_jemalloc":
    info["malloc_conf"] = os.environ.get("MALLOC_CONF")
  return step, info, extra, None


def _serve(args) -> None:
  """Worker loop: build the step, warm it up, then serve requests on stdin.

  "N": time N steps; "roofline": time the matmul shapes (our worker only).
  """
  step, info, extra, roofline = (_jax_worker if args.worker == "jax" else _torch_worker)(args)
  t0 = time.perf_counter()
  step()
  info["first_step_s"] = round(time.perf_counter() - t0, 3)
  for _ in range(args.warmup):
    step()
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    if line.strip() == "roofline":
      print(json.dumps(roofline()), flush=True)
      continue
    times, cpu_times = [], []
    for _ in range(int(line)):
      t0, c0 = time.perf_counter(), time.process_time()
      step()
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_rss_mb": round(peak_mb, 1),
                      **extra()}), flush=True)


def _summary(times, cpu_times, batch_size) -> dict:
  import numpy as np
  t = np.asarray(times)
  median = float(np.median(t))
  return {"steps": len(t), "step_s_median": round(median, 4),
          "step_s_p25": round(float(np.percentile(t, 25)), 4),
          "step_s_min": round(float(t.min()), 4),
          "examples_per_s": round(batch_size / median, 1),
          "cpu_s_median": round(float(np.median(cpu_times)), 4)}


def parse_cpus(text: str) -> list:
  """"0,2-3" → [0, 2, 3]; ValueError when malformed, empty or not CPUs this process may use."""
  cpus = set()
  for part in text.split(","):
    lo, _, hi = part.strip().partition("-")
    if not lo.isdigit() or (hi and not hi.isdigit()):
      raise ValueError("expected CPU numbers and ranges, e.g. 0 or 0,1 or 0-3")
    cpus.update(range(int(lo), int(hi or lo) + 1))
  unusable = cpus - os.sched_getaffinity(0)
  if not cpus or unusable:
    raise ValueError(f"CPUs {sorted(unusable)} are not available to this process")
  return sorted(cpus)


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _fail(message: str) -> None:
  print(f"compare_official: {message}", file=sys.stderr)
  raise SystemExit(2)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--official_src", default=None,
                      help="the src/ folder of a checkout of github.com/iffsid/mmvae (required)")
  parser.add_argument("--k", type=int, default=1, help="samples per expert")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=6, help="blocks per side, alternating")
  parser.add_argument("--steps_per_round", type=int, default=6,
                      help="steps per block (the first is discarded)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="the official side's threads (default: the CPUs it may run on)")
  parser.add_argument("--pin", default=None,
                      help="run every worker on these CPUs only, e.g. 0 or 0,1 or 0-3 (default: "
                      "all); on a shared machine --pin=0 gives a one-core comparison that "
                      "suffers less from other jobs (see the module docstring)")
  parser.add_argument("--torch_device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="the official side's device (auto: cuda when available)")
  parser.add_argument("--decoder_impl", default="auto", choices=["auto", "matmul", "conv"],
                      help="our SVHN decoder's formulation (auto: matmul on CPU, conv elsewhere)")
  parser.add_argument("--retain_host_memory", default="auto", choices=["auto", "always", "never"],
                      help="our side's host-memory policy, as in the training scripts")
  parser.add_argument("--huge_pages", default="auto", choices=["auto", "never"],
                      help="our side's huge-page policy, as in the training scripts")
  parser.add_argument("--official", default="auto",
                      help="official builds to time, comma-separated: " + ", ".join(OFFICIAL_BUILDS)
                      + "; auto: as_is, plus jemalloc when libjemalloc is found")
  parser.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                      help="also time XLA's matmul on the decoder's shapes (module docstring)")
  parser.add_argument("--worker", choices=["jax"] + [f"torch_{b}" for b in OFFICIAL_BUILDS],
                      help=argparse.SUPPRESS)
  parser.add_argument("--device_memory", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--json", action="store_true", help="print only the JSON object")
  args = parser.parse_args(argv)
  try:
    cpus = parse_cpus(args.pin) if args.pin else sorted(os.sched_getaffinity(0))
  except ValueError as e:
    parser.error(f"--pin={args.pin}: {e}")
  if args.torch_threads is None:
    args.torch_threads = len(cpus)
  if min(args.k, args.batch_size, args.rounds, args.torch_threads) < 1 or args.steps_per_round < 2:
    parser.error("--k, --batch_size, --rounds, --torch_threads must be >= 1 and "
                 "--steps_per_round >= 2")
  if args.worker:
    if args.pin:
      os.sched_setaffinity(0, cpus)  # before JAX or torch size their thread pools
    _serve(args)
    return {}
  if not args.official_src:
    _fail("--official_src is required: git clone https://github.com/iffsid/mmvae and pass "
          "its src folder")
  src = pathlib.Path(args.official_src).expanduser().resolve()
  missing = [f for f in OFFICIAL_FILES if not (src / f).is_file()]
  if missing:
    _fail(f"--official_src={args.official_src} lacks {', '.join(missing)}: pass the src "
          "folder of a checkout of https://github.com/iffsid/mmvae")
  if importlib.util.find_spec("torch") is None:
    _fail("the official side needs torch (pip install torch)")
  # A soname is enough for LD_PRELOAD: it is searched like a dependency.
  jemalloc = ctypes.util.find_library("jemalloc")
  if args.official == "auto":
    builds = ["as_is"] + (["jemalloc"] if jemalloc else [])
  else:
    builds = [b for b in args.official.split(",") if b]
  unknown = sorted(set(builds) - set(OFFICIAL_BUILDS))
  if unknown or not builds:
    parser.error(f"--official: unknown build(s) {unknown}; expected some of {OFFICIAL_BUILDS}")
  if "jemalloc" in builds and not jemalloc:
    _fail("--official=jemalloc: libjemalloc not found (Debian: apt-get install libjemalloc2)")

  forwarded = [f"--k={args.k}", f"--batch_size={args.batch_size}", f"--warmup={args.warmup}",
               f"--torch_threads={args.torch_threads}", f"--torch_device={args.torch_device}",
               f"--official_src={src}", f"--decoder_impl={args.decoder_impl}",
               f"--retain_host_memory={args.retain_host_memory}",
               f"--huge_pages={args.huge_pages}",
               "--roofline" if args.roofline else "--no-roofline", "--device_memory"]
  forwarded += [f"--pin={args.pin}"] if args.pin else []
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  # On a GPU both sides share the device: JAX grows its memory instead of taking 75% up front.
  sides = {"ours": ("jax", dict(env, XLA_PYTHON_CLIENT_PREALLOCATE=os.environ.get(
      "XLA_PYTHON_CLIENT_PREALLOCATE", "false")))}
  for build in builds:
    name = "official" if build == "as_is" else f"official_{build}"
    sides[name] = (f"torch_{build}", dict(env, LD_PRELOAD=jemalloc,
                                          MALLOC_CONF=JEMALLOC_NEVER_RELEASE)
                   if build == "jemalloc" else env)
  workers, infos, rates = {}, {}, []
  try:
    for side, (worker, worker_env) in sides.items():  # one after the other: clean compile times
      proc = subprocess.Popen(
          [sys.executable, __file__, f"--worker={worker}"] + forwarded, stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, text=True, env=worker_env)
      workers[side] = proc
      line = proc.stdout.readline()
      if not line:
        _fail(f"the {side} worker exited with status {proc.wait()} (its error is above)")
      infos[side] = json.loads(line)
    times = {side: [] for side in workers}
    cpu_times = {side: [] for side in workers}
    for _ in range(args.rounds):
      for side, proc in workers.items():
        proc.stdin.write(f"{args.steps_per_round}\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        times[side] += reply.pop("times")[1:]
        cpu_times[side] += reply.pop("cpu_times")[1:]
        infos[side].update(reply)
      if args.roofline:
        workers["ours"].stdin.write("roofline\n")
        workers["ours"].stdin.flush()
        rates.append(json.loads(workers["ours"].stdout.readline()))
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()
  summaries = {side: {**_summary(times[side], cpu_times[side], args.batch_size), **infos[side]}
               for side in workers}
  ours_median = summaries["ours"]["step_s_median"]
  result = {
      "benchmark": "compare_official", "model": "mnist_svhn", "k": args.k,
      "batch_size": args.batch_size, "rounds": args.rounds,
      "steps_per_round": args.steps_per_round, **summaries,
      "speedup": {side: round(summaries[side]["step_s_median"] / ours_median, 3)
                  for side in summaries if side != "ours"},
      "speedup_min": {side: round(summaries[side]["step_s_min"] / summaries["ours"]["step_s_min"],
                                  3) for side in summaries if side != "ours"},
      "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "host": platform.machine(),
                  "workers_on_cpus": cpus, "load_average_1min": round(os.getloadavg()[0], 1)},
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }
  if rates:
    import numpy as np
    rate = float(np.median([r["decoder_gflops"] for r in rates]))
    gflop = summaries["ours"].pop("step_gflop", None)
    roof = {"matmul_gflops_decoder_shapes": round(rate, 1),
            "matmul_gflops_per_round": [round(r["decoder_gflops"], 1) for r in rates],
            "per_shape_last_round": rates[-1]["per_shape"]}
    if gflop:
      step_rate = gflop / ours_median
      roof.update(step_gflop=gflop, step_gflops=round(step_rate, 1),
                  fraction_of_matmul_rate=round(step_rate / rate, 3))
    result["roofline"] = roof
  print(json.dumps(result) if args.json else json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
