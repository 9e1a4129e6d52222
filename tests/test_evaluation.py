"""Evaluation metrics on cases with known answers (tiny models, synthetic data).

A "perfect" MMVAE reads the digit off a one-hot row of each image (encoder), puts it in the
latent as 10·one-hot (posterior scale 1e-3) and writes it back as a one-hot row (decoder); a
parameter-free "classifier" takes the argmax of that row. Its cross, subset and joint coherence
are 100%; with labels shuffled against the images, cross coherence is chance (~10%); decoders
reading independent latent dimensions make joint coherence chance.
"""
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
from mmvae_jax.evaluation import classifiers as clf_lib
from mmvae_jax.evaluation import coherence, common, figures, likelihood, probe
from mmvae_jax.models import MMVAE, Modality, components
import tiny_models
from tiny_models import TWO_SHAPES, tiny_model, tiny_xs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NC = 10


# ---------------------------------------------------------------------------------------------
# The perfect model and its data.


class OneHotEncoder(nn.Module):
  """x (B, 2, 10, C) -> loc 10·(row 0 averaged over channels), tiled to D; constant scale."""
  latent_dim: int

  @nn.compact
  def __call__(self, x):
    self.param("unused", nn.initializers.zeros, ())
    row = jnp.mean(x[:, 0, :, :], axis=-1)  # (B, 10)
    reps = -(-self.latent_dim // NC)
    loc = 10.0 * jnp.tile(row, (1, reps))[:, :self.latent_dim]
    return loc, jnp.zeros_like(loc)


class OneHotDecoder(nn.Module):
  """z (..., D) -> image (..., 2, 10, C) with softmax(5·z[offset:offset+10]) in row 0."""
  channels: int
  offset: int = 0

  @nn.compact
  def __call__(self, z):
    self.param("unused", nn.initializers.zeros, ())
    row = jax.nn.softmax(5.0 * z[..., self.offset:self.offset + NC], axis=-1)
    img = jnp.stack([row, jnp.zeros_like(row)], axis=-2)  # (..., 2, 10)
    return jnp.repeat(img[..., None], self.channels, axis=-1)


class RowArgmax(nn.Module):
  """Parameter-free digit "classifier": logits = row 0 of the image (channel mean)."""

  @nn.compact
  def __call__(self, x):
    return 10.0 * jnp.mean(x[:, 0, :, :], axis=-1)


CHANNELS = (1, 3, 4)


def perfect_model(num_modalities=2, latent_dim=20, offsets=None):
  offsets = offsets or [0] * num_modalities
  mods = tuple(Modality(name=f"m{i}", encoder=OneHotEncoder(latent_dim),
                        decoder=OneHotDecoder(CHANNELS[i], offsets[i]),
                        data_shape=(2, NC, CHANNELS[i]), llik_scale=1.0 + i,
                        posterior_scale=lambda pre: jnp.full_like(pre, 1e-3))
               for i in range(num_modalities))
  return MMVAE(modalities=mods, latent_dim=latent_dim)


def onehot_dataset(n=1000, num_modalities=2, seed=0, shuffle_labels=False):
  rng = np.random.default_rng(seed)
  srcs = []
  for i in range(num_modalities):
    digits = rng.integers(0, NC, size=n)
    img = np.zeros((n, 2, NC, CHANNELS[i]), np.float32)
    img[np.arange(n), 0, digits, :] = 1.0
    img += rng.uniform(0, 0.05, size=img.shape).astype(np.float32)
    labels = rng.permutation(digits) if shuffle_labels else digits
    srcs.append(data.source_from_arrays(np.clip(img, 0, 1), labels, f"m{i}"))
  return data.PairedDataset(srcs, partners=1, seed=seed)


def row_classifiers(model):
  return {n: clf_lib.Classifier(module=RowArgmax(), params={}) for n in model.names}


# ---------------------------------------------------------------------------------------------
# Coherence.


def test_cross_coherence_perfect_model_is_100():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  ds = onehot_dataset()
  out = coherence.cross_coherence(model, params, ds, row_classifiers(model), key=jax.random.key(1),
                                  batch_size=128)
  assert out["num"] == len(ds)
  assert set(out["cross"]) == {"m0->m1", "m1->m0"}
  for v in list(out["cross"].values()) + list(out["reconstruction"].values()):
    assert v == pytest.approx(100.0)


def test_cross_coherence_shuffled_labels_is_chance():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  ds = onehot_dataset(n=3000, shuffle_labels=True)
  out = coherence.cross_coherence(model, params, ds, row_classifiers(model), key=jax.random.key(1),
                                  batch_size=500)
  for v in out["cross"].values():
    assert 6.0 < v < 14.0, out


def test_cross_coherence_subset_is_random_not_first_rows():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  ds = onehot_dataset()
  rows = common.select_rows(len(ds), 100, seed=0)
  assert len(np.unique(ds.labels[rows])) == NC  # pairs are stored class by class
  out = coherence.cross_coherence(model, params, ds, row_classifiers(model), key=jax.random.key(1),
                                  num=100, batch_size=64)
  assert out["num"] == 100


def test_joint_coherence_perfect_and_independent():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  out = coherence.joint_coherence(model, params, row_classifiers(model), key=jax.random.key(2),
                                  num=10000, batch_size=2500)
  assert out["joint"] == pytest.approx(100.0) and out["num"] == 10000
  assert sum(out["class_counts"]["m0"]) == 10000
  # Decoder 1 reads latent dims 10..19, independent of decoder 0's dims 0..9 under the prior.
  model = perfect_model(offsets=[0, 10])
  out = coherence.joint_coherence(model, params, row_classifiers(model), key=jax.random.key(2),
                                  num=10000, batch_size=2500)
  assert 8.0 < out["joint"] < 12.0, out
  # ... while cross generation still works: the encoders fill both halves.
  ds = onehot_dataset(n=300)
  cross = coherence.cross_coherence(model, params, ds, row_classifiers(model),
                                    key=jax.random.key(1), batch_size=300)
  assert all(v == pytest.approx(100.0) for v in cross["cross"].values())


def test_subset_coherence_three_modalities():
  model = perfect_model(num_modalities=3)
  params = model.init(jax.random.key(0))
  ds = onehot_dataset(n=400, num_modalities=3)
  out = coherence.subset_coherence(model, params, ds, row_classifiers(model),
                                   key=jax.random.key(3), batch_size=200)
  assert len(out["by_subset"]) == 9  # 3 singletons × 2 targets + 3 pairs × 1 target
  assert "m0+m1->m2" in out["by_subset"] and "m2->m0" in out["by_subset"]
  assert set(out["by_size"]) == {"1", "2"}
  assert all(v == pytest.approx(100.0) for v in out["by_subset"].values())


def test_missing_classifier_is_one_line_error():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match="no classifier for modality 'm1'"):
    coherence.joint_coherence(model, params, {"m0": row_classifiers(model)["m0"]},
                              key=jax.random.key(0), num=10)


