r"""Bias and signal-to-noise ratio of the gradient estimators of `mmvae_jax.loss.moe_iwae`.

    python benchmarks/estimators.py toy --m=2 --k=1,10,30 --draws=20000
    python benchmarks/estimators.py networks --workdir=runs/mnist_svhn --k=10 --draws=16
    python benchmarks/estimators.py bound --workdir=runs/mnist_svhn --step=-1 --batches=5

Prints one JSON object (tables of docs/estimators.md).

``toy``: M modalities x_m (B = 4 data, 3 dimensions each); linear-Gaussian experts
q_m(z | x_m) = N(W_m x_m + b_m, diag(exp(u_m))) (encoder parameters W, b, u); linear-Gaussian
decoders x_d ~ N(A_d z + c_d, I) (decoder parameters A, c); prior N(0, I); everything float64.
The model's parameters are a perturbation of the generating ones, so the experts are not the
posterior. For every K, `--draws` independent draws of every estimator's gradient of the summed
stratified bound on the same samples. ``iwae`` is the reparameterised gradient of the bound
itself, unbiased by construction, so the exact gradient is known to the precision of its mean
(``reference_rel_se``: norm of its standard error over the norm of the mean). The bias of an
estimator is measured on the paired differences with ``iwae`` (same draws): per parameter
z = mean(g_E − g_iwae) / its standard error; reported as the median and max of |z| over the
parameters, and as ``rel_bias`` = ||mean(g_E − g_iwae)|| / ||mean(g_iwae)||. SNR per
parameter is |mean| / standard deviation of one draw (median and mean over the parameters).

``networks``: a run's model (the MNIST-SVHN networks with the MNIST and colour-image data of
its run.json) at its official initialisation (``model.init`` with the run's seed) and at the
run's latest checkpoint: for one fixed test batch, `--draws` gradients of the training loss
(−mean of the stratified bound, K = --k) per estimator, float32 as in training; reported per
group (encoders, decoders) the total variance Σ_p Var(g_p), the squared norm of the mean, the
median per-parameter SNR and the mean relative distance ||g_E − g_dreg_moe|| / ||g_dreg_moe||
per draw; and, to explain them, the effective sample size 1 / Σ_k w̃² of a stratum (1 to K) and
the mean responsibility r_j(z) of a sample's own expert (1: the experts do not overlap).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax import distributions as dists
from mmvae_jax import loss

N_OBS, D, B = 3, 2, 4


# ---------------------------------------------------------------------------------------------
# Toy problem.


def toy_problem(num_modalities: int, seed: int):
  rng = np.random.default_rng(seed)
  true = dict(A=[rng.normal(0, 1.0, (N_OBS, D)) for _ in range(num_modalities)],
              c=[rng.normal(0, 0.5, N_OBS) for _ in range(num_modalities)])
  z = rng.normal(size=(B, D))
  x = tuple(z @ a.T + c + rng.normal(size=(B, N_OBS)) for a, c in zip(true["A"], true["c"]))
  params = dict(
      W=tuple(rng.normal(0, 0.4, (N_OBS, D)) for _ in range(num_modalities)),
      b=tuple(rng.normal(0, 0.3, D) for _ in range(num_modalities)),
      u=tuple(rng.normal(-0.5, 0.3, D) for _ in range(num_modalities)),
      A=tuple(a + rng.normal(0, 0.3, a.shape) for a in true["A"]),
      c=tuple(c + rng.normal(0, 0.3, c.shape) for c in true["c"]))
  return params, x


def toy_bound(params, x, key, num_samples, estimator):
  experts = [distrax.Normal(xm @ w + b, jnp.exp(u))
             for xm, w, b, u in zip(x, params["W"], params["b"], params["u"])]
  prior = distrax.Normal(jnp.zeros(D), jnp.ones(D))

  def log_lik(z):
    return sum(jnp.sum(-0.5 * (xd - z @ a.T - c)**2 - 0.5 * jnp.log(2 * jnp.pi), -1)
               for xd, a, c in zip(x, params["A"], params["c"]))

  return loss.moe_iwae(key, experts, log_lik, prior, num_samples, looser=True,
                       estimator=estimator).sum()


def flatten(tree, names):
  leaves = [leaf for n in names for leaf in jax.tree.leaves(tree[n])]
  return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def summarise(grads: dict[str, np.ndarray]) -> dict:
  """Bias against iwae (paired) and SNR per estimator for one parameter group, (N, P) each."""
  ref = grads["iwae"]
  n = len(ref)
  ref_mean = ref.mean(0)
  out = {"reference_rel_se": float(np.linalg.norm(ref.std(0, ddof=1) / np.sqrt(n))
                                   / np.linalg.norm(ref_mean))}
  for est, g in grads.items():
    snr = np.abs(g.mean(0)) / np.maximum(g.std(0, ddof=1), 1e-300)
    row = {"snr_median": float(np.median(snr)), "snr_mean": float(np.mean(snr))}
    if est != "iwae":
      diff = g - ref
      sd = diff.std(0, ddof=1)
      if np.all(sd == 0):
        row.update(z_median=0.0, z_max=0.0, rel_bias=0.0)
      else:
        z = np.abs(diff.mean(0)) / np.maximum(sd / np.sqrt(n), 1e-300)
        row.update(z_median=float(np.median(z)), z_max=float(np.max(z)),
                   rel_bias=float(np.linalg.norm(diff.mean(0)) / np.linalg.norm(ref_mean)))
    out[est] = row
  return out


def run_toy(args) -> dict:
  jax.config.update("jax_enable_x64", True)
  params, x = toy_problem(args.m, args.seed)
  params, x = jax.tree.map(jnp.asarray, params), tuple(map(jnp.asarray, x))
  results = {}
  for k in args.k:
    @jax.jit
    def chunk(keys, k=k):
      def one(key):
        return {e: jax.grad(toy_bound)(params, x, key, k, e) for e in loss.ESTIMATORS}
      g = jax.vmap(one)(keys)
      return {e: (flatten(v, ("W", "b", "u")), flatten(v, ("A", "c"))) for e, v in g.items()}

    start = time.perf_counter()
    keys = jax.random.split(jax.random.key(args.seed + 1000 * k), args.draws)
    parts = [jax.device_get(chunk(keys[i:i + args.chunk]))
             for i in range(0, args.draws, args.chunk)]
    enc = {e: np.concatenate([p[e][0] for p in parts]) for e in loss.ESTIMATORS}
    dec = {e: np.concatenate([p[e][1] for p in parts]) for e in loss.ESTIMATORS}
    results[f"K={k}"] = {"encoder": summarise(enc), "decoder": summarise(dec),
                         "encoder_params": int(enc["iwae"].shape[1]),
                         "decoder_params": int(dec["iwae"].shape[1]),
                         "seconds": round(time.perf_counter() - start, 1)}
  return {"part": "toy", "M": args.m, "B": B, "D": D, "draws": args.draws, "seed": args.seed,
          "dtype": "float64", "results": results}


# ---------------------------------------------------------------------------------------------
# The real networks.


def run_networks(args) -> dict:
  import mmvae_jax
  run = mmvae_jax.load_run(args.workdir)
  model = run.model
  test = run.data().test
  rows = np.random.default_rng(args.seed).choice(len(test), args.batch, replace=False)
  xs, _ = test.gather(np.sort(rows))
  xs = [jnp.asarray(v) for v in xs]

  @jax.jit
  def grads(params, key):
    out = {}
    for e in loss.ESTIMATORS:
      g = jax.grad(lambda p: -model.objective(p, xs, key, args.k, estimator=e).mean())(params)
      out[e] = tuple(jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g[group])])
                     for group in ("encoders", "decoders"))
    return out

  @jax.jit
  def weights(params, key):
    """Per draw: effective sample size 1 / Σ_k w̃² of each stratum (M, B), and the mean
    responsibility of a sample's own expert r_j(z_{j,k}) (how much the experts overlap)."""
    experts = model.encode(params, xs)
    z = loss.sample_experts(key, experts, args.k)
    lw = loss.log_weights(z, experts, model.log_likelihood_fn(params, xs), model.prior(params))
    w = jax.nn.softmax(lw, axis=1)
    log_q = jnp.stack([dists.latent_log_prob(q, z) for q in experts])  # (M, M, K, B)
    own = jnp.exp(jnp.diagonal(log_q - jax.nn.logsumexp(log_q, axis=0), axis1=0, axis2=1))
    return 1.0 / jnp.sum(w**2, axis=1), own

  states = {"init": model.init(jax.random.key(run.config.seed)), f"step {run.step}": run.params}
  results = {}
  for name, params in states.items():
    start = time.perf_counter()
    draws = [jax.device_get(grads(params, jax.random.key(args.seed * 7919 + i)))
             for i in range(args.draws)]
    res = {}
    for gi, group in enumerate(("encoders", "decoders")):
      res[group] = {}
      for e in loss.ESTIMATORS:
        g = np.stack([d[e][gi] for d in draws]).astype(np.float64)
        mean, var = g.mean(0), g.var(0, ddof=1)
        snr = np.abs(mean) / np.maximum(np.sqrt(var), 1e-30)
        res[group][e] = {"total_variance": float(var.sum()),
                         "mean_sq_norm": float(np.sum(mean**2)),
                         "snr_median": float(np.median(snr))}
    for gi, group in enumerate(("encoders", "decoders")):
      ref = np.stack([d["dreg_moe"][gi] for d in draws]).astype(np.float64)
      for e in loss.ESTIMATORS:
        g = np.stack([d[e][gi] for d in draws]).astype(np.float64)
        res[group][e]["rel_diff_to_dreg_moe"] = float(np.mean(
            np.linalg.norm(g - ref, axis=1) / np.linalg.norm(ref, axis=1)))
    ess, own = zip(*[jax.device_get(weights(params, jax.random.key(args.seed * 7919 + i)))
                     for i in range(args.draws)])
    res["ess_mean"] = float(np.mean(ess))
    res["ess_median"] = float(np.median(ess))
    res["own_responsibility_mean"] = float(np.mean(own))
    res["seconds"] = round(time.perf_counter() - start, 1)
    results[name] = res
  return {"part": "networks", "workdir": args.workdir, "checkpoint_step": run.step,
          "k": args.k, "batch": args.batch, "draws": args.draws, "seed": args.seed,
          "dtype": "float32", "results": results}


