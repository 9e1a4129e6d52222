"""The CUB experiment: ResNet-101 image features + captions (the official cubISft model).

Data (`build_data`): caption files (.txt, one caption per line, or .npz with "captions" and
"class_id"), features from experiments/extract_cub_features.py (a folder with train.npy and
test.npy, or one .npy), or SYNTHETIC class-conditional features for an offline run. Without
test captions the images of the train captions are split (``heldout_fraction``,
``split_seed``). The vocabulary (train captions only) is saved as vocab.json in the workdir.

After training (`after_training`) the population BatchNorm statistics are computed, the test
token accuracy of reconstructions (and of image→sentence cross generations) is measured, and
example captions go to samples.txt and report.json. `evaluate_table4` is the paper's Table 4
(CCA coherence of image features and captions).
"""
from __future__ import annotations

import dataclasses
import json
import os

from mmvae_jax import models
from mmvae_jax.config import RunConfig
from mmvae_jax.experiments.base import Data, Experiment

OPTION_FLAGS = {
    "features": (None, "ResNet-101 features: a folder with train.npy and test.npy "
                 "(experiments/extract_cub_features.py) or one .npy (N_images, 2048)."),
    "test_features": (None, "Test features .npy when --features is one file."),
    "captions": (None, "Train captions: .txt (one per line) or .npz ('captions', 'class_id')."),
    "test_captions": (None, "Test captions; without them the images of --captions are split by "
                      "--heldout_fraction."),
    "synthetic_features": (False, "Use SYNTHETIC class-conditional features in the image slot "
                           "(needs class ids: an .npz caption file with class_id)."),
    "heldout_fraction": (0.2, "Fraction of images held out as the test split when no "
                         "--test_captions are given."),
    "split_seed": (0, "Seed of the held-out split and the synthetic features."),
    "padding_quirk": (True, "Index 0 (<exc>) is the padding index the likelihood ignores, as the "
                      "official code; --nopadding_quirk uses <pad> (docs/official-code.md)."),
    "sentence_variant": ("ft", "Sentence CNN: ft (cubISft, with bias, 32-512 channels) or cubS "
                         "(no bias, 32-128 channels)."),
    "bn_batches": (50, "Train batches for the population BatchNorm statistics."),
    "report_num": (2000, "Test pairs scored for the token accuracy after training (0: all)."),
    "num_examples": (8, "Example captions written to samples.txt."),
}


# ---------------------------------------------------------------------------------------------
# Data.


