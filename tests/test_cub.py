"""CUB: captions, networks (parameter counts, tied embedding, BatchNorm modes), data pairing,
NN lookup, CCA coherence, the feature-extraction script and the experiment's flag errors."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae_jax import distributions as dists
from mmvae_jax import networks_cub as N
from mmvae_jax.data import captions as cap
from mmvae_jax.data import cub
from mmvae_jax.evaluation import cca

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Captions.


def test_word_tokenize_treebank_rules():
  assert cap.word_tokenize("This bird's wing, it's RED & white (mostly).") == [
      "this", "bird", "'s", "wing", ",", "it", "'s", "red", "&", "white", "(", "mostly", ")", "."]
  assert cap.word_tokenize("it isn't 2.5 cm long; birds' beaks") == [
      "it", "is", "n't", "2.5", "cm", "long", ";", "birds", "'", "beaks"]


def test_vocabulary_rule_count_above_three_first_occurrence_order():
  toks = [["b", "a", "c"]] * 3 + [["a", "b", "d", "<pad>"]] + [["e"]] * 5
  v = cap.build_vocabulary(toks)
  # a: 4, b: 4 (> 3: in, first occurrence b before a), c: 3 (not > 3), d: 1, e: 5.
  assert v.words == ("<exc>", "<pad>", "<eos>", "b", "a", "e")
  assert v.total == 18
  assert list(v.counts) == [3 + 1 + 1, 0, 0, 4, 4, 5]  # <exc>: pooled c, d and the literal <pad>
  assert cap.build_vocabulary(toks, min_occurrence=4).words == cap.SPECIALS + ("e",)


def test_tokeniser_round_trip_truncation_and_oov(tmp_path):
  v = cap.build_vocabulary([["a", "small", "bird", "."]] * 4)
  ids, length = v.encode(cap.word_tokenize("A small bird."))
  assert ids.shape == (32,) and ids.dtype == np.int32 and length == 5
  assert list(ids[:5]) == [3, 4, 5, 6, cap.EOS] and np.all(ids[5:] == cap.PAD)
  assert v.decode(ids) == "a small bird ."
  assert v.decode(v.encode(["a", "huge", "bird"])[0]) == "a <exc> bird"
  long_ids, long_len = v.encode(["bird"] * 40)
  assert long_len == 32 and long_ids[31] == cap.EOS and np.all(long_ids[:31] == 5)
  v.save(str(tmp_path / "vocab.json"))
  w = cap.Vocabulary.load(str(tmp_path / "vocab.json"))
  assert w.words == v.words and np.array_equal(w.counts, v.counts) and w.total == v.total
  with pytest.raises(FileNotFoundError, match="no vocabulary file"):
    cap.Vocabulary.load(str(tmp_path / "missing.json"))


def test_real_test_captions(shared_data):
  f = cub.load_captions(str(shared_data / "cub_captions_test.npz"))
  assert len(f.captions) == 29330
  classes = cub.image_classes(f.class_ids)  # raises unless the 10 captions of an image agree
  cub.check_alignment(len(f.captions), len(classes))
  toks = cap.tokenize_all(f.captions)
  # About 2.3% of the test captions exceed 31 words (truncated to 31 + <eos>).
  frac = np.mean([len(t) > 31 for t in toks])
  assert 0.020 < frac < 0.026, frac
  v = cap.build_vocabulary(toks)
  ids, lengths = v.encode_all(toks)
  assert ids.shape == (29330, 32) and np.all(ids[np.arange(29330), lengths - 1] == cap.EOS)
  assert sum(c for w, c in zip(v.words, v.counts) if w != "<exc>") + v.counts[0] == v.total


# ---------------------------------------------------------------------------------------------
# Networks.


@pytest.fixture(scope="module")
def cub_params():
  """The official-size model (D = 64, V = 1590) and its parameter shapes (no computation)."""
  model = N.cub_model("mmvae", 64)
  return model, jax.eval_shape(model.init, jax.random.key(0))


@pytest.fixture(scope="module")
def small_model():
  """Official layers with D = 8 and a 40-word vocabulary; parameters N(0, 0.05²) (N(0, 1) for the
  embedding) at the shapes of `init` (flax init compiles for ~15 s on CPU; PyTorch init bounds
  are tested per layer)."""
  model = N.cub_model("mmvae", 8, vocab_size=40)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  rng = np.random.default_rng(0)
  fill = lambda path, s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32)
                                     * (1.0 if "embedding" in jax.tree_util.keystr(path) else 0.05))
  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def test_parameter_counts(cub_params):
  model, params = cub_params
  count = lambda side, name: N.count_params(params[side][name])
  assert count("encoders", "image") == 2_787_200
  assert count("decoders", "image") == 2_772_736
  assert count("encoders", "sentence") == 2_074_912
  assert count("decoders", "sentence") == 1_348_567          # tied matrix in the encoder
  assert count("decoders", "sentence") + 1590 * 128 == 1_552_087
  # Official total 8,983,543 also counts the frozen 64-entry prior mean.
  assert N.count_params(params) + 64 == 8_983_543
  cubs = jax.eval_shape(N.cub_model("vae_sentence", 64, variant="cubS").init, jax.random.key(1))
  assert N.count_params(cubs["encoders"]) == 762_048
  assert N.count_params(cubs["decoders"]) == 429_046


def test_model_families_and_lambda(small_model):
  model, params = small_model
  assert model.names == ("image", "sentence") and model.prior_family == "normal"
  assert [m.posterior_family for m in model.modalities] == ["normal", "normal"]
  prior = model.prior({"prior": {"scale_logits": jnp.zeros(8)}})  # as initialised
  assert isinstance(prior, type(dists.normal(0.0, 1.0)))
  np.testing.assert_allclose(prior.scale, np.log(2.0) + 1e-6, rtol=1e-6)  # softplus(0) + eta
  assert model.modality("image").llik_scale == pytest.approx(32 / 2048)
  assert N.cub_model("mmvae", 8, llik_scaling=0.002).modality("image").llik_scale == 0.002
  assert model.modality("sentence").llik_scale == 1.0


def _scatter_conv_transpose(x, kernel, stride, padding):
  """Reference: out[s·i + a − p] += x[i] · w_torch[a], w_torch = kernel flipped spatially."""
  n, h, w, _ = x.shape
  kh, kw, _, c_out = kernel.shape
  w_torch = kernel[::-1, ::-1]
  oh, ow = (h - 1) * stride[0] + kh - 2 * padding[0], (w - 1) * stride[1] + kw - 2 * padding[1]
  out = np.zeros((n, oh + 2 * padding[0] + kh, ow + 2 * padding[1] + kw, c_out))
  for i in range(h):
    for j in range(w):
      for a in range(kh):
        for b in range(kw):
          out[:, i * stride[0] + a, j * stride[1] + b] += x[:, i, j] @ w_torch[a, b]
  return out[:, padding[0]:padding[0] + oh, padding[1]:padding[1] + ow]


@pytest.mark.parametrize("kernel,stride,padding", [((1, 4), (1, 2), (0, 1)), ((4, 4), (2, 2), (1, 1))])
def test_conv_transpose_matches_pytorch_rule(kernel, stride, padding):
  layer = N.ConvTranspose(3, kernel, stride, padding)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 4, 5)))
  variables = layer.init(jax.random.key(1), x)
  got = layer.apply(variables, x)
  bound = 1 / np.sqrt(3 * kernel[0] * kernel[1])  # PyTorch: fan_in = C_out·kh·kw
  assert np.abs(variables["params"]["kernel"]).max() <= bound
  assert np.abs(variables["params"]["kernel"]).max() > 0.8 * bound
  want = _scatter_conv_transpose(x, np.asarray(variables["params"]["kernel"]), stride, padding)
  np.testing.assert_allclose(got, want + np.asarray(variables["params"]["bias"]), atol=1e-5)


@pytest.mark.parametrize("quirk", [True, False])
def test_padding_index_embedding_and_likelihood(quirk):
  pad = cap.padding_index(quirk)
  emb = N.embedding_init(pad)(jax.random.key(0), (10, 128))
  assert np.all(emb[pad] == 0) and np.all(emb[np.arange(10) != pad] != 0)
  assert 0.8 < float(jnp.std(emb)) < 1.2  # N(0, 1)
  emb = emb.at[pad].set(1.0)
  tokens = jnp.array([[pad, 3] + [cap.EOS] * 30])
  np.testing.assert_array_equal(N.embed(tokens, emb, pad)[0, 0], emb[pad])  # the current row
  grad = jax.grad(lambda e: jnp.sum(N.embed(tokens, e, pad) ** 2))(emb)
  assert np.all(grad[pad] == 0) and np.any(grad[3] != 0)
  # The likelihood ignores the padding index: <exc> with the official quirk, <pad> without.
  ll = N.cub_model("vae_sentence", 4, vocab_size=10, padding_quirk=quirk).modality("sentence").log_likelihood
  x = jnp.array([[3, cap.EXC, cap.EOS] + [cap.PAD] * 29], jnp.float32)
  logits = jax.random.normal(jax.random.key(2), (1, 32, 10))
  logp = jax.nn.log_softmax(logits)
  scored = [0, 2] + list(range(3, 32)) if quirk else [0, 1, 2]  # <exc> or the <pad>s skipped
  want = sum(float(logp[0, t, int(x[0, t])]) for t in scored)
  assert float(ll(x, logits)[0]) == pytest.approx(want, rel=1e-5)


def test_tied_output_and_batchnorm_modes(small_model):
  model, params = small_model
  feats = jnp.abs(jax.random.normal(jax.random.key(1), (6, 2048)))
  toks = jax.random.randint(jax.random.key(2), (6, 32), 0, 40).astype(jnp.float32)
  z = jax.random.normal(jax.random.key(3), (6, 8))
  logits = model.decode_one(params, "sentence", z)
  assert logits.shape == (6, 32, 40)
  # Tied: changing the encoder's embedding changes the decoder's logits.
  moved = jax.tree.map(lambda a: a, params)
  moved["encoders"]["sentence"]["embedding"] = params["encoders"]["sentence"]["embedding"] * 2
  assert not np.allclose(model.decode_one(moved, "sentence", z), logits)
  # Train mode: batch statistics (a row's output depends on the other rows); eval mode: not.
  z2, toks2 = z.at[1:].multiply(3.0), toks.at[1:].set(7.0)
  assert not np.allclose(model.decode_one(params, "sentence", z2)[0], logits[0], atol=1e-4)
  stats = N.population_batch_stats(model, params, [(feats, toks)], jax.random.key(4))
  assert set(stats) == {"encoders", "decoders"} and "image" not in stats["encoders"]
  assert stats["decoders"]["sentence"]["bn1"]["var"].shape == (512,)
  evp = {**params, "batch_stats": stats}
  np.testing.assert_allclose(model.decode_one(evp, "sentence", z2)[0],
                             model.decode_one(evp, "sentence", z)[0], atol=1e-4)
  np.testing.assert_allclose(model.encode_one(evp, "sentence", toks2).loc[0],
                             model.encode_one(evp, "sentence", toks).loc[0], atol=1e-4)
  obj = jax.jit(lambda p: model.objective(p, (feats, toks), jax.random.key(5), 2,
                                          estimator="legacy"))(params)
  assert obj.shape == (6,) and np.all(np.isfinite(obj))


# ---------------------------------------------------------------------------------------------
# Data.


def test_pairs_caption_i_with_image_i_div_10():
  feats = np.arange(3 * 2048, dtype=np.float32).reshape(3, 2048)
  toks = np.tile(np.arange(30)[:, None], (1, 32)).astype(np.int32)
  ds = cub.CubPairs(feats, toks, np.repeat([7, 8, 9], 10))
  assert len(ds) == 30 and ds.modalities == ("image", "sentence")
  (f, t), y = ds.gather([0, 9, 10, 29])
  np.testing.assert_array_equal(f[:, 0], feats[[0, 0, 1, 2], 0])
  np.testing.assert_array_equal(t[:, 0], [0, 9, 10, 29])
  assert t.dtype == np.float32 and list(y) == [7, 7, 8, 9]
  sub = ds.subset_images(np.array([2, 0]))
  (f2, t2), y2 = sub.gather([0, 10])
  np.testing.assert_array_equal(f2[:, 0], feats[[2, 0], 0])
  np.testing.assert_array_equal(t2[:, 0], [20, 0])
  only = ds.with_modalities(("sentence",))
  assert only.gather([5])[0][0].shape == (1, 32) and len(ds.with_modalities(("image",))) == 3
  with pytest.raises(ValueError, match="exactly 10 per image"):
    cub.CubPairs(feats, toks[:29], None)
  with pytest.raises(ValueError, match=r"\(N, 2048\)"):
    cub.CubPairs(feats[:, :5], toks, None)


def test_split_and_synthetic_features():
  tr, te = cub.split_by_image(100, 0.2, seed=3)
  assert len(te) == 20 and len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 100
  assert np.array_equal(te, cub.split_by_image(100, 0.2, seed=3)[1])
  classes = np.repeat([0, 1], 50)
  x = cub.synthetic_features(classes, seed=0)
  assert x.shape == (100, 2048) and x.dtype == np.float32 and x.min() >= 0
  within = np.linalg.norm(x[:50] - x[:50].mean(0), axis=1).mean()
  between = np.linalg.norm(x[:50].mean(0) - x[50:].mean(0))
  assert between > within  # class-conditional


def test_nearest_neighbour_returns_exact_match():
  bank = np.abs(np.random.default_rng(0).standard_normal((500, 2048))).astype(np.float32)
  idx, dist = cub.nearest_neighbours(bank[[17, 3, 499]], bank, chunk=2)
  assert list(idx) == [17, 3, 499]
  np.testing.assert_allclose(dist, np.sqrt(1e-5), rtol=0.2)
  with pytest.raises(ValueError, match="same F"):
    cub.nearest_neighbours(bank[:2, :10], bank)


def test_feature_and_caption_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="extract_cub_features"):
    cub.load_features(str(tmp_path / "none.npy"))
  np.save(tmp_path / "bad.npy", np.zeros((3, 10), np.float32))
  with pytest.raises(ValueError, match=r"must be \(N, 2048\)"):
    cub.load_features(str(tmp_path / "bad.npy"))
  (tmp_path / "c.txt").write_text("a bird.\n\nanother bird.\n")
  assert cub.load_captions(str(tmp_path / "c.txt")).captions == ("a bird.", "another bird.")


# ---------------------------------------------------------------------------------------------
# CCA.


def test_cca_recovers_planted_correlation():
  rng = np.random.default_rng(0)
  n = 4000
  u = rng.standard_normal((n, 2))
  x = np.concatenate([u + 0.5 * rng.standard_normal((n, 2)), rng.standard_normal((n, 4))], 1)
  y = np.concatenate([u @ np.array([[1.0, 0.0], [0.0, 1.0]]) + 1.0 * rng.standard_normal((n, 2)),
                      rng.standard_normal((n, 3))], 1)
  mix = rng.standard_normal((6, 6))  # hide the planted directions behind a linear map
  x = x @ mix
  fit = cca.fit_cca(x[:3000], y[:3000], k=3)
  # Canonical correlations of the plant: 1 / sqrt((1 + 0.25)(1 + 1)) for both shared dims.
  rho = 1 / np.sqrt(1.25 * 2.0)
  np.testing.assert_allclose(fit["eigenvalues"][:2], rho, atol=0.04)
  assert abs(fit["eigenvalues"][2]) < 0.1
  two = {**fit, "proj_x": fit["proj_x"][:, :2], "proj_y": fit["proj_y"][:, :2]}
  held = cca.cca_cosines(x[3000:], y[3000:], two).mean()
  shuffled = cca.cca_cosines(x[3000:], y[3000:][rng.permutation(1000)], two).mean()
  assert held > 0.4 and abs(shuffled) < 0.07


def test_sif_sentence_vectors_and_pc_removal():
  v = cap.Vocabulary(words=cap.SPECIALS + ("a", "b"), counts=np.array([2, 0, 0, 6, 2]), total=10)
  w = cca.sif_weights(v, a=0.1)
  np.testing.assert_allclose(w, [0.1 / 0.3, 0, 0, 0.1 / 0.7, 0.1 / 0.3], rtol=1e-6)
  table = np.arange(15, dtype=np.float32).reshape(5, 3)
  ids = np.array([[3, 4, cap.EOS, 3, 3], [3, 0, 3, 3, 4]])
  s = cca.weighted_average(ids, table, w)
  np.testing.assert_allclose(s[0], (w[3] * table[3] + w[4] * table[4]) / 3, rtol=1e-6)
  np.testing.assert_allclose(s[1], (3 * w[3] * table[3] + w[0] * table[0] + w[4] * table[4]) / 5,
                             rtol=1e-6)
  vecs = np.random.default_rng(0).standard_normal((50, 3)) * [5, 1, 0.1]
  pc = cca.first_principal_component(vecs)
  assert abs(abs(pc[0]) - 1) < 0.05
  np.testing.assert_allclose(cca.remove_component(vecs, pc) @ pc, 0, atol=1e-5)


def test_cca_ground_truth_on_real_captions(shared_data):
  """The full sentence pipeline (FastText, SIF, PC removal, CCA) on the real captions of 1,500
  random test-class images paired with SYNTHETIC class-conditional 64-d 'image' vectors, fitted on
  1,200 images and scored on the other 300: real pairs correlate, shuffled pairs do not."""
  f = cub.load_captions(str(shared_data / "cub_captions_test.npz"))
  images = np.random.default_rng(0).permutation(2933)[:1500]
  rows = (images[:, None] * 10 + np.arange(10)).reshape(-1)
  classes = cub.image_classes(f.class_ids)[images]
  feats = np.repeat(cub.synthetic_features(classes, dim=64, seed=0), 10, axis=0)
  toks = cap.tokenize_all([f.captions[i] for i in rows])
  v = cap.build_vocabulary(toks[:12000])
  ids, _ = v.encode_all(toks)
  model = cca.fit_cca_model(feats[:12000], ids[:12000], toks[:12000], v, k=10, seed=0,
                            fasttext_overrides={"epochs": 3})
  assert model.table.shape == (len(v), 300) and np.all(model.table[cap.EOS] == 1)
  truth = model.correlations(feats[12000:], ids[12000:]).mean()
  perm = np.random.default_rng(1).permutation(3000)
  shuffled = model.correlations(feats[12000:], ids[12000:][perm]).mean()
  assert truth > 0.15 and abs(shuffled) < 0.05, (truth, shuffled)


# ---------------------------------------------------------------------------------------------
# Scripts.


def test_extract_features_order_resize_and_fake_backbone(tmp_path):
  from PIL import Image
  from mmvae_jax.data import cub_features as ext
  for cls, names in (("002.b", ["y.jpg", "x.png"]), ("001.a", ["z.jpg"])):
    os.makedirs(tmp_path / "test" / cls)
    for i, n in enumerate(names):
      Image.new("RGB", (300, 200), (255, 128 * i, 0)).save(tmp_path / "test" / cls / n)
  files = ext.list_images(str(tmp_path / "test"))
  assert [os.path.relpath(f, tmp_path / "test") for f in files] == ["001.a/z.jpg", "002.b/x.png",
                                                                    "002.b/y.jpg"]
  x = ext.load_image(files[1])
  assert x.shape == (3, 224, 336) and x.dtype == np.float32  # shorter side 224, no crop
  np.testing.assert_allclose(x[:, 100, 100], [1.0, 128 / 255, 0.0], atol=2 / 255)  # no normalisation
  seen = []

  def fake(batch):
    seen.append(batch.shape)
    return np.repeat(batch.mean(axis=(2, 3)), 683, axis=1)[:, :2048]
  feats = ext.extract(files, fake, batch_size=2)
  assert feats.shape == (3, 2048) and seen == [(2, 3, 224, 336), (1, 3, 224, 336)]
  np.testing.assert_allclose(feats[1, 0], 1.0, atol=1e-3)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    ext.list_images(str(tmp_path / "train"))


def _run_cub(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, str(REPO / "experiments" / "cub.py"), *args],
                        capture_output=True, text=True, env=env, timeout=120)


def test_cub_script_flag_errors(tmp_path):
  r = _run_cub(f"--workdir={tmp_path}")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "cub.py: error: --captions is required (a .txt of captions, one per line, or an .npz with "
      "'captions' and 'class_id')"]
  (tmp_path / "c.txt").write_text("a bird.\n" * 20)
  r = _run_cub(f"--workdir={tmp_path}", f"--captions={tmp_path / 'c.txt'}", "--synthetic_features")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "needs class ids" in r.stderr
  r = _run_cub(f"--workdir={tmp_path}", "--k=0")
  assert r.returncode == 2 and r.stderr.strip() == "cub.py: error: --k must be >= 1, got 0"


def test_token_accuracy_counts_up_to_first_eos():
  from mmvae_jax.experiments import cub as mod
  truth = np.array([[5, 6, cap.EOS, cap.PAD], [7, cap.EOS, cap.PAD, cap.PAD]])
  pred = np.array([[5, 0, cap.EOS, 9], [7, 7, 1, 1]])
  assert mod.token_accuracy(pred, truth) == pytest.approx(3 / 5)


def test_evaluate_refuses_unreadable_run_json_in_one_line(tmp_path):
  (tmp_path / "run.json").write_text('{"model": "cub_vae_sentence", "config": {}}')
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "evaluate.py"),
                      f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "run.json schema 1" in r.stderr
