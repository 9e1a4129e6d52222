"""Benchmark of the SVHN decoder's formulations (fwd+bwd), per impl and per layer.

  python benchmarks/decoder.py --json                      # conv vs matmul, N = 7680 latents
  python benchmarks/decoder.py --json --impl matmul --n 3840 --repeats 5
  python benchmarks/decoder.py --json --step               # + an MMVAE-like training step
  python benchmarks/decoder.py --json --remat minimal --chunk-size 512  # SvhnDecoder options

Prints one JSON object:
  decoder[impl]:  whole SvhnDecoder on (N, D) latents, value_and_grad of a Laplace-like loss
                  w.r.t. params and z: median/min wall seconds, median process CPU seconds,
                  compile seconds, XLA temp buffer bytes, peak RSS of the worker process.
  layers[layer][variant]: the same for one transposed convolution (+ its activation) on its
                  real input shape (N, H, W, C_in), gradients w.r.t. input, kernel and bias.
  step (--step):  value_and_grad of a proxy MMVAE MNIST-SVHN step (2 encoders on B images, K
                  reparameterised samples each, 2×2 decoder calls, Laplace-like terms) with
                  the decoders' default impl: timings and peak RSS.
Each measurement runs in its own subprocess, so peak RSS is per measurement. The machine
load average is recorded because timings on a shared CPU are noisy: compare "cpu_s" (process
CPU time) as well as wall time. Extra XLA flags can be passed through the XLA_FLAGS variable
(recorded in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a plain checkout without `pip install -e .`
  sys.path.insert(0, _REPO)

LAYERS = {  # name: (H_in, C_in, C_out, stride, padding, activation)
    "deconv1": (1, None, 128, 1, 0, "relu"),  # C_in = latent_dim
    "deconv2": (4, 128, 64, 2, 1, "relu"),
    "deconv3": (8, 64, 32, 2, 1, "relu"),
    "deconv4": (16, 32, 3, 2, 1, "sigmoid"),
}
LAYER_VARIANTS = ("conv", "window", "col2im")
SLOW_CALL_S = 60.0  # a warm-up call slower than this caps the timed repeats at one


def _timed(fn, args, repeats):
  import jax
  import numpy as np
  rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  rss_before = rss()
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  rss_compiled = rss()
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first_s = time.perf_counter() - t0
  if first_s > SLOW_CALL_S:
    repeats = 1
  walls, cpus = [], []
  if repeats < 1:  # memory check: the warm-up call is the only timing
    walls, cpus, repeats = [first_s], [float("nan")], 0
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  mem = compiled.memory_analysis()
  return {
      "median_s": round(float(np.median(walls)), 4),
      "min_s": round(float(np.min(walls)), 4),
      "cpu_s": round(float(np.median(cpus)), 4),
      "repeats": repeats,
      "first_call_s": round(first_s, 3),
      "compile_s": round(compile_s, 3),
      "temp_mb": round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None,
      "peak_rss_mb": rss(),
      "peak_rss_before_compile_mb": rss_before,
      "peak_rss_after_compile_mb": rss_compiled,
  }


def _worker_decoder(args):
  import jax
  import jax.numpy as jnp
  from mmvae_jax.networks import SvhnDecoder
  dec = SvhnDecoder(latent_dim=args.latent_dim, impl=args.impl, chunk_size=args.chunk_size,
                    remat=args.remat)
  z = jax.random.normal(jax.random.PRNGKey(1), (args.n, args.latent_dim))
  x = jax.random.uniform(jax.random.PRNGKey(2), (args.n, 32, 32, 3))
  params = dec.init(jax.random.PRNGKey(0), z[:1])["params"]

  def loss(params, z, x):
    mean = dec.apply({"params": params}, z)
    return jnp.sum(jnp.abs(x - mean) / 0.75)  # −log Laplace(x; mean, 0.75) + const

  return _timed(jax.value_and_grad(loss, argnums=(0, 1)), (params, z, x), args.repeats)


def _worker_layer(args):
  import jax
  import jax.numpy as jnp
  from mmvae_jax import layers as L
  h, c_in, c_out, stride, padding, act = LAYERS[args.layer]
  c_in = c_in or args.latent_dim
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.nn.relu(jax.random.normal(keys[0], (args.n, h, h, c_in)))
  bound = L.conv_transpose_bound(c_out, (4, 4))
  kernel = jax.random.uniform(keys[1], (4, 4, c_in, c_out), minval=-bound, maxval=bound)
  bias = jax.random.uniform(keys[2], (c_out,), minval=-bound, maxval=bound)
  h_out = L.conv_transpose_out_size(h, 4, stride, padding)
  target = jax.random.uniform(keys[3], (args.n, h_out, h_out, c_out))
  variant = args.impl
  if variant == "conv":
    layer = lambda x, k, b: L.conv_transpose_lax(x, k, b, stride=stride, padding=padding)
  elif args.layer == "deconv1":
    layer = L.conv_transpose_from_1x1
  elif variant == "window":
    layer = L.conv_transpose_window
  else:
    layer = L.conv_transpose_col2im
  act_fn = jax.nn.sigmoid if act == "sigmoid" else jax.nn.relu

  def loss(x, k, b):
    return jnp.sum(jnp.abs(act_fn(layer(x, k, b)) - target))

  return _timed(jax.value_and_grad(loss, argnums=(0, 1, 2)), (x, kernel, bias), args.repeats)


def _worker_step(args):
  """Proxy of one MMVAE MNIST-SVHN training step (IWAE-like terms, no optimiser)."""
  import jax
  import jax.numpy as jnp
  from mmvae_jax import networks as nets
  d, k, b = args.latent_dim, args.k, args.b
  mods = {
      "mnist": (nets.MnistEncoder(d), nets.MnistDecoder(d), (28, 28, 1)),
      "svhn": (nets.SvhnEncoder(d),
               nets.SvhnDecoder(d, chunk_size=args.chunk_size, remat=args.remat), (32, 32, 3)),
  }
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  xs = {m: jax.random.uniform(keys[i], (b,) + shp)
        for i, (m, (_, _, shp)) in enumerate(mods.items())}
  params = {}
  for i, (m, (enc, dec, shp)) in enumerate(mods.items()):
    params[m] = {"enc": enc.init(keys[2 + i], xs[m][:1])["params"],
                 "dec": dec.init(keys[4 + i], jnp.zeros((1, d)))["params"]}
  eps = jax.random.normal(keys[6], (2, k, b, d))

  def loss(params, xs, eps):
    zs, total = {}, 0.0
    for i, (m, (enc, _, _)) in enumerate(mods.items()):
      loc, logits = enc.apply({"params": params[m]["enc"]}, xs[m])
      scale = jax.nn.softmax(logits, -1) * d + 1e-6
      zs[m] = loc + scale * eps[i]  # (K, B, D)
      total += jnp.sum(jnp.abs(zs[m] - jax.lax.stop_gradient(loc)) / scale + jnp.log(scale))
    for e in mods:
      for m, (_, dec, _) in mods.items():
        mean = dec.apply({"params": params[m]["dec"]}, zs[e])  # (K, B, H, W, C)
        total += jnp.sum(jnp.abs(xs[m] - mean) / 0.75)
    return total / (k * b)

  return _timed(jax.value_and_grad(loss), (params, xs, eps), args.repeats)


def _run_worker(argv):
  out = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv, capture_output=True,
                       text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode != 0 or not lines:
    return {"error": (out.stderr or out.stdout)[-2000:]}
  return json.loads(lines[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", action="store_true", help="print the JSON object only")
  p.add_argument("--impl", default="conv,matmul",
                 help="comma list of SvhnDecoder impls for the whole-decoder timing")
  p.add_argument("--n", type=int, default=7680, help="latents (M·K·B = 2·30·128 = 7680)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--latent-dim", type=int, default=20)
  p.add_argument("--chunk-size", type=int, default=-1, help="SvhnDecoder.chunk_size")
  p.add_argument("--remat", default="auto", help="SvhnDecoder.remat (auto, minimal, activations)")
  p.add_argument("--layer-variants", default=",".join(LAYER_VARIANTS),
                 help="comma list of per-layer variants (conv, window, col2im); empty: skip")
  p.add_argument("--step", action="store_true", help="also time a proxy MMVAE training step")
  p.add_argument("--k", type=int, default=30)
  p.add_argument("--b", type=int, default=128)
  p.add_argument("--worker", choices=["decoder", "layer", "step"], help=argparse.SUPPRESS)
  p.add_argument("--layer", help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    fn = {"decoder": _worker_decoder, "layer": _worker_layer, "step": _worker_step}[args.worker]
    print(json.dumps(fn(args)), flush=True)
    return

  import jax
  common = ["--n", str(args.n), "--repeats", str(args.repeats), "--latent-dim",
            str(args.latent_dim), "--chunk-size", str(args.chunk_size), "--remat", args.remat]
  log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
  result = {
      "backend": jax.default_backend(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "n": args.n, "latent_dim": args.latent_dim,
      "chunk_size": args.chunk_size, "remat": args.remat, "repeats": args.repeats,
      "load_avg_start": os.getloadavg()[0], "decoder": {}, "layers": {},
  }
  for impl in [s for s in args.impl.split(",") if s]:
    log("decoder", impl)
    result["decoder"][impl] = _run_worker(["--worker", "decoder", "--impl", impl] + common)
    log(json.dumps(result["decoder"][impl]))
  variants = [s for s in args.layer_variants.split(",") if s]
  for layer in LAYERS if variants else ():
    result["layers"][layer] = {}
    for variant in (["conv", "matmul"] if layer == "deconv1" else variants):
      log(layer, variant)
      r = _run_worker(["--worker", "layer", "--layer", layer, "--impl", variant] + common)
      result["layers"][layer][variant] = r
      log(json.dumps(r))
  if args.step:
    log("step")
    result["step"] = dict(k=args.k, b=args.b, **_run_worker(
        ["--worker", "step", "--k", str(args.k), "--b", str(args.b)] + common))
  result["load_avg_end"] = os.getloadavg()[0]
  print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
  main()