def build_data(spec: dict, modalities: tuple[str, ...], vocab=None):
  """Train/test `CubPairs`, the vocabulary and the tokenised train captions from a data spec.

  Args:
    spec: {"captions", "test_captions", "features", "test_features", "synthetic_features",
      "heldout_fraction", "split_seed"} (as flags; stored in run.json["data"]).
    modalities: the modalities the model reads ("image", "sentence" or both).
    vocab: a saved vocabulary to reuse (resume, evaluation); None builds it from the train captions.
  Returns:
    (train_set, test_set, vocab, train word tokens, description dict).
  Raises:
    ValueError / FileNotFoundError with one-line messages.
  """
  import numpy as np
  from mmvae_jax.data import captions as cap
  from mmvae_jax.data import cub

  if not spec.get("captions"):
    raise ValueError("--captions is required (a .txt of captions, one per line, or an .npz "
                     "with 'captions' and 'class_id')")
  need_features = "image" in modalities
  synthetic = bool(spec.get("synthetic_features"))
  if need_features and not synthetic and not spec.get("features"):
    raise ValueError("the image modality needs --features=<folder or .npy> (or "
                     "--synthetic_features for an offline run)")
  if synthetic and spec.get("features"):
    raise ValueError("give either --features or --synthetic_features, not both")
  train_file = cub.load_captions(spec["captions"])
  heldout = not spec.get("test_captions")
  files = [train_file] if heldout else [train_file, cub.load_captions(spec["test_captions"])]

  def features_for(split: str, caption_file, index: int):
    if not need_features:
      return None
    if synthetic:
      if caption_file.class_ids is None:
        raise ValueError(f"{caption_file.path}: --synthetic_features needs class ids (an .npz "
                         f"caption file with a class_id array)")
      classes = cub.image_classes(caption_file.class_ids)
      return cub.synthetic_features(classes, seed=int(spec.get("split_seed", 0)) + 1000 * index)
    path = spec["features"]
    if not os.path.isdir(path) and split == "test":
      if not spec.get("test_features"):
        raise ValueError("--features is one file: give --test_features too (or a folder with "
                         "train.npy and test.npy)")
      path = spec["test_features"]
    return cub.load_features(path, split if os.path.isdir(path) else None)

  tokenised = {}
  sets = []
  for index, (split, f) in enumerate(zip(("train", "test"), files)):
    feats = features_for(split, f, index)
    if feats is not None:
      cub.check_alignment(len(f.captions), len(feats), f"{f.path} + {split} features")
    elif len(f.captions) % cub.CAPTIONS_PER_IMAGE:
      raise ValueError(f"{f.path}: {len(f.captions)} captions is not 10 per image")
    tokenised[split] = cap.tokenize_all(f.captions)
    sets.append((f, feats))

  if heldout:
    f, feats = sets[0]
    num_images = len(f.captions) // cub.CAPTIONS_PER_IMAGE
    tr_img, te_img = cub.split_by_image(num_images, float(spec.get("heldout_fraction", 0.2)),
                                        int(spec.get("split_seed", 0)))
    rows = (tr_img[:, None] * cub.CAPTIONS_PER_IMAGE + np.arange(cub.CAPTIONS_PER_IMAGE)).reshape(-1)
    train_tokens = [tokenised["train"][i] for i in rows]
    if vocab is None:
      vocab = cap.build_vocabulary(train_tokens)
    ids, _ = vocab.encode_all(tokenised["train"])
    full = cub.CubPairs(feats, ids, f.class_ids, modalities=("image", "sentence") if feats is not None
                        else ("sentence",), synthetic_features=synthetic, name="cub")
    train_set, test_set = full.subset_images(tr_img, "train"), full.subset_images(te_img, "test")
    split_desc = {"kind": "held-out images", "train_images": len(tr_img), "test_images": len(te_img)}
  else:
    train_tokens = tokenised["train"]
    if vocab is None:
      vocab = cap.build_vocabulary(train_tokens)
    built = []
    for (f, feats), split in zip(sets, ("train", "test")):
      ids, _ = vocab.encode_all(tokenised[split])
      mods = ("image", "sentence") if feats is not None else ("sentence",)
      built.append(cub.CubPairs(feats, ids, f.class_ids, modalities=mods,
                                synthetic_features=synthetic, name=split))
    train_set, test_set = built
    split_desc = {"kind": "files", "train_images": train_set.num_images,
                  "test_images": test_set.num_images}
  train_set, test_set = train_set.with_modalities(modalities), test_set.with_modalities(modalities)
  desc = {**split_desc, "train_rows": len(train_set), "test_rows": len(test_set),
          "vocab_size": len(vocab), "synthetic_features": synthetic}
  return train_set, test_set, vocab, train_tokens, desc




# ---------------------------------------------------------------------------------------------
# Post-training report.


def token_accuracy(pred, truth) -> float:
  """Fraction of correct argmax tokens over the true tokens up to and including the first <eos>.

  Args: pred, truth: (N, 32) token ids.
  """
  import numpy as np
  from mmvae_jax.data import captions as cap
  truth = np.asarray(truth).astype(np.int64)
  is_eos = truth == cap.EOS
  keep = (np.cumsum(is_eos, axis=1) - is_eos) == 0
  return float(np.sum((np.asarray(pred) == truth) & keep) / max(np.sum(keep), 1))


