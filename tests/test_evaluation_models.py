"""Evaluation of every model through the model protocol: MVAE (product of experts), single-
modality VAEs, and a model whose single-modality posteriors are mixtures.

* the latent probe samples each model's own posteriors (the MVAE's "single": prior expert ×
  expert m; "both": prior × every expert), not its bare experts;
* the Table 3 estimates use the model's posteriors as proposals, mixtures stratified (checked
  against a direct computation on the same samples);
* `mmvae_jax.evaluation.report` evaluates trained runs of each model kind;
* ``--compare`` combines evaluated workdirs into one table per paper table.

Tiny models and synthetic data only.
"""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae_jax import data, experiments, loss, runs
from mmvae_jax.evaluation import figures, likelihood, probe, report
from mmvae_jax.models import MMVAE, MVAE, Modality, UniformMixture, components, single_vae
import tiny_models
from tiny_models import TWO_SHAPES, tiny_modalities, tiny_xs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "experiments", "evaluate.py")
NC = 10


def _evaluate(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, EVALUATE, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# A toy whose bare experts are useless to a linear probe but whose PoE posteriors are perfect.
#
# Expert m reads the digit off row 0 of its image: loc = 10·one-hot(digit), with scale 0.01 on
# the digit's dimension and 100 on every other one. Bare-expert samples bury the signal (10) under
# N(0, 100²) noise in nine dimensions; in the product with the N(0, I) prior expert those
# dimensions become N(0, ~1) while the digit's stays at ~10, so a linear probe reads it off.


class RowEncoder(nn.Module):
  """x (B, 2, 10, C) -> (10·row, 2·row − 1): the pre-activation is > 0 on the digit only."""

  @nn.compact
  def __call__(self, x):
    self.param("unused", nn.initializers.zeros, ())
    row = jnp.mean(x[:, 0, :, :], axis=-1)
    return 10.0 * row, 2.0 * row - 1.0


class RowDecoder(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, z):
    self.param("unused", nn.initializers.zeros, ())
    row = jax.nn.softmax(z, axis=-1)
    img = jnp.stack([row, jnp.zeros_like(row)], axis=-2)
    return jnp.repeat(img[..., None], self.channels, axis=-1)


def toy_scale(pre):
  return jnp.where(pre > 0, 0.01, 100.0)


CHANNELS = (1, 3)


def toy_modalities():
  return tuple(Modality(name=f"m{i}", encoder=RowEncoder(), decoder=RowDecoder(c),
                        data_shape=(2, NC, c), posterior_family="normal", posterior_scale=toy_scale)
               for i, c in enumerate(CHANNELS))


def toy_dataset(n, seed):
  rng = np.random.default_rng(seed)
  srcs = []
  for i, c in enumerate(CHANNELS):
    digits = rng.integers(0, NC, size=n)
    img = np.zeros((n, 2, NC, c), np.float32)
    img[np.arange(n), 0, digits, :] = 1.0
    img += rng.uniform(0, 0.05, size=img.shape).astype(np.float32)
    srcs.append(data.source_from_arrays(np.clip(img, 0, 1), digits, f"m{i}"))
  return data.PairedDataset(srcs, partners=1, seed=seed)


def test_probe_uses_the_product_of_experts_for_an_mvae():
  mvae = MVAE(modalities=toy_modalities(), latent_dim=NC, expert_scale="modality")
  bare = MMVAE(modalities=toy_modalities(), latent_dim=NC, prior_family="normal")  # q_m itself
  train, test = toy_dataset(800, 1), toy_dataset(400, 2)
  kw = dict(key=jax.random.key(0), epochs=2, batch_size=64, lr=5e-2)
  out = probe.latent_probe(mvae, mvae.init(jax.random.key(0)), train, test, **kw)
  ref = probe.latent_probe(bare, bare.init(jax.random.key(0)), train, test, **kw)
  assert set(out["accuracy_joint"]) == {"m0", "m1"} == set(ref["accuracy_joint"])
  for n in ("m0", "m1"):
    assert out["accuracy"][n] >= 97.0, out          # MVAE (single): PoE of prior and q_m
    assert out["accuracy_joint"][n] >= 97.0, out    # MVAE (both): PoE of prior, q_0, q_1
    assert ref["accuracy"][n] <= 30.0, ref          # the bare expert: noise of scale 100
    assert ref["accuracy_joint"][n] <= 30.0, ref    # the mixture of the bare experts


def test_probe_samples_have_the_poe_statistics():
  """The probe's latents for an MVAE are samples of model.posterior (mean, std, per view)."""
  mvae = MVAE(modalities=toy_modalities(), latent_dim=NC, expert_scale="modality")
  params = mvae.init(jax.random.key(0))
  xs, _ = toy_dataset(50, 0).gather(np.zeros(20000, np.int64))  # one pair, repeated
  xs = tuple(jnp.asarray(x) for x in xs)
  views = probe.probe_views(mvae)
  assert views == [("m0", ("m0",)), ("m1", ("m1",)), ("m0@joint", ("m0", "m1")),
                   ("m1@joint", ("m0", "m1"))]
  zs = jax.jit(lambda p, x, k: probe._sample(mvae, p, x, k, views))(  # pylint: disable=protected-access
      params, xs, jax.random.key(3))
  for (_, observed), z in zip(views, zs):
    q = mvae.posterior(params, {n: xs[int(n[1])] for n in observed})
    np.testing.assert_allclose(np.mean(z, 0), q.loc[0], atol=0.05)
    np.testing.assert_allclose(np.std(z, 0), q.scale[0], rtol=0.05)
  # The single view is the product with the prior expert, not the bare expert (scale 100).
  assert float(np.max(np.std(zs[0], 0))) < 1.05


# ---------------------------------------------------------------------------------------------
# Likelihoods with PoE proposals.


TINY_SHAPES = TWO_SHAPES
LLIK_K = 10


@functools.lru_cache(maxsize=None)
def _mvae_llik(chunk_size):
  model = MVAE(modalities=tiny_modalities(), latent_dim=3)
  params = model.init(jax.random.key(0))
  fn = jax.jit(functools.partial(likelihood.batch_log_likelihoods, model, num_samples=LLIK_K,
                                 chunk_size=chunk_size))
  return model, params, jax.device_get(fn(params, tiny_xs(), jax.random.key(4)))


def test_mvae_likelihoods_use_poe_proposals():
  """Chunks of 3 (the last one masked) against the unchunked formulas on the same samples."""
  model, params, out = _mvae_llik(3)
  xs = tiny_xs()
  names = model.names

  @jax.jit
  def direct(params, xs, key):
    """The estimates written out, on the samples batch_log_likelihoods draws (unchunked)."""
    # The proposals: q(z | x_0), q(z | x_1), then the joint q(z | x_0, x_1), all PoE with the prior.
    qs = [model.posterior(params, {n: x}) for n, x in zip(names, xs)]
    qs.append(model.posterior(params, dict(zip(names, xs))))
    z = likelihood.sample_indexed(qs, key, jnp.arange(LLIK_K))  # (3, K, B, D)
    ll = model.log_likelihoods(params, xs, z, weighted=False)  # (M_d, 3, K, B)
    lp = jnp.sum(model.prior(params).log_prob(z), -1)
    lq = jnp.stack([jnp.sum(q.log_prob(z[j]), -1) for j, q in enumerate(qs)])
    lam = jnp.asarray([m.llik_scale for m in model.modalities])
    joint = lp[2] - lq[2]
    return {
        "joint_weighted": loss.log_mean_exp(joint + jnp.einsum("d,d...->...", lam, ll[:, 2]), 0),
        "joint_unweighted": loss.log_mean_exp(joint + ll[:, 2].sum(0), 0),
        "given_all": jnp.stack([loss.log_mean_exp(ll[d, 2] + joint, 0) for d in range(2)]),
        "given_one": jnp.stack([jnp.stack([loss.log_mean_exp(ll[d, e] + lp[e] - lq[e], 0)
                                           for e in range(2)]) for d in range(2)]),
    }

  ref = direct(params, xs, jax.random.key(4))
  for k, v in ref.items():
    np.testing.assert_allclose(out[k], v, rtol=1e-5, err_msg=k)
  # The single proposals are PoEs with the prior expert, not the bare experts.
  q0, bare = model.posterior(params, {"m0": xs[0]}), model.encode_one(params, "m0", xs[0])
  assert not np.allclose(q0.scale, bare.scale)
  np.testing.assert_allclose(1 / q0.scale ** 2, 1 + 1 / bare.scale ** 2, rtol=1e-5)


def test_likelihoods_over_a_dataset_for_mvae_and_single_vae():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=20)
  srcs = [data.source_from_arrays(rng.uniform(0, 1, (20,) + s).astype(np.float32), labels, f"m{i}")
          for i, s in enumerate(TINY_SHAPES)]
  model = MVAE(modalities=tiny_modalities(), latent_dim=3)
  out = likelihood.log_likelihoods(model, model.init(jax.random.key(0)),
                                   data.PairedDataset(srcs, partners=1), key=jax.random.key(0),
                                   num_samples=4, chunk_size=3, batch_size=8, num=12)
  assert out["proposals"] == {"m0": 1, "m1": 1, "m0,m1": 1}  # one product of experts each
  assert out["num"] == 12 and len(out["conditional"]) == 6
  assert all(np.isfinite(v) for v in out["conditional"].values())
  # A single-modality VAE: every estimate is the IWAE estimate of log p(x).
  vae = single_vae(tiny_modalities()[1], 3)
  out = likelihood.log_likelihoods(vae, vae.init(jax.random.key(0)),
                                   data.PairedDataset(srcs[1:], partners=1), key=jax.random.key(0),
                                   num_samples=4, chunk_size=3, batch_size=8, num=12)
  assert out["proposals"] == {"m1": 1} and set(out["conditional"]) == {"log p(m1|m1)"}
  assert out["joint_unweighted"] == pytest.approx(out["conditional"]["log p(m1|m1)"], rel=1e-5)