# ---------------------------------------------------------------------------------------------
# Latent probe.


def test_linear_probe_on_separable_latents_is_100():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  train, test = onehot_dataset(n=1500, seed=1), onehot_dataset(n=500, seed=2)
  out = probe.latent_probe(model, params, train, test, key=jax.random.key(0), epochs=2,
                           batch_size=64, lr=1e-2)
  assert out["num_test"] == len(test) and out["num_train"] == len(train)
  assert set(out["accuracy_joint"]) == {"m0", "m1"}  # probes on z ~ q(z | x_0, x_1) as well
  for v in list(out["accuracy"].values()) + list(out["accuracy_joint"].values()):
    assert v >= 99.0, out


def test_linear_probe_shuffled_labels_is_chance():
  model = perfect_model()
  params = model.init(jax.random.key(0))
  train = onehot_dataset(n=1500, seed=1, shuffle_labels=True)
  test = onehot_dataset(n=2000, seed=2, shuffle_labels=True)
  out = probe.latent_probe(model, params, train, test, key=jax.random.key(0), epochs=1,
                           batch_size=128, lr=1e-2)
  for v in out["accuracy"].values():
    assert 5.0 < v < 16.0, out


# ---------------------------------------------------------------------------------------------
# Likelihoods.


TINY_SHAPES = TWO_SHAPES