def with_batch_stats(model, params, train_set, *, num_batches: int, batch_size: int, seed: int):
  """params + population BatchNorm statistics from `num_batches` shuffled train batches."""
  import jax
  import numpy as np
  from mmvae_jax import networks_cub
  if not any(networks_cub.is_tied(m) for m in model.modalities):
    return params
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(train_set))
  batches = [train_set.gather(order[s:s + batch_size])[0]
             for s in range(0, min(len(order), num_batches * batch_size) - batch_size + 1, batch_size)]
  if not batches:
    batches = [train_set.gather(order)[0]]
  stats = networks_cub.population_batch_stats(model, params, batches, jax.random.key(seed))
  return {**params, "batch_stats": stats}


def report(model, params, train_set, test_set, vocab, *, seed: int, num: int, num_examples: int,
           batch_size: int = 256) -> tuple[dict, str]:
  """Test token accuracy of reconstructions (and I→S cross generations) and example captions.

  `params` should carry batch_stats (`with_batch_stats`). Returns (metrics, text of samples).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mmvae_jax.evaluation import common

  names = list(model.names)
  rows = common.select_rows(len(test_set), num or None, seed)
  recon = jax.jit(model.reconstruct)
  key = jax.random.key(seed)
  preds = {}
  truth_tokens, first = [], None
  for i, start in enumerate(range(0, len(rows), batch_size)):
    xs, _ = test_set.gather(rows[start:start + batch_size])
    out = recon(params, tuple(jnp.asarray(x) for x in xs), jax.random.fold_in(key, i))
    for e, enc in enumerate(names):
      for d, dec in enumerate(names):
        if dec == "sentence":
          preds.setdefault(f"{enc}->sentence", []).append(np.asarray(jnp.argmax(out[e][d], -1)))
        elif dec == "image":
          preds.setdefault(f"{enc}->image", []).append(np.asarray(out[e][d]))
    if "sentence" in names:
      truth_tokens.append(xs[names.index("sentence")].astype(np.int64))
    if first is None:
      first = (xs, out)
  metrics = {"num_test_pairs": int(len(rows))}
  if "sentence" in names:
    truth = np.concatenate(truth_tokens)
    for enc in names:
      metrics[f"token_accuracy_{enc}->sentence"] = token_accuracy(
          np.concatenate(preds[f"{enc}->sentence"]), truth)
  if "image" in names:
    feats = test_set.gather(rows)[0][names.index("image")]
    for enc in names:
      gen = np.concatenate(preds[f"{enc}->image"])
      metrics[f"feature_l1_{enc}->image"] = float(np.mean(np.abs(gen - feats)))

  lines = []
  xs, out = first
  if "sentence" in names:
    s = names.index("sentence")
    lines.append("Test captions, their reconstructions (sentence -> sentence, one posterior sample, "
                 "argmax)" + (" and cross generations from the image features (image -> sentence)"
                              if "image" in names else "") + ":")
    for b in range(min(num_examples, xs[0].shape[0])):
      lines.append(f"  real : {vocab.decode(xs[s][b])}")
      lines.append(f"  recon: {vocab.decode(np.argmax(np.asarray(out[s][s][b]), -1))}")
      if "image" in names:
        lines.append(f"  I->S : {vocab.decode(np.argmax(np.asarray(out[names.index('image')][s][b]), -1))}")
      lines.append("")
    gen = jax.jit(model.generate, static_argnums=2)(params, jax.random.fold_in(key, 10**6),
                                                    num_examples)
    lines.append("Prior samples (decoder argmax):")
    for b in range(num_examples):
      lines.append(f"  {vocab.decode(np.argmax(np.asarray(gen[s][b]), -1))}")
  return metrics, "\n".join(lines)





# ---------------------------------------------------------------------------------------------
# The experiment.


def _options(config: RunConfig) -> dict:
  out = {k: v for k, (v, _) in OPTION_FLAGS.items()}
  out.update(config.options or {})
  return out


@dataclasses.dataclass(frozen=True)
class CubExperiment(Experiment):
  """Image features + captions; models over the modalities ("image", "sentence")."""

  def option_flags(self) -> dict:
    return dict(OPTION_FLAGS)

  def build_data(self, config: RunConfig, *, workdir: str | None = None,
                 resume: bool = False) -> Data:
    from mmvae_jax.data import captions as cap
    opts = _options(config)
    if not 0 < float(opts["heldout_fraction"]) < 1:
      raise ValueError(f"--heldout_fraction must be in (0, 1), got {opts['heldout_fraction']}")
    if int(opts["bn_batches"]) < 1:
      raise ValueError(f"--bn_batches must be >= 1, got {opts['bn_batches']}")
    if opts["sentence_variant"] not in ("ft", "cubS"):
      raise ValueError(f"--sentence_variant must be ft or cubS, got {opts['sentence_variant']!r}")
    vocab_path = os.path.join(workdir, "vocab.json") if workdir else None
    saved = cap.Vocabulary.load(vocab_path) if vocab_path and os.path.isfile(vocab_path) else None
    if resume and saved is None:
      raise FileNotFoundError(f"{vocab_path} not found: the run's vocabulary is missing")
    train, test, vocab, tokens, desc = build_data(opts, self.used_modalities(config), saved)
    used = self.used_modalities(config)
    shapes = {"image": [2048], "sentence": [32]}
    desc = {**desc, "shapes": {n: shapes[n] for n in used}}
    return Data(train=train, test=test, description=desc,
                extras={"vocab": vocab, "train_tokens": tokens})

  def write_files(self, data: Data, workdir: str) -> None:
    """The vocabulary, vocab.json (kept from the first launch: resumes reuse it)."""
    path = os.path.join(workdir, "vocab.json")
    if not os.path.isfile(path):
      data.extras["vocab"].save(path)

  def build_modalities(self, config: RunConfig, data: Data) -> tuple[models.Modality, ...]:
    from mmvae_jax import networks_cub
    opts = _options(config)
    mods = networks_cub.cub_modalities(
        self.network_latent_dim(config), llik_scaling=config.llik_scaling,
        vocab_size=int(data.description["vocab_size"]), padding_quirk=bool(opts["padding_quirk"]),
        variant=opts["sentence_variant"], decoder_impl=config.decoder_impl)
    used = self.used_modalities(config)
    return tuple(m for m in mods if m.name in used)

  def model_options(self, config: RunConfig) -> models.ModelOptions:
    from mmvae_jax import distributions as dists
    return models.ModelOptions(latent_dim=config.latent_dim, learn_prior=config.learn_prior,
                               prior_family="normal", prior_scale=dists.softplus_scale,
                               expert_scale=config.expert_scale, private_dim=config.private_dim,
                               beta=config.beta)

  def prepare_params(self, model, params, data: Data, config: RunConfig):
    return with_batch_stats(model, params, data.train,
                            num_batches=int(_options(config)["bn_batches"]),
                            batch_size=config.batch_size, seed=config.seed)

  def after_training(self, model, config: RunConfig, data: Data, workdir: str, final: dict
                     ) -> dict:
    """BatchNorm statistics, token accuracy and example captions of the trained run."""
    from mmvae_jax import train
    opts = _options(config)
    params, step, _ = train.restore_params(model, config.train_config(), workdir)
    params = self.prepare_params(model, params, data, config)
    metrics, text = report(model, params, data.train, data.test, data.extras["vocab"],
                           seed=config.seed, num=int(opts["report_num"]),
                           num_examples=int(opts["num_examples"]))
    synthetic = bool(data.description.get("synthetic_features"))
    metrics = {"checkpoint_step": step, **final, **metrics, "synthetic_features": synthetic}
    header = "[image modality: SYNTHETIC class-conditional features]\n" if synthetic else ""
    import jax
    if jax.process_index() == 0:  # with several processes, each computes this; process 0 writes
      with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write(header + text + "\n")
      from mmvae_jax.runs import write_json
      write_json(os.path.join(workdir, "report.json"), metrics)
      print(header + json.dumps(metrics, indent=2) + "\n" + text)
    return metrics


CUB = CubExperiment(
    name="cub", modalities=("image", "sentence"), evaluation="cca",
    defaults={"k": 50, "batch_size": 64, "latent_dim": 64, "llik_scaling": 0.002, "epochs": 50,
              "partners": 1, "figures": False})


# ---------------------------------------------------------------------------------------------
# Table 4.


def evaluate_table4(run, *, batch_size: int = 256, joint_num: int = 1000, seed: int = -1,
                    drop_last: bool = True, say=print) -> dict:
  """Table 4 of a loaded CUB run (`mmvae_jax.load_run`): fits (or reloads) the CCA on the train
  pairs, scores the ground truth, shuffled pairs, cross I→S / S→I and joint generations; writes
  the workdir's results.json["table4"]."""
  import jax
  from mmvae_jax.evaluation import cca as cca_lib
  from mmvae_jax.runs import write_json

  if tuple(run.model.names) != ("image", "sentence"):
    raise ValueError(f"Table 4 needs a model of both CUB modalities, got {list(run.model.names)}")
  workdir = run.workdir
  seed = run.config.seed if seed < 0 else seed
  data = run.data()
  train_set, test_set = data.train, data.test
  vocab, train_tokens, desc = data.extras["vocab"], data.extras["train_tokens"], data.description
  synthetic = bool(desc.get("synthetic_features"))
  say(f"Workdir {workdir}: CUB {run.config.model} (image features + captions), checkpoint step "
      f"{run.step}; {desc['train_rows']} train / {desc['test_rows']} test pairs ({desc['kind']})")
  if synthetic:
    say("NOTICE: the image modality holds SYNTHETIC class-conditional features, not ResNet-101 "
        "features of CUB images; these numbers are not comparable with the paper's Table 4.")
  cca_path = os.path.join(workdir, "cca.npz")
  if os.path.isfile(cca_path):
    cca = cca_lib.CCAModel.load(cca_path)
    say(f"CCA: loaded {cca_path}")
  else:
    (feats, toks), _ = train_set.gather(range(len(train_set)))
    cca = cca_lib.fit_cca_model(feats, toks.astype("int64"), train_tokens, vocab, seed=seed)
    cca.save(cca_path)
    say(f"CCA: fitted on {len(train_set)} train pairs (k = {len(cca.eigenvalues)}, largest "
        f"eigenvalue {float(cca.eigenvalues[0]):.4f}); saved {cca_path}")
  params = run.eval_params()
  key = jax.random.key(seed)
  res = cca_lib.cross_coherence(run.model, params, cca, test_set, key=jax.random.fold_in(key, 1),
                                batch_size=batch_size, seed=seed, drop_last=drop_last)
  res.update(cca_lib.joint_coherence(run.model, params, cca, key=jax.random.fold_in(key, 2),
                                     num=joint_num))
  res["ground_truth_all"] = cca_lib.ground_truth(cca, test_set)
  res["shuffled_pairs"] = cca_lib.ground_truth(cca, test_set, shuffle_seed=seed)
  res["synthetic_features"] = synthetic
  res["checkpoint_step"] = run.step
  say("\nTable 4: CCA correlation of image (I) - sentence (S) pairs"
      + (" [SYNTHETIC image features]" if synthetic else ""))
  say(cca_lib.format_table4(res, "ours (synthetic)" if synthetic else "ours"))
  say(f"  ground truth over all {len(test_set)} test pairs {res['ground_truth_all']:.3f}; "
      f"shuffled pairs {res['shuffled_pairs']:.3f}; cross scores over {res['num_pairs']} pairs "
      f"({res['num_batches']} batches of {batch_size}); joint over {res['num']} prior samples")
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError):
    results = {}
  results["table4"] = res
  write_json(path, results)
  say(f"wrote {path}")
  return res