@dataclasses.dataclass(frozen=True)
class DoubledMMVAE(MMVAE):
  """An MMVAE whose every posterior lists each observed expert twice: a uniform mixture (also of
  a single modality) with the same density as the MMVAE's."""

  def posterior(self, params, observed):
    experts = tuple(self.expert(params, n, x) for n, x in observed.items())
    return UniformMixture(experts + experts)


def test_likelihoods_with_mixture_posteriors_of_single_modalities():
  """Any posterior may be a mixture: K samples per component, the mixture density, LME over all."""
  model = DoubledMMVAE(modalities=tiny_modalities(), latent_dim=3)
  params = model.init(jax.random.key(0))
  xs, key, k = tiny_xs(), jax.random.key(4), 6
  out = jax.jit(functools.partial(likelihood.batch_log_likelihoods, model, num_samples=k,
                                  chunk_size=4))(params, xs, key)
  names = model.names
  singles = [components(model.posterior(params, {n: x})) for n, x in zip(names, xs)]
  joint = components(model.posterior(params, dict(zip(names, xs))))
  assert [len(c) for c in singles] == [2, 2] and len(joint) == 4
  flat = [q for cs in singles for q in cs] + list(joint)
  z = likelihood.sample_indexed(flat, key, jnp.arange(k))  # (8, K, B, D)
  prior = model.prior(params)
  ll = model.log_likelihoods(params, xs, z, weighted=False)  # (M_d, 8, K, B)
  lp = jnp.sum(prior.log_prob(z), -1)
  lq = lambda cs, zz: jax.nn.logsumexp(jnp.stack([jnp.sum(q.log_prob(zz), -1) for q in cs]),
                                       0) - jnp.log(len(cs))
  lw_joint = lp[4:] - lq(joint, z[4:])  # (4, K, B)
  lam = jnp.asarray([m.llik_scale for m in model.modalities])
  np.testing.assert_allclose(out["joint_weighted"], loss.log_mean_exp(
      lw_joint + jnp.einsum("d,d...->...", lam, ll[:, 4:]), (0, 1)), rtol=1e-5)
  for d in range(2):
    np.testing.assert_allclose(out["given_all"][d],
                               loss.log_mean_exp(ll[d, 4:] + lw_joint, (0, 1)), rtol=1e-5)
    for e in range(2):
      s = slice(2 * e, 2 * e + 2)
      np.testing.assert_allclose(out["given_one"][d, e], loss.log_mean_exp(
          ll[d, s] + lp[s] - lq(singles[e], z[s]), (0, 1)), rtol=1e-5)
  # The probe samples these posteriors too; the per-dimension KLs need a single distribution.
  views = probe.probe_views(model)
  zs = probe._sample(model, params, xs, key, views)  # pylint: disable=protected-access
  assert len(zs) == 4 and all(z.shape == (5, 3) for z in zs)
  with pytest.raises(ValueError, match="mixture of 2 components"):
    figures.kl_statistics(model, params, xs)


