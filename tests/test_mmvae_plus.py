"""MMVAE+ (shared and private latents, Palumbo et al. 2023): float64 references of the objective's
value and gradients, the protocol's latent layout, and a tiny train + evaluate.

The reference problem (M = 3, B = 2, Dz = 2, Dw = 1, K = 2): every encoder is a parameter table
returning fixed (loc, pre-activation) of Dz + Dw columns per datum (scale softplus + 1e-6),
every decoder is linear in (z, w_d), mean_d = A_d [z, w_d] + c_d, with a Normal likelihood of
scale sig_d and weight λ_d; p(z), p(w) are N(0, I) and r_d(w) = N(0, exp(l_d)²). The library runs
under ``jax.enable_x64``; the references recompute the objective in NumPy float64 from the same
standard-normal noise, drawn with the keys `mmvae_jax.loss.mmvae_plus_iwae` documents.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from mmvae_jax import experiments, models, runs
from mmvae_jax import distributions as dists
from mmvae_jax.evaluation import report
from mmvae_jax.models.base import Modality, UniformMixture
from mmvae_jax.models.mmvae_plus import MMVAEPlus
import tiny_models

NAMES = ("m0", "m1", "m2")
M, B, DZ, DW, K = 3, 2, 2, 1, 2
SIZES = (2, 3, 1)
BETA = 1.7
RTOL = 1e-10
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


class TableEncoder(nn.Module):
  """Ignores x: returns its parameters (loc (B, Dz + Dw), pre (B, Dz + Dw))."""

  @nn.compact
  def __call__(self, x):
    loc = self.param("loc", nn.initializers.zeros, (B, DZ + DW))
    pre = self.param("pre", nn.initializers.zeros, (B, DZ + DW))
    return loc + 0.0 * x[:, :1], pre


class LinearDecoder(nn.Module):
  """u (..., Dz + Dw) -> u A^T + c, (..., n)."""
  n: int

  @nn.compact
  def __call__(self, u):
    a = self.param("A", nn.initializers.zeros, (self.n, DZ + DW))
    c = self.param("c", nn.initializers.zeros, (self.n,))
    return u @ a.T + c


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  sig = rng.uniform(0.7, 1.3, M)
  lam = rng.uniform(0.5, 2.0, M)
  mods = tuple(
      Modality(name=n, encoder=TableEncoder(), decoder=LinearDecoder(s), data_shape=(s,),
               llik_scale=float(lam[i]), posterior_family="normal",
               posterior_scale=dists.softplus_scale,
               log_likelihood=functools.partial(dists.normal_log_likelihood,
                                                scale=float(sig[i]), event_ndim=1))
      for i, (n, s) in enumerate(zip(NAMES, SIZES)))
  model = MMVAEPlus(mods, latent_dim=DZ, private_dim=DW, beta=BETA, prior_family="normal",
                    prior_scale=jnp.exp)
  p = dict(loc=rng.normal(0.0, 0.8, (M, B, DZ + DW)), pre=rng.normal(0.0, 0.6, (M, B, DZ + DW)),
           A=[rng.normal(0.0, 0.5, (s, DZ + DW)) for s in SIZES],
           c=[rng.normal(0.0, 0.3, s) for s in SIZES],
           r=rng.normal(0.0, 0.4, (M, DW)))
  xs = [rng.normal(0.0, 1.0, (B, s)) for s in SIZES]
  return model, p, xs, sig, lam


def lib_params(p):
  return {"encoders": {n: {"loc": jnp.asarray(p["loc"][i]), "pre": jnp.asarray(p["pre"][i])}
                       for i, n in enumerate(NAMES)},
          "decoders": {n: {"A": jnp.asarray(p["A"][i]), "c": jnp.asarray(p["c"][i])}
                       for i, n in enumerate(NAMES)},
          "auxiliary": {n: {"scale_logits": jnp.asarray(p["r"][i])} for i, n in enumerate(NAMES)}}


def noise(key, shape, count):
  keys = jax.random.split(key, count)
  return np.stack([np.asarray(jax.random.normal(k, shape, jnp.float64)) for k in keys])


def library_noise(key):
  """(eps_z (M, K, B, Dz), eps_w (M, K, B, Dw), eps_r (M_d, M, K, B, Dw)) as the loss draws them."""
  k_z, k_w, k_r = jax.random.split(key, 3)
  return (noise(k_z, (K, B, DZ), M), noise(k_w, (K, B, DW), M), noise(k_r, (M, K, B, DW), M))


# NumPy float64, independent of the library.


def softplus(v):
  return np.logaddexp(0.0, v) + 1e-6


def log_normal(x, loc, scale):
  return np.sum(-0.5 * np.log(2 * np.pi * scale**2) - 0.5 * ((x - loc) / scale)**2, axis=-1)


def np_log_weights(p, xs, sig, lam, eps, density=None):
  """(M, K, B) log weights; `density` (default p) supplies the posteriors inside log q."""
  p = {k: np.asarray(v) for k, v in p.items() if k != "A" and k != "c"} | {"A": p["A"], "c": p["c"]}
  density = p if density is None else {k: np.asarray(v) for k, v in density.items()
                                       if k in ("loc", "pre")}
  eps_z, eps_w, eps_r = eps
  loc_z, s_z = p["loc"][..., :DZ], softplus(p["pre"][..., :DZ])
  loc_w, s_w = p["loc"][..., DZ:], softplus(p["pre"][..., DZ:])
  dz_loc, dz_s = density["loc"][..., :DZ], softplus(density["pre"][..., :DZ])
  dw_loc, dw_s = density["loc"][..., DZ:], softplus(density["pre"][..., DZ:])
  z = loc_z[:, None] + s_z[:, None] * eps_z            # (M, K, B, Dz)
  w = loc_w[:, None] + s_w[:, None] * eps_w            # (M, K, B, Dw)
  w_aux = np.exp(p["r"])[:, None, None, None, :] * eps_r  # (M_d, M, K, B, Dw)
  lw = np.zeros((M, K, B))
  for m in range(M):
    for d in range(M):
      wd = w[m] if d == m else w_aux[d, m]
      mean = np.concatenate([z[m], wd], -1) @ p["A"][d].T + p["c"][d]
      lw[m] += lam[d] * log_normal(xs[d], mean, sig[d])
    log_mix = logsumexp([log_normal(z[m], dz_loc[j], dz_s[j]) for j in range(M)], axis=0)
    reg = (log_normal(z[m], 0.0, 1.0) + log_normal(w[m], 0.0, 1.0) - (log_mix - np.log(M))
           - log_normal(w[m], dw_loc[m], dw_s[m]))
    lw[m] += BETA * reg
  return lw


def np_objective(lw, looser):
  if looser:
    return np.mean(logsumexp(lw, axis=1) - np.log(K), axis=0)
  return logsumexp(lw, axis=(0, 1)) - np.log(M * K)


# ---------------------------------------------------------------------------------------------
# Value and gradients.


def test_objective_value_matches_numpy_float64():
  model, p, xs, sig, lam = make_problem()
  key = jax.random.key(5)

  def run(params, jxs):
    # The estimator changes the gradient only: one value per bound, and dreg's once.
    return {(lo, est): model.objective(params, jxs, key, K, looser=lo, estimator=est)
            for lo, est in ((True, "iwae"), (False, "iwae"), (True, "dreg"))}

  with jax.enable_x64(True):
    out = fast_jit(run)(lib_params(p), [jnp.asarray(x) for x in xs])
    eps = library_noise(key)
  lw = np_log_weights(p, xs, sig, lam, eps)
  for (lo, est), value in out.items():
    assert value.dtype == jnp.float64 and value.shape == (B,)
    np.testing.assert_allclose(np.asarray(value), np_objective(lw, lo), rtol=RTOL,
                               err_msg=f"looser={lo} {est}")
  assert np.all(np.asarray(out[(True, "iwae")]) <= np.asarray(out[(False, "iwae")]))


def _flat_params(p):
  """[(field, index into p[field], side, name, leaf)] of every scalar parameter."""
  out = []
  for field, side, leaf in (("loc", "encoders", "loc"), ("pre", "encoders", "pre"),
                            ("A", "decoders", "A"), ("c", "decoders", "c"),
                            ("r", "auxiliary", "scale_logits")):
    for m, name in enumerate(NAMES):
      arr = np.asarray(p[field][m])
      for flat in range(arr.size):
        out.append((field, m, np.unravel_index(flat, arr.shape), side, name, leaf))
  return out


def _fd(fn, p, field, m, idx, h=1e-6):
  q = {k: [np.array(v) for v in vs] for k, vs in p.items()}
  q[field][m][idx] += h
  up = fn(q)
  q[field][m][idx] -= 2 * h
  return (up - fn(q)) / (2 * h)


def test_gradients_of_every_estimator_against_numpy_finite_differences():
  """iwae: the derivative of the value; legacy: the path derivative with the posteriors inside
  log q held fixed; dreg: legacy's path derivative of each log weight weighted by w̃² instead
  of w̃. Decoders and auxiliary priors get the same (ordinary) gradient from all three."""
  model, p, xs, sig, lam = make_problem(seed=1)
  key = jax.random.key(9)
  with jax.enable_x64(True):
    jxs = [jnp.asarray(x) for x in xs]
    grads = fast_jit(lambda q: {est: jax.grad(lambda q_: jnp.sum(model.objective(
        q_, jxs, key, K, estimator=est)))(q) for est in ("iwae", "legacy", "dreg")})(lib_params(p))
    eps = library_noise(key)
  lw0 = np_log_weights(p, xs, sig, lam, eps)
  wt = np.exp(lw0 - logsumexp(lw0, axis=1, keepdims=True))  # (M, K, B) per-stratum weights
  refs = {
      "iwae": lambda q: float(np.sum(np_objective(np_log_weights(q, xs, sig, lam, eps), True))),
      "legacy": lambda q: float(np.sum(np_objective(np_log_weights(q, xs, sig, lam, eps, p), True))),
      # dreg: Σ_m (1/M) Σ_k w̃² lw (constant w̃) for the encoders; the same derivative as legacy
      # for everything else (w̃ · ∂lw), so only encoder coordinates use this surrogate.
      "dreg": lambda q: float(np.sum(np.mean(np.sum(
          wt**2 * np_log_weights(q, xs, sig, lam, eps, p), axis=1), axis=0))),
  }
  checked = 0
  for field, m, idx, side, name, leaf in _flat_params(p):
    for est, ref in refs.items():
      fn = refs["legacy"] if (est == "dreg" and side != "encoders") else ref
      got = np.asarray(grads[est][side][name][leaf])[idx]
      np.testing.assert_allclose(got, _fd(fn, p, field, m, idx), rtol=1e-5, atol=1e-6,
                                 err_msg=f"{est} {field} {name} {idx}")
      checked += 1
    if side != "encoders":
      for est in ("legacy", "dreg"):
        np.testing.assert_allclose(np.asarray(grads[est][side][name][leaf])[idx],
                                   np.asarray(grads["iwae"][side][name][leaf])[idx], rtol=1e-9)
  assert checked == 3 * (M * 2 * B * (DZ + DW) + sum(s * (DZ + DW) + s for s in SIZES) + M * DW)
  # The estimators differ on the encoders (K = 2: w̃ ≠ w̃², and the score term of iwae).
  assert not np.allclose(grads["dreg"]["encoders"]["m0"]["loc"],
                         grads["legacy"]["encoders"]["m0"]["loc"])


# ---------------------------------------------------------------------------------------------
# The protocol's latent u = (z, w_1, ..., w_M).


def test_posterior_prior_and_decoding_layout():
  model, p, xs, _, _ = make_problem(seed=2)
  with jax.enable_x64(True):
    params = lib_params(p)
    jxs = [jnp.asarray(x) for x in xs]
    single = model.posterior(params, {"m1": jxs[1]})
    pair = model.posterior(params, {"m2": jxs[2], "m0": jxs[0]})
    prior = model.prior(params)
    u = jnp.asarray(np.random.default_rng(0).normal(size=(4, B, DZ + M * DW)))
    decoded = model.decode(params, u)
  assert model.joint_latent_dim == DZ + M * DW and model.network_latent_dim == DZ + DW
  loc, pre = p["loc"], p["pre"]
  # One observed modality: (its shared expert, w_0 ~ r_0, its own w_1, w_2 ~ r_2).
  np.testing.assert_allclose(single.loc, np.concatenate(
      [loc[1, :, :DZ], np.zeros((B, 1)), loc[1, :, DZ:], np.zeros((B, 1))], -1), rtol=RTOL)
  np.testing.assert_allclose(single.scale, np.concatenate(
      [softplus(pre[1, :, :DZ]), np.broadcast_to(np.exp(p["r"][0]), (B, 1)),
       softplus(pre[1, :, DZ:]), np.broadcast_to(np.exp(p["r"][2]), (B, 1))], -1), rtol=RTOL)
  # Two observed modalities: a mixture over their shared experts (model order), both own
  # private posteriors in each component, r for the third.
  assert isinstance(pair, UniformMixture) and len(pair.components) == 2
  for comp, e in zip(pair.components, (0, 2)):
    np.testing.assert_allclose(comp.loc, np.concatenate(
        [loc[e, :, :DZ], loc[0, :, DZ:], np.zeros((B, 1)), loc[2, :, DZ:]], -1), rtol=RTOL)
  np.testing.assert_allclose(prior.scale, np.ones(DZ + M * DW))
  np.testing.assert_array_equal(model.shared_latent(u), u[..., :DZ])
  # Decoder d reads (z, w_d).
  for d in range(M):
    ud = np.concatenate([u[..., :DZ], u[..., DZ + d * DW:DZ + (d + 1) * DW]], -1)
    np.testing.assert_allclose(decoded[d], ud @ p["A"][d].T + p["c"][d], rtol=RTOL)


class CountingModality(Modality):
  calls = {"enc": 0, "dec": 0}

  def encoder_outputs(self, params, x):
    CountingModality.calls["enc"] += 1
    return super().encoder_outputs(params, x)

  def decoder_output(self, params, z):
    CountingModality.calls["dec"] += 1
    return super().decoder_output(params, z)


def test_tiny_model_structure_and_registry():
  shapes = ((4, 4, 1), (4, 4, 3), (3, 3, 1))
  options = models.ModelOptions(latent_dim=3, private_dim=2, beta=2.5)
  assert models.network_latent_dim("mmvae_plus", options) == 5
  assert models.network_latent_dim("mmvae", options) == 3
  base = models.build("mmvae_plus", tiny_models.tiny_modalities(5, shapes), options)
  assert isinstance(base, MMVAEPlus) and (base.private_dim, base.beta) == (2, 2.5)
  assert base.resolve_objective("auto") == "mmvae_plus_iwae"
  with pytest.raises(ValueError, match="mmvae_plus_iwae"):
    base.resolve_objective("moe_iwae")
  with pytest.raises(ValueError, match="private_dim >= 1"):
    dataclasses.replace(base, private_dim=0)
  mods = tuple(CountingModality(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)})
               for m in base.modalities)
  model = dataclasses.replace(base, modalities=mods)
  params = model.init(jax.random.key(0))
  assert set(params) == {"encoders", "decoders", "auxiliary"}
  xs = tiny_models.tiny_xs(b=3, shapes=shapes)
  key = jax.random.key(1)
  CountingModality.calls.update(enc=0, dec=0)
  jax.make_jaxpr(lambda q: model.objective(q, xs, key, 2))(params)
  assert CountingModality.calls == {"enc": 3, "dec": 3}

  # Shapes only (no compilation): the tiny run below computes these for real.
  def run(params):
    return dict(obj=model.objective(params, xs, key, 2), test=model.test_objective(params, xs, key, 2),
                gen=model.generate(params, key, 4), recon=model.reconstruct(params, xs, key),
                cross=model.cross_generate(params, {"m0": xs[0], "m2": xs[2]}, key, 2))

  out = jax.eval_shape(run, params)
  assert out["obj"].shape == out["test"].shape == (3,)
  assert [g.shape for g in out["gen"]] == [(4,) + s for s in shapes]
  assert [[r.shape for r in row] for row in out["recon"]] == [[(3,) + s for s in shapes]] * 3
  assert {n: v.shape for n, v in out["cross"].items()} == {
      f"m{i}": (2, 3) + s for i, s in enumerate(shapes)}


# ---------------------------------------------------------------------------------------------
# A tiny run through the experiment and the evaluation.


def _tiny_run(tmp_path):
  """A two-step mmvae_plus run of the MNIST-SVHN experiment on random MNIST-shaped images and a
  16×16×3 stand-in (an MLP modality, fast on a CPU)."""
  mnist, standin = tmp_path / "mnist.npz", tmp_path / "usps_colour.npz"
  tiny_models.digits_npz(mnist, (28, 28), 60, 40, 0)
  tiny_models.digits_npz(standin, (16, 16, 3), 60, 40, 1)
  config = experiments.get("mnist_svhn").config(
      model="mmvae_plus", sources={"mnist": str(mnist), "svhn": str(standin)}, k=2,
      batch_size=8, latent_dim=4, private_dim=2, beta=2.0, partners=1, max_steps=2,
      eval_batches=1, figures=False, seed=1)
  wd = tmp_path / "run"
  runs.train_run(config, str(wd), progress=False)
  return wd


def test_train_and_evaluate_a_tiny_run(tmp_path):
  wd = _tiny_run(tmp_path)
  info = json.loads((wd / "run.json").read_text())
  assert info["config"]["private_dim"] == 2 and info["config"]["beta"] == 2.0
  import mmvae_jax
  run = mmvae_jax.load_run(str(wd))
  assert isinstance(run.model, MMVAEPlus) and run.model.private_dim == 2
  assert run.model.network_latent_dim == 6 and run.model.joint_latent_dim == 8
  # The probe on the shared latent (coherence, likelihoods and figures: the slow test below).
  res = report.evaluate(run, report.Settings(parts=("probe",), num_test=16, probe_num_train=16,
                                             batch_size=8), say=lambda *_: None)
  assert set(res["table1_probe"]["accuracy"]) == {"mnist", "svhn"}
  assert set(res["table1_probe"]["accuracy_joint"]) == {"mnist", "svhn"}


@pytest.mark.slow
def test_evaluate_command_on_a_tiny_run(tmp_path):
  """experiments/evaluate.py on an mmvae_plus workdir: every part, including likelihoods (the
  proposals are the posteriors over (z, w_1, w_2)) and the figures."""
  import os
  import subprocess
  import sys
  wd = _tiny_run(tmp_path)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run(
      [sys.executable, os.path.join(repo, "experiments", "evaluate.py"), f"--workdir={wd}",
       "--num_test=16", "--probe_num_train=16", "--llik_k=2", "--llik_num=4", "--llik_chunk=2",
       "--kl_num=4", "--traversal_steps=2", "--batch_size=8", "--classifier_epochs=1",
       "--joint_num=8", f"--classifier_cache={tmp_path / 'cache'}"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=repo, capture_output=True, text=True,
      timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads((wd / "results.json").read_text())
  assert out["model"] == "mmvae_plus"
  assert out["table3_likelihoods"]["proposals"]["mnist,svhn"] == 2
  assert len(list(wd.glob("*.png"))) >= 2


@pytest.mark.parametrize("changes, needle", [
    ({"estimator": "dreg_moe"}, "--estimator=dreg_moe"),
    ({"missing": "svhn:0.5"}, "--missing: model mmvae_plus"),
])
def test_config_refuses_what_mmvae_plus_does_not_do(changes, needle):
  from mmvae_jax.config import RunConfig
  config = dataclasses.replace(RunConfig(experiment="mnist_svhn", model="mmvae_plus"), **changes)
  with pytest.raises(ValueError, match=re.escape(needle)):
    config.validate()