LLIK_K = 10


@functools.lru_cache(maxsize=None)
def _llik(chunk_size):
  """batch_log_likelihoods of the tiny model with K = 10 (compiled once per chunk size)."""
  model = tiny_model()
  params = model.init(jax.random.key(0))
  fn = jax.jit(functools.partial(likelihood.batch_log_likelihoods, model, num_samples=LLIK_K,
                                 chunk_size=chunk_size))
  return model, params, jax.device_get(fn(params, tiny_xs(), jax.random.key(4)))


def test_chunked_likelihood_equals_unchunked():
  _, _, full = _llik(None)
  _, _, chunked = _llik(3)  # 3 does not divide 10: the last chunk is masked
  for k in full:
    np.testing.assert_allclose(chunked[k], full[k], rtol=1e-5)
  assert full["given_one"].shape == (2, 2, 5) and full["given_all"].shape == (2, 5)


def test_likelihood_estimators_match_direct_formulas():
  """The MMVAE's estimates written out on the same samples: the joint ones are the official tight
  MoE-IWAE over the M·K samples of the mixture q(z | x_0, x_1), the conditionals use the experts."""
  model, params, out = _llik(3)
  xs = tiny_xs()
  key = jax.random.key(4)
  qs = model.encode(params, xs)
  joint = components(model.posterior(params, dict(zip(model.names, xs))))
  assert len(joint) == 2
  prior = model.prior(params)
  # Components in order: q(z | x_0), q(z | x_1), then the two of the mixture q(z | x_0, x_1).
  z_all = likelihood.sample_indexed(list(qs) + list(joint), key, jnp.arange(LLIK_K))
  z_one, z = z_all[:2], z_all[2:]  # (M, K, B, D) each
  lw = loss.log_weights(z, qs, model.log_likelihood_fn(params, xs), prior)  # λ inside
  np.testing.assert_allclose(out["joint_weighted"], loss.log_mean_exp(lw, (0, 1)), rtol=1e-5)
  ll = model.log_likelihoods(params, xs, z, weighted=False)  # (M_d, M_e, K, B)
  lp = jnp.sum(prior.log_prob(z), -1)
  lqmix = loss.moe_log_prob(qs, z)
  np.testing.assert_allclose(out["joint_unweighted"],
                             loss.log_mean_exp(lp + ll.sum(0) - lqmix, (0, 1)), rtol=1e-5)
  ll1 = model.log_likelihoods(params, xs, z_one, weighted=False)
  lp1 = jnp.sum(prior.log_prob(z_one), -1)
  for d in range(2):
    np.testing.assert_allclose(out["given_all"][d], loss.log_mean_exp(ll[d] + lp - lqmix, (0, 1)),
                               rtol=1e-5)
    for e in range(2):
      lq_e = jnp.sum(qs[e].log_prob(z_one[e]), -1)
      np.testing.assert_allclose(out["given_one"][d, e],
                                 loss.log_mean_exp(ll1[d, e] + lp1[e] - lq_e, 0), rtol=1e-5)
  # λ_0 = 3 for the 4x4x1 modality: the weighted joint differs from the unweighted one.
  assert not np.allclose(out["joint_weighted"], out["joint_unweighted"])