# ---------------------------------------------------------------------------------------------
# Trained runs of each model kind (one step of mnist_svhn.py's construction, random images).


def _npz(path, shape, n_train, n_test, seed):
  tiny_models.digits_npz(path, shape, n_train, n_test, seed, num_classes=NC)


def _train(tmp_path, model):
  """A one-step run of `model` on MNIST-shaped images and a 16×16×3 SVHN stand-in (an MLP
  modality, fast on a CPU)."""
  mnist, standin = tmp_path / "mnist.npz", tmp_path / "usps_colour.npz"
  if not mnist.exists():
    _npz(mnist, (28, 28), 60, 40, 0)
    _npz(standin, (16, 16, 3), 60, 40, 1)
  config = experiments.get("mnist_svhn").config(
      model=model, sources={"mnist": str(mnist), "svhn": str(standin)}, k=2, batch_size=8,
      latent_dim=4, partners=1, max_steps=1, eval_batches=1, figures=False, learn_prior=False,
      seed=1)
  wd = tmp_path / model
  runs.train_run(config, str(wd), progress=False)
  return wd


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Workdirs of one-step mvae and vae_svhn runs."""
  tmp = tmp_path_factory.mktemp("runs")
  return {kind: _train(tmp, kind) for kind in ("mvae", "vae_svhn")}


def test_report_of_an_mvae_run(trained):
  import mmvae_jax
  run = mmvae_jax.load_run(str(trained["mvae"]))
  assert type(run.model) is MVAE and run.model.names == ("mnist", "svhn")
  lines = []
  res = report.evaluate(run, report.Settings(
      parts=("probe", "likelihood"), num_test=16, probe_num_train=16, batch_size=8, llik_k=3,
      llik_num=4, llik_chunk=2), say=lines.append)
  out = "\n".join(lines)
  assert res["model"] == "mvae" and set(res["table1_probe"]["accuracy_joint"]) == {"mnist", "svhn"}
  assert res["table3_likelihoods"]["proposals"] == {"mnist": 1, "svhn": 1, "mnist,svhn": 1}
  assert "MVAE (single) ours" in out and "MVAE (both) ours" in out and "95.7" in out
  assert "-176.68" in out  # the paper's MVAE row of Table 3
  assert "NOT SVHN" in out and res["notice"]
  assert res["paper"]["table2"]["mnist->svhn"] == 9.5
  assert "paper MVAE" not in out  # no coherence part run
  assert set(res["settings"]) == {"probe", "likelihood"}


def test_report_of_a_single_modality_vae(trained):
  import mmvae_jax
  run = mmvae_jax.load_run(str(trained["vae_svhn"]))
  assert run.model.names == ("svhn",) and run.model.modalities[0].llik_scale == 1.0
  lines = []
  res = report.evaluate(run, report.Settings(
      parts=("classifiers", "probe", "coherence", "likelihood"), num_test=16, probe_num_train=16,
      batch_size=8, llik_k=3, llik_num=4), say=lines.append)
  out = "\n".join(lines)
  assert "skipping classifiers, coherence" in out and "single-VAE ours" in out
  assert res["model"] == "vae_svhn" and set(res["table1_probe"]["accuracy"]) == {"svhn"}
  assert "accuracy_joint" not in res["table1_probe"]
  assert set(res["table3_likelihoods"]["conditional"]) == {"log p(svhn|svhn)"}
  assert "table2_coherence" not in res and "classifiers" not in res


def test_evaluate_rejects_unknown_model(trained, tmp_path):
  """A run.json naming an unknown model: one line, exit code 2."""
  info = json.loads((trained["mvae"] / "run.json").read_text())
  info["model"] = info["config"]["model"] = "poe"
  wd = tmp_path / "poe"
  wd.mkdir()
  (wd / "run.json").write_text(json.dumps(info))
  res = _evaluate(f"--workdir={wd}")
  assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
  assert "unknown model 'poe'" in res.stderr


# ---------------------------------------------------------------------------------------------
# experiments/evaluate.py --compare.

STANDIN = {"mnist": {"spec": "mnist.npz", "name": "mnist", "genuine": True, "label": "MNIST"},
           "svhn": {"spec": "usps_colour.npz", "name": "usps_colour", "genuine": False,
                    "label": "usps_colour (stand-in for SVHN)"}}


def _results(kind, acc, acc_joint=None, coherence=None, llik=None, slots=("mnist", "svhn")):
  res = {"model": kind, "experiment": "mnist_svhn", "modalities": list(slots),
         "sources": {s: STANDIN[s] for s in slots},
         "table1_probe": {"accuracy": acc, "epochs": 1, "num_train": 10, "num_test": 10}}
  if acc_joint:
    res["table1_probe"]["accuracy_joint"] = acc_joint
  if coherence:
    res["table2_coherence"] = {"cross": {"cross": {"mnist->svhn": coherence[1],
                                                   "svhn->mnist": coherence[2]}},
                               "joint": {"joint": coherence[0]}}
  if llik:
    res["table3_likelihoods"] = {"num_samples": 8, **llik}
  return res


def _llik(base):
  return {"joint_weighted": base, "joint_unweighted": base + 1,
          "conditional": {"log p(mnist|mnist,svhn)": base + 2, "log p(svhn|mnist,svhn)": base + 3,
                          "log p(mnist|mnist)": base + 4, "log p(svhn|svhn)": base + 5,
                          "log p(mnist|svhn)": base + 6, "log p(svhn|mnist)": base + 7}}


def _fake_workdirs(tmp_path):
  wds = {}
  contents = {
      "a_mmvae": {k: v for k, v in _results("mmvae", {"mnist": 81.25, "svhn": 61.5},
                                            coherence=(31.5, 71.5, 51.5),
                                            llik=_llik(-1000.0)).items() if k != "model"},
      "b_mvae": _results("mvae", {"mnist": 82.25, "svhn": 12.5}, {"mnist": 83.25, "svhn": 84.25},
                         coherence=(11.5, 12.25, 13.25), llik=_llik(-2000.0)),
      "c_vae": _results("vae_mnist", {"mnist": 77.75}, slots=("mnist",),
                        llik={"joint_weighted": -5.0, "joint_unweighted": -5.0,
                              "conditional": {"log p(mnist|mnist)": -555.5}}),
  }
  for name, res in contents.items():
    wd = tmp_path / name
    wd.mkdir()
    (wd / "results.json").write_text(json.dumps(res))
    wds[name] = wd
  (wds["a_mmvae"] / "run.json").write_text(json.dumps({"model": "mmvae"}))  # "model" from here
  return wds


def test_comparison_table_rows(tmp_path):
  wds = _fake_workdirs(tmp_path)
  entries = [(str(wd), json.loads((wd / "results.json").read_text())) for wd in wds.values()]
  comp = report.comparison_table(entries)
  t1 = {r["model"]: r for r in comp["table1"]}
  assert list(t1) == ["MMVAE", "MVAE (single)", "MVAE (both)", "single-VAE"]
  assert t1["MMVAE"]["ours"] == {"mnist": 81.25, "svhn": 61.5}
  assert t1["MVAE (single)"]["ours"] == {"mnist": 82.25, "svhn": 12.5}
  assert t1["MVAE (both)"]["ours"] == {"mnist": 83.25, "svhn": 84.25}
  assert t1["MVAE (both)"]["paper"] == {"mnist": 94.9, "svhn": 90.1}
  assert t1["single-VAE"]["ours"] == {"mnist": 77.75, "svhn": None}
  assert t1["single-VAE"]["paper"] == {"mnist": 85.3, "svhn": 20.7}
  t2 = {r["model"]: r for r in comp["table2"]}
  assert t2["MVAE"]["ours"] == {"joint": 11.5, "mnist->svhn": 12.25, "svhn->mnist": 13.25}
  assert t2["MVAE"]["paper"] == {"joint": 12.7, "mnist->svhn": 9.5, "svhn->mnist": 9.3}
  t3 = {(r["m"], r["model"]): r for r in comp["table3"]}
  assert t3[("mnist", "MVAE")]["ours"] == [-2000.0, -1998.0, -1996.0, -1994.0]
  assert t3[("svhn", "MVAE")]["paper"] == [None, 3395.12, 3536.86, -12747.50]
  assert t3[("mnist", "single-VAE")]["ours"] == [None, None, -555.5, None]
  assert ("svhn", "single-VAE") not in t3  # no SVHN single-VAE among the runs
  assert comp["stand_ins"] == {"svhn": ["usps_colour"]} and "NOT SVHN" in comp["notice"]
  json.dumps(comp)


def test_compare_command_prints_rows_and_fails_on_missing_results(tmp_path):
  wds = _fake_workdirs(tmp_path)
  res = _evaluate(f"--workdir={wds['a_mmvae']}",
                  f"--compare={wds['b_mvae']},{wds['c_vae']}", "--parts=none")
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  for text in ("Table 1 (comparison)", "Table 2 (comparison)", "Table 3 (comparison)",
               "MVAE (single)", "MVAE (both)", "single-VAE", "83.25", "95.7", "85.3", "77.75",
               "12.7", "11.50", "-176.68", "-1996.00", "-555.50", "NOT SVHN", "b_mvae", "c_vae"):
    assert text in out, text
  comp = json.loads((wds["a_mmvae"] / "results.json").read_text())["comparison"]
  assert [r["model"] for r in comp["table1"]] == ["MMVAE", "MVAE (single)", "MVAE (both)",
                                                  "single-VAE"]
  assert [r["model"] for r in comp["runs"]] == ["mmvae", "mvae", "vae_mnist"]
  # A compared workdir without results.json: one line, before any evaluation.
  res = _evaluate(f"--workdir={wds['a_mmvae']}", f"--compare={wds['b_mvae']},{tmp_path / 'none'}",
                  "--parts=none")
  assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
  assert "results.json not found" in res.stderr and "none" in res.stderr
  res = _evaluate(f"--workdir={wds['a_mmvae']}", "--parts=none")
  assert res.returncode == 2 and "--compare" in res.stderr


# ---------------------------------------------------------------------------------------------
# The whole command on trained runs of every kind (slow: run with --runslow).


@pytest.mark.slow
def test_evaluate_command_for_every_model_kind(tmp_path, trained):
  wds = dict(trained)
  for kind in ("mmvae", "vae_mnist"):
    wds[kind] = _train(trained["mvae"].parent, kind)
  common_flags = ["--num_test=16", "--probe_num_train=16", "--llik_k=4", "--llik_num=4",
                  "--llik_chunk=3", "--kl_num=8", "--traversal_steps=3", "--batch_size=8",
                  "--classifier_epochs=1", "--joint_num=20",
                  f"--classifier_cache={tmp_path / 'cache'}"]

  def evaluate(wd, *args):
    res = _evaluate(f"--workdir={wd}", *common_flags, *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads((wd / "results.json").read_text())

  for kind in ("vae_mnist", "vae_svhn"):
    out, res = evaluate(wds[kind])
    slot = kind[4:]
    assert "skipping classifiers, coherence" in out and "single-VAE ours" in out
    assert res["model"] == kind and set(res["table1_probe"]["accuracy"]) == {slot}
    assert set(res["table3_likelihoods"]["conditional"]) == {f"log p({slot}|{slot})"}
    assert "table2_coherence" not in res and "classifiers" not in res
    assert (wds[kind] / "eval_kl.png").exists()
  out, res = evaluate(wds["mmvae"])
  assert res["table3_likelihoods"]["proposals"]["mnist,svhn"] == 2
  assert set(res["table2_coherence"]["cross"]["cross"]) == {"mnist->svhn", "svhn->mnist"}
  out, res = evaluate(wds["mvae"], "--parts=probe,likelihood,figures",
                      f"--compare={wds['mmvae']},{wds['vae_mnist']},{wds['vae_svhn']}")
  assert res["model"] == "mvae" and set(res["table1_probe"]["accuracy_joint"]) == {"mnist", "svhn"}
  assert res["table3_likelihoods"]["proposals"] == {"mnist": 1, "svhn": 1, "mnist,svhn": 1}
  assert "MVAE (single) ours" in out and "paper MVAE" not in out  # no coherence part run
  assert "Table 1 (comparison)" in out and "NOT SVHN" in out
  assert [r["model"] for r in res["comparison"]["table1"]] == [
      "MMVAE", "MVAE (single)", "MVAE (both)", "single-VAE"]


@pytest.mark.slow
def test_evaluate_command_on_a_cub_run(tmp_path):
  """A CUB run (synthetic image features, a few captions) gets Table 4 through the cub module."""
  words = ["a", "small", "bird", "with", "red", "wings", "and", "black", "head", "tail"]
  rng = np.random.default_rng(0)
  caps = [" ".join(rng.choice(words, size=6)) + " ." for _ in range(80)]
  np.savez(tmp_path / "caps.npz", captions=np.array(caps),
           class_id=np.repeat(np.arange(8) % 2 + 1, 10))
  config = experiments.get("cub").config(
      model="mmvae", k=2, batch_size=4, max_steps=2, eval_batches=1, figures=False, partners=1,
      latent_dim=4, options={"captions": str(tmp_path / "caps.npz"), "synthetic_features": True,
                             "heldout_fraction": 0.25, "bn_batches": 1, "report_num": 4,
                             "num_examples": 1})
  wd = tmp_path / "run"
  runs.train_run(config, str(wd), devices=jax.devices()[:1], progress=False)
  res = _evaluate(f"--workdir={wd}", "--batch_size=2", "--joint_num=8", timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Table 4" in res.stdout and "SYNTHETIC" in res.stdout and "paper MMVAE" in res.stdout
  out = json.loads((wd / "results.json").read_text())
  assert out["table4"]["num"] == 8 and out["settings"]["table4"] == {"batch_size": 2,
                                                                      "joint_num": 8}