def run_bound(args) -> dict:
  """The test bound of a checkpoint as training evaluates it (`train.evaluate`: the tight
  MoE-IWAE with the run's K over the first `--batches` test batches, the run's seed)."""
  import mmvae_jax
  from mmvae_jax import parallel, train
  run = mmvae_jax.load_run(args.workdir, step=args.step)
  config = run.config.train_config()
  batch = config.eval_batch_size or config.batch_size
  eval_step = jax.jit(train.make_eval_step(run.model, config.k))
  out = train.evaluate(eval_step, run.params, run.data().test, parallel.data_mesh(),
                       batch_size=batch, seed=config.seed, max_batches=args.batches)
  return {"part": "bound", "workdir": args.workdir, "step": run.step, "k": config.k,
          "estimator": config.estimator, **out}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="part", required=True)
  toy = sub.add_parser("toy", help="float64 toy: bias (standard errors) and SNR")
  toy.add_argument("--m", type=int, default=2)
  toy.add_argument("--k", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10, 30])
  toy.add_argument("--draws", type=int, default=20000)
  toy.add_argument("--chunk", type=int, default=2000)
  toy.add_argument("--seed", type=int, default=0)
  net = sub.add_parser("networks", help="gradient variance of a run's networks")
  net.add_argument("--workdir", required=True)
  net.add_argument("--k", type=int, default=10)
  net.add_argument("--batch", type=int, default=32)
  net.add_argument("--draws", type=int, default=16)
  net.add_argument("--seed", type=int, default=0)
  bound = sub.add_parser("bound", help="test bound of a run's checkpoint, as in training")
  bound.add_argument("--workdir", required=True)
  bound.add_argument("--step", type=int, default=-1)
  bound.add_argument("--batches", type=int, default=5)
  args = parser.parse_args(argv)
  if args.part == "toy" and (args.m < 1 or min(args.k) < 1 or args.draws < 2):
    parser.error("--m and every --k must be >= 1, --draws >= 2")
  out = {"toy": run_toy, "networks": run_networks, "bound": run_bound}[args.part](args)
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