def test_log_likelihoods_over_a_dataset():
  model = tiny_model()
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=30)
  srcs = [data.source_from_arrays(rng.uniform(0, 1, (30,) + s).astype(np.float32), labels, f"m{i}")
          for i, s in enumerate(TINY_SHAPES)]
  ds = data.PairedDataset(srcs, partners=1)
  out = likelihood.log_likelihoods(model, params, ds, key=jax.random.key(0), num_samples=6,
                                   chunk_size=4, batch_size=8, num=20)
  assert out["num"] == 20 and out["num_samples"] == 6
  assert set(out["conditional"]) == {"log p(m0|m0,m1)", "log p(m1|m0,m1)", "log p(m0|m0)",
                                     "log p(m0|m1)", "log p(m1|m0)", "log p(m1|m1)"}
  assert out["lambda"] == {"m0": 3.0, "m1": 1.0} and "INSIDE" in out["convention"]
  assert out["proposals"] == {"m0": 1, "m1": 1, "m0,m1": 2}  # the joint: the mixture of experts
  assert all(np.isfinite(v) for v in out["conditional"].values())


# ---------------------------------------------------------------------------------------------
# Digit classifiers.


def test_classifier_parameter_counts():
  m = clf_lib.DigitClassifier()
  for shape, count in (((28, 28, 1), 21840), ((32, 32, 3), 31340), ((16, 16, 1), 6840)):
    p = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1,) + shape))["params"]
    assert clf_lib.num_params(p) == count, shape
  with pytest.raises(ValueError, match="at least 16x16"):
    m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def easy_digits(n, seed, shape=(16, 16, 1)):
  """10 fixed random binary templates (seed 123) plus noise: an easy 10-class problem."""
  templates = (np.random.default_rng(123).uniform(size=(NC,) + shape) > 0.5).astype(np.float32)
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NC, size=n)
  x = 0.7 * templates[y] + 0.3 * rng.uniform(size=(n,) + shape)
  return (x * 255).astype(np.uint8), y.astype(np.int32)


def test_classifier_learns_easy_digits(tmp_path):
  shape = (28, 28, 1)
  xtr, ytr = easy_digits(800, 0, shape)
  xte, yte = easy_digits(300, 1, shape)
  out = clf_lib.load_or_train("easy", xtr, ytr, xte, yte, epochs=3, batch_size=32,
                              cache_dir=str(tmp_path))
  assert out.trained and out.test_accuracy >= 95.0, out.test_accuracy
  assert clf_lib.accuracy(out, xte, yte) == pytest.approx(out.test_accuracy)
  assert out.meta["num_params"] == 21840 and out.meta["test_accuracy"] == out.test_accuracy


def test_classifier_cache_reuse_and_retrain(tmp_path, monkeypatch):
  calls = []

  def fake_train(fetch, num_train, input_shape, *, epochs, seed=0, module=None, **kw):
    calls.append(epochs)  # no training: fresh parameters are enough to test the cache
    return module.init(jax.random.key(len(calls)), jnp.zeros((1,) + tuple(input_shape)))["params"]
  monkeypatch.setattr(clf_lib, "train_classifier", fake_train)

  xtr, ytr = easy_digits(64, 0)
  xte, yte = easy_digits(32, 1)
  kw = dict(epochs=3, cache_dir=str(tmp_path), seed=0)
  first = clf_lib.load_or_train("easy", xtr, ytr, xte, yte, **kw)
  assert first.trained and calls == [3]
  assert sorted(os.listdir(first.path)) == ["meta.json", "params.msgpack", "params.sha256"]
  assert os.path.basename(first.path).startswith("easy-16x16x1-source-e3-s0-")
  assert first.checksum == clf_lib.checksum(first.params)
  with open(os.path.join(first.path, "params.sha256")) as f:
    assert f.read().split()[0] == first.checksum

  second = clf_lib.load_or_train("easy", xtr, ytr, xte, yte, **kw)
  assert not second.trained and len(calls) == 1  # reused, not retrained
  assert second.checksum == first.checksum and second.test_accuracy == first.test_accuracy
  np.testing.assert_array_equal(second.predict(xte), first.predict(xte))

  with open(os.path.join(first.path, "params.sha256"), "w") as f:
    f.write("0" * 64 + "  params.msgpack\n")  # corrupted checksum
  third = clf_lib.load_or_train("easy", xtr, ytr, xte, yte, **kw)
  assert third.trained and len(calls) == 2

  with open(os.path.join(first.path, "params.msgpack"), "ab") as f:
    f.write(b"x")  # params no longer match their checksum
  assert clf_lib.load_or_train("easy", xtr, ytr, xte, yte, **kw).trained and len(calls) == 3
  os.remove(os.path.join(first.path, "meta.json"))
  assert clf_lib.load_or_train("easy", xtr, ytr, xte, yte, **kw).trained and len(calls) == 4
  assert not clf_lib.load_or_train("easy", xtr, ytr, xte, yte, **kw).trained

  assert clf_lib.load_or_train("easy", xtr, ytr, xte, yte, retrain=True, **kw).trained
  assert len(calls) == 5
  # Other data, another epoch count or another recipe never reuse this entry.
  other = clf_lib.load_or_train("easy", xtr[:32], ytr[:32], xte, yte, **kw)
  assert other.trained and other.path != first.path
  assert clf_lib.load_or_train("easy", xtr, ytr, xte, yte, epochs=1, cache_dir=str(tmp_path)).trained
  assert calls[-1] == 1


def test_default_classifier_epochs():
  assert clf_lib.default_epochs("source", 60000) == 7      # MNIST: 235 steps an epoch
  assert clf_lib.default_epochs("source", 73257) == 6      # SVHN
  assert clf_lib.default_epochs("source", 7291) == 52      # usps_colour: 29 steps an epoch
  assert clf_lib.default_epochs("source", 10**7) == 5
  assert clf_lib.default_epochs("paired", 1682040) == 30


def test_classifier_on_paired_set(tmp_path):
  xtr, ytr = easy_digits(200, 0)
  xte, yte = easy_digits(100, 1)
  srcs = [data.source_from_arrays(xtr, ytr, "a"), data.source_from_arrays(xtr[::-1], ytr[::-1], "b")]
  paired = data.PairedDataset(srcs, partners=2)
  test_src = data.source_from_arrays(xte, yte, "b")
  out = clf_lib.for_paired(paired, 1, test_src, epochs=1, batch_size=64, cache_dir=str(tmp_path))
  assert out.trained and out.meta["recipe"] == "paired" and out.meta["num_train"] == len(paired)
  assert "-paired-e1-" in out.path


# ---------------------------------------------------------------------------------------------
# Figures.


def test_figures_and_traversals(tmp_path):
  model = tiny_model()
  params = model.init(jax.random.key(0))
  params["prior"]["scale_logits"] = jnp.asarray([0.0, 1.0, -1.0])
  xs = tiny_xs(b=6)
  key = jax.random.key(0)
  figures.generation_grid(model, params, key, str(tmp_path / "gen.png"), num=16)
  figures.reconstruction_grid(model, params, [np.asarray(x) for x in xs], key,
                              str(tmp_path / "rec.png"))
  out = figures.latent_traversals(model, params, [np.asarray(x[:1]) for x in xs],
                                  str(tmp_path / "trav.png"), steps=5)
  scale = 3 * jax.nn.softmax(params["prior"]["scale_logits"])
  np.testing.assert_allclose(out["prior_std"], np.sqrt(2) * scale, rtol=1e-6)  # Laplace std
  assert out["images"][("m0", "m1")].shape == (3, 5, 4, 4, 3)
  lat = figures.traversal_latents(jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray(out["prior_std"]), 5)
  np.testing.assert_allclose(lat[1, :, 1], 2.0 + np.linspace(-5, 5, 5) * out["prior_std"][1],
                             rtol=1e-6)
  np.testing.assert_allclose(lat[1, :, 0], 1.0)
  stats = figures.kl_statistics(model, params, xs)
  assert stats["prior"]["m0"].shape == (6, 3) and stats["symmetric"]["m0|m1"].shape == (6, 3)
  qs = model.encode(params, xs)
  from mmvae_jax.distributions import kl_divergence
  np.testing.assert_allclose(stats["prior"]["m1"].sum(-1), kl_divergence(qs[1], model.prior(params)),
                             rtol=1e-5)
  figures.kl_boxplot(stats, str(tmp_path / "kl.png"))
  for name in ("gen.png", "rec.png", "trav.png", "kl.png"):
    assert (tmp_path / name).stat().st_size > 500, name
  json.dumps(figures.kl_summary(stats))


# ---------------------------------------------------------------------------------------------
# The command.

EVALUATE = os.path.join(REPO, "experiments", "evaluate.py")


def _npz(path, shape, n_train, n_test, seed):
  tiny_models.digits_npz(path, shape, n_train, n_test, seed, num_classes=NC)


def _evaluate(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, EVALUATE, *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _trained_mnist_svhn(tmp_path):
  """A one-step MNIST-SVHN MMVAE run on random images; the SVHN modality reads a 16×16×3
  stand-in (an MLP modality: fast on a CPU). λ_MNIST is set to the paper's 3072/784."""
  mnist, standin = tmp_path / "mnist.npz", tmp_path / "standin.npz"
  _npz(mnist, (28, 28), 60, 40, 0)
  _npz(standin, (16, 16, 3), 60, 40, 1)
  config = experiments.get("mnist_svhn").config(
      sources={"mnist": str(mnist), "svhn": str(standin)}, k=2, batch_size=8, latent_dim=4,
      partners=1, max_steps=1, eval_batches=1, figures=False, llik_scaling=3072 / 784, seed=1)
  wd = tmp_path / "run"
  runs.train_run(config, str(wd), progress=False)
  return wd


def test_evaluate_command_on_a_stand_in_run(tmp_path):
  """experiments/evaluate.py end to end on a trained run (stand-in SVHN data)."""
  wd = _trained_mnist_svhn(tmp_path)
  # Cached (untrained) classifiers under the keys evaluate.py computes: it must load, not train.
  for name, shape in (("mnist", (28, 28, 1)), ("standin", (16, 16, 3))):
    src = data.load_source(str(tmp_path / f"{name}.npz"), "train")
    key = clf_lib.source_key(src.name, shape, "source", 1, 1,
                             clf_lib.data_fingerprint(src.images, src.labels))
    params = clf_lib.DigitClassifier().init(jax.random.key(0), jnp.zeros((1,) + shape))["params"]
    clf_lib.save(str(tmp_path / "cache" / key), params, {"test_accuracy": 12.5})
  res = _evaluate(f"--workdir={wd}", "--num_test=16", "--probe_num_train=16",
                  "--classifier_epochs=1", "--llik_k=4", "--llik_num=4", "--llik_chunk=3",
                  "--joint_num=20", "--kl_num=8", "--traversal_steps=3", "--batch_size=8",
                  f"--classifier_cache={tmp_path / 'cache'}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "NOT SVHN" in res.stdout and "Table 1" in res.stdout and "Table 3" in res.stdout
  assert "paper MMVAE" in res.stdout and "86.4" in res.stdout  # the paper's Table 2 row
  assert res.stdout.count("test accuracy 12.50% on its own test split; loaded") == 2
  out = json.loads((wd / "results.json").read_text())
  assert out["sources"]["svhn"]["genuine"] is False and out["notice"]
  assert out["sources"]["mnist"]["genuine"] is True
  assert set(out["table2_coherence"]["cross"]["cross"]) == {"mnist->svhn", "svhn->mnist"}
  assert out["table3_likelihoods"]["num_samples"] == 4
  assert out["table3_likelihoods"]["lambda"]["mnist"] == pytest.approx(3072 / 784)
  assert out["table1_probe"]["num_test"] == 16
  assert out["settings"]["likelihood"]["llik_k"] == 4 and "llik_k" not in out["settings"]["probe"]
  for name in ("generation", "reconstruction", "traversals", "kl"):
    assert (wd / f"eval_{name}.png").exists()
  json.dumps(out, ensure_ascii=True)  # plain ASCII keys
  assert all(k.isascii() for k in out["table2_coherence"]["subsets"]["by_subset"])
  # Another part with other sizes keeps the results of the parts not run now.
  import mmvae_jax
  from mmvae_jax.evaluation import report
  run = mmvae_jax.load_run(str(wd))
  lines = []
  again = report.evaluate(run, report.Settings(parts=("likelihood",), llik_k=2, llik_num=4),
                          say=lines.append)
  assert any("keeping the results of parts not run now" in line for line in lines)
  assert again == json.loads((wd / "results.json").read_text())
  assert again["table3_likelihoods"]["num_samples"] == 2
  assert again["table1_probe"] == out["table1_probe"] and "figures" in again
  assert again["settings"]["likelihood"]["llik_k"] == 2
  assert again["settings"]["probe"] == out["settings"]["probe"]
  # Bad input is a one-line error, exit code 2 (the library raises ValueError).
  for args, text in (([f"--workdir={tmp_path / 'none'}"], "run.json not found"),
                     ([f"--workdir={wd}", "--parts=probe,tables"], "unknown --parts entry 'tables'")):
    res = _evaluate(*args)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, (args, res.stderr)
    assert res.stderr.startswith("evaluate.py: error: ") and text in res.stderr, (args, res.stderr)
  with pytest.raises(runs.RunError, match="no checkpoint step 99"):  # --step=99: the same way
    mmvae_jax.load_run(str(wd), 99)
  with pytest.raises(ValueError, match="name=spec"):
    report.parse_sources(["svhn"])
  with pytest.raises(ValueError, match="modality 'usps'"):
    report.with_overrides(run, sources={"usps": "usps.npz"})
  with pytest.raises(ValueError, match="--llik_k must be >= 1"):
    report.Settings(llik_k=0).validate()
  other = report.with_overrides(run, sources={"svhn": str(tmp_path / "mnist.npz")})
  with pytest.raises(ValueError, match="shape"):  # 28×28×1 images in the 16×16×3 modality
    report.evaluate(other, report.Settings(parts=("probe",)), say=lines.append)


def _subsample(src, dst, n_train, n_test, seed=0):
  """The first rows of a random order of a real data array (a small, class-mixed sample)."""
  d = np.load(src)
  rng = np.random.default_rng(seed)
  tr = rng.permutation(len(d["y_train"]))[:n_train]
  te = rng.permutation(len(d["y_test"]))[:n_test]
  np.savez(dst, x_train=d["x_train"][tr], y_train=d["y_train"][tr], x_test=d["x_test"][te],
           y_test=d["y_test"][te])


@pytest.mark.slow
def test_evaluate_three_digits_end_to_end(tmp_path, shared_data):
  """A three_digits run (M = 3, real data, the paper's networks) trained for two steps, then
  evaluated: coherence from all six proper subsets, joint coherence, probe, likelihoods."""
  for name in ("mnist", "usps_colour", "usps"):
    _subsample(shared_data / f"{name}.npz", tmp_path / f"{name}.npz", 500, 200)
  config = experiments.get("three_digits").config(
      data_dir=str(tmp_path), k=2, batch_size=16, partners=2, max_steps=2, eval_batches=1,
      figures=False)
  wd = tmp_path / "run"
  runs.train_run(config, str(wd), progress=False)
  res = _evaluate(f"--workdir={wd}", "--num_test=64", "--probe_num_train=256",
                  "--classifier_epochs=1", "--llik_k=4", "--llik_num=16", "--joint_num=64",
                  "--kl_num=32", "--traversal_steps=3", f"--classifier_cache={tmp_path / 'c'}")
  assert res.returncode == 0, res.stderr[-3000:]
  out = res.stdout
  names = ("mnist", "usps_colour", "usps")
  subsets = [(a,) for a in names] + [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
  for s in subsets:  # every target outside each of the six proper subsets
    for t in (n for n in names if n not in s):
      assert f"{'+'.join(s)}->{t} " in out, (s, t)
  assert "joint coherence: " in out and "Latent linear probe" in out and "Table 1" in out
  assert "Log-likelihoods" in out and "log p(x1..xM) [lambda]" in out
  assert "NOTICE" not in out and "paper" not in out.split("Table 1")[1].split("\n")[1]
  res_json = json.loads((wd / "results.json").read_text())
  assert len(res_json["table2_coherence"]["subsets"]["by_subset"]) == 9
  assert set(res_json["table1_probe"]["accuracy_joint"]) == set(names)
  assert res_json["table3_likelihoods"]["proposals"]["mnist,usps_colour,usps"] == 3
  assert len(res_json["table3_likelihoods"]["conditional"]) == 12  # 3 given all + 9 given one


@pytest.mark.slow
def test_evaluate_end_to_end(tmp_path, shared_data):
  """The MNIST-SVHN script and its real networks on real MNIST and the usps_colour stand-in."""
  wd = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", "mnist_svhn.py"),
                  f"--mnist={shared_data / 'mnist.npz'}", f"--svhn={shared_data / 'usps_colour.npz'}",
                  f"--workdir={wd}", "--max_steps=3", "--k=2", "--batch_size=16",
                  "--eval_batches=1"], check=True, env=env, cwd=REPO)
  res = _evaluate(f"--workdir={wd}", "--num_test=64", "--probe_epochs=1",
                  "--probe_num_train=256", "--classifier_epochs=1", "--llik_k=4",
                  "--llik_num=8", "--joint_num=64", f"--classifier_cache={tmp_path / 'c'}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "NOT SVHN" in res.stdout
  out = json.loads((wd / "results.json").read_text())
  assert set(out) >= {"table1_probe", "table2_coherence", "table3_likelihoods", "sources"}
  assert (wd / "eval_generation.png").exists()


def test_tables_of_three_modalities_name_every_direction():
  """The printed Tables 1-3 of an M = 3 run (no paper numbers): every subset direction."""
  from mmvae_jax.evaluation import report
  names = ["a", "b", "c"]
  subsets = coherence.proper_subsets(names)
  by_subset = {coherence.direction(s, t): 50.0 + i
               for i, (s, t) in enumerate((s, t) for s in subsets for t in names if t not in s)}
  results = {"model": "mmvae", "modalities": names, "paper": {},
             "sources": {n: {"label": n.upper()} for n in names}}
  coh = {"cross": {"cross": {k: v for k, v in by_subset.items() if "+" not in k},
                   "reconstruction": {f"{n}->{n}": 99.0 for n in names}, "num": 8},
         "joint": {"joint": 12.5, "class_counts": {n: [8] + [0] * 9 for n in names}, "num": 8},
         "subsets": {"by_subset": by_subset, "by_size": {"1": 52.5, "2": 57.0}, "num": 8}}
  cond = {f"log p({d}|a,b,c)": -1.0 for d in names}
  cond.update({f"log p({d}|{e})": -2.0 for d in names for e in names})
  llik = {"joint_weighted": -3.0, "joint_unweighted": -4.0, "conditional": cond,
          "lambda": {n: 1.0 for n in names}, "proposals": {"a": 1, "b": 1, "c": 1, "a,b,c": 3},
          "num_samples": 4, "num": 8}
  probe_res = {"accuracy": {n: 90.0 for n in names}, "accuracy_joint": {n: 95.0 for n in names},
               "epochs": 1, "num_train": 8, "num_test": 8}
  lines = []
  report.print_table1(probe_res, results, lines.append)
  report.print_table2(coh, results, lines.append)
  report.print_table3(llik, results, lines.append)
  out = "\n".join(lines)
  assert len(by_subset) == 9 and all(f"{d} " in out for d in by_subset)
  assert "a+b->c" in out and "joint coherence: 12.50%" in out and "|S| = 2: 57.00%" in out
  assert "MMVAE (joint) ours" in out and "paper " not in out and "   paper" not in out
  assert "mixture of 3" in out and out.split("Table 3")[1].count(" ours ") == 6  # its rows
  json.dumps(results, ensure_ascii=True)
