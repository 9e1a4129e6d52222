r"""Trains the CUB image-feature + caption MMVAE (official cubISft) and evaluates Table 4.

Official README run (ResNet-101 features from experiments/extract_cub_features.py, the official
train/test caption files):

    python experiments/cub.py --features=data/cub/resnet101 \
        --captions=data/cub/text_trainvalclasses.txt --test_captions=data/cub/text_testclasses.txt
    python experiments/evaluate.py --workdir=runs/cub          # Table 4

Defaults are the README flags: K = 50, batch 64, latent 64, λ_image = 0.002, 50 epochs, the
stratified bound (--looser) with the official gradient (--estimator=legacy), learned prior.

Offline (no images, no features, only the 50 test classes' captions): hold out 20% of the images
(seeded) as the test split and use SYNTHETIC class-conditional features in the image slot:

    python experiments/cub.py --captions=../shared/data/cub_captions_test.npz \
        --synthetic_features --workdir=runs/cub_offline
    python experiments/cub.py --model=vae_sentence --captions=../shared/data/cub_captions_test.npz

--model: mmvae (image features + captions), vae_sentence / vae_image (one modality, λ = 1).
Without --test_captions the run uses the held-out split by image (--heldout_fraction,
--split_seed). The vocabulary (train captions only) is saved as vocab.json in the workdir; the
synthetic features are a function of --split_seed. After training the script computes
population BatchNorm statistics, the test token accuracy of reconstructions (and of I→S cross
generations) and writes example captions to samples.txt and report.json. Re-running the same
command in the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from absl import app, flags

from mmvae_jax import cli

PROG = "cub.py"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the script's flags (only when it runs as a program, so that experiments/
  evaluate.py can import `evaluate_table4` next to its own flags)."""
  flags.DEFINE_enum("model", "mmvae", ["mmvae", "vae_sentence", "vae_image"],
                    "mmvae: image features + captions (cubISft); vae_sentence / vae_image: the "
                    "single-modality VAEs.")
  flags.DEFINE_integer("k", 50, "Importance samples per expert (K).")
  flags.DEFINE_enum("estimator", "legacy", ["legacy", "dreg", "iwae"],
                    "Gradient estimator: legacy = the official code's (IWAE-STL); dreg = true "
                    "doubly-reparameterised gradients; iwae = plain autodiff.")
  flags.DEFINE_enum("objective", "moe_iwae", ["moe_iwae", "moe_elbo"],
                    "moe_iwae (eq. (3)) or moe_elbo (the official m_elbo).")
  flags.DEFINE_boolean("looser", True, "Stratified bound of eq. (3); --nolooser: tight bound.")
  flags.DEFINE_boolean("learn_prior", True, "Learn the prior's scale logits.")
  flags.DEFINE_integer("latent_dim", 64, "Latent dimension D (README 64; the paper says 128).")
  flags.DEFINE_integer("batch_size", 64, "Global batch size (split over all local devices).")
  flags.DEFINE_integer("epochs", 50, "Epochs over the training pairs.")
  flags.DEFINE_integer("max_steps", 0, "Stop after this many steps in total (0: no limit).")
  flags.DEFINE_float("lr", 1e-3, "Learning rate of Adam with PyTorch-style AMSGrad.")
  flags.DEFINE_float("llik_scaling", 0.002, "λ of the image-feature likelihood (README run 0.002; "
                     "0 means the model default 32/2048). The sentence λ is 1.")
  flags.DEFINE_integer("seed", 1, "Seed of the parameters, data order and samples.")
  flags.DEFINE_string("workdir", "runs/cub", "Checkpoints, logs, vocabulary and reports go here.")
  flags.DEFINE_string("features", None, "ResNet-101 features: a folder with train.npy and test.npy "
                      "(extract_cub_features.py) or one .npy (N_images, 2048).")
  flags.DEFINE_string("test_features", None, "Test features .npy when --features is one file.")
  flags.DEFINE_string("captions", None, "Train captions: .txt (one per line) or .npz ('captions').")
  flags.DEFINE_string("test_captions", None, "Test captions; without it the images of --captions "
                      "are split by --heldout_fraction.")
  flags.DEFINE_boolean("synthetic_features", False, "Use SYNTHETIC class-conditional features in "
                       "the image slot (needs class ids: an .npz caption file with class_id).")
  flags.DEFINE_float("heldout_fraction", 0.2, "Fraction of images held out as the test split when "
                     "no --test_captions are given.")
  flags.DEFINE_integer("split_seed", 0, "Seed of the held-out split and the synthetic features.")
  flags.DEFINE_boolean("padding_quirk", True, "Official: index 0 (<exc>) is the padding index the "
                       "likelihood ignores and <pad> is scored; --nopadding_quirk uses <pad>.")
  flags.DEFINE_enum("sentence_variant", "ft", ["ft", "cubS"], "Sentence CNN: ft (cubISft, with "
                    "bias, 32-512 channels) or cubS (no bias, 32-128 channels).")
  flags.DEFINE_integer("eval_every", 0, "Steps between test evaluations (0: each epoch end).")
  flags.DEFINE_integer("eval_batches", 0, "Test batches per evaluation (0: all test pairs).")
  flags.DEFINE_integer("eval_batch_size", 0, "Test batch size (0: --batch_size).")
  flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints (also at epoch ends).")
  flags.DEFINE_integer("log_every", 10, "Steps between metric logs.")
  flags.DEFINE_integer("bn_batches", 50, "Train batches for the population BatchNorm statistics.")
  flags.DEFINE_integer("report_num", 2000, "Test pairs scored for the token accuracy (0: all).")
  flags.DEFINE_integer("num_examples", 8, "Example captions written to samples.txt.")
  flags.DEFINE_enum("decoder_impl", "auto", ["auto", "matmul", "conv"],
                    "Transposed-convolution formulation of the sentence decoder.")
  cli.define_host_memory_flags()


def _fail(msg: str, code: int = 2):
  cli.fail(PROG, msg, code)




# ---------------------------------------------------------------------------------------------
# Data.

MODEL_MODALITIES = {"mmvae": ("image", "sentence"), "vae_sentence": ("sentence",),
                    "vae_image": ("image",)}


def data_spec_from_flags() -> dict:
  return {"captions": FLAGS.captions, "test_captions": FLAGS.test_captions,
          "features": FLAGS.features, "test_features": FLAGS.test_features,
          "synthetic_features": FLAGS.synthetic_features,
          "heldout_fraction": FLAGS.heldout_fraction, "split_seed": FLAGS.split_seed}


def build_data(spec: dict, model_kind: str, vocab=None):
  """Train/test `CubPairs`, the vocabulary and the tokenised train captions from a data spec.

  Args:
    spec: {"captions", "test_captions", "features", "test_features", "synthetic_features",
      "heldout_fraction", "split_seed"} (as flags; stored in run.json["data"]).
    model_kind: "mmvae", "vae_sentence" or "vae_image" (which modalities are needed).
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
    raise ValueError("--captions is required (e.g. --captions=../shared/data/cub_captions_test.npz)")
  modalities = MODEL_MODALITIES[model_kind]
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
# Restoring a run (also used by experiments/evaluate.py for Table 4).


def load_run(workdir: str) -> dict:
  path = os.path.join(workdir, "run.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: train with experiments/cub.py --workdir={workdir} first")
  with open(path) as f:
    return json.load(f)


def model_from_run(run: dict, vocab_size: int):
  from mmvae_jax import networks_cub
  m = run["modelspec"]
  return networks_cub.cub_model(run["model"].removeprefix("cub_"), m["latent_dim"],
                                llik_scaling=m["llik_scaling"], vocab_size=vocab_size,
                                learn_prior=m["learn_prior"], padding_quirk=m["padding_quirk"],
                                variant=m["sentence_variant"], decoder_impl=m.get("decoder_impl", "auto"))


def restore_params(model, run: dict, workdir: str, step: int = -1):
  """(params, step) of checkpoint `step` (-1: the latest) of `workdir`."""
  from mmvae_jax import train
  params, chosen, _ = train.restore_params(model, run["config"], workdir, step)
  return params, chosen


def evaluate_table4(workdir: str, *, step: int = -1, seed: int = -1, batch_size: int = 256,
                    joint_num: int = 1000, drop_last: bool = True, bn_batches: int = 50,
                    say=print) -> dict:
  """Table 4 of a CUB MMVAE workdir: fits (or reloads) the CCA on the train pairs, scores the
  ground truth, shuffled pairs, cross I→S / S→I and joint generations; writes results.json."""
  import jax
  from mmvae_jax.data import captions as cap
  from mmvae_jax.evaluation import cca as cca_lib

  run = load_run(workdir)
  kind = run.get("model", "")
  if kind != "cub_mmvae":
    raise ValueError(f"Table 4 needs a CUB MMVAE run (run.json model 'cub_mmvae'), got {kind!r}")
  seed = run["config"].get("seed", 1) if seed < 0 else seed
  vocab = cap.Vocabulary.load(os.path.join(workdir, "vocab.json"))
  train_set, test_set, vocab, train_tokens, desc = build_data(run["data"], "mmvae", vocab)
  model = model_from_run(run, len(vocab))
  params, step = restore_params(model, run, workdir, step)
  synthetic = desc["synthetic_features"]
  say(f"Workdir {workdir}: CUB MMVAE (image features + captions), checkpoint step {step}; "
      f"{desc['train_rows']} train / {desc['test_rows']} test pairs ({desc['kind']})")
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
  params = with_batch_stats(model, params, train_set, num_batches=bn_batches,
                            batch_size=run["config"]["batch_size"], seed=seed)
  key = jax.random.key(seed)
  res = cca_lib.cross_coherence(model, params, cca, test_set, key=jax.random.fold_in(key, 1),
                                batch_size=batch_size, seed=seed, drop_last=drop_last)
  res.update(cca_lib.joint_coherence(model, params, cca, key=jax.random.fold_in(key, 2),
                                     num=joint_num))
  res["ground_truth_all"] = cca_lib.ground_truth(cca, test_set)
  res["shuffled_pairs"] = cca_lib.ground_truth(cca, test_set, shuffle_seed=seed)
  res["synthetic_features"] = synthetic
  res["checkpoint_step"] = step
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
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)
  say(f"wrote {path}")
  return res


# ---------------------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  num_modalities = 2 if FLAGS.model == "mmvae" else 1
  cli.apply_host_memory_flags(num_modalities * FLAGS.k * FLAGS.batch_size)
  import jax
  from mmvae_jax import networks_cub, train
  from mmvae_jax.data import captions as cap

  config = train.TrainConfig(
      k=FLAGS.k, estimator=FLAGS.estimator, objective=FLAGS.objective, looser=FLAGS.looser,
      learn_prior=FLAGS.learn_prior, latent_dim=FLAGS.latent_dim, batch_size=FLAGS.batch_size,
      epochs=FLAGS.epochs, max_steps=FLAGS.max_steps, lr=FLAGS.lr,
      llik_scaling=FLAGS.llik_scaling, partners=1, seed=FLAGS.seed,
      eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches,
      eval_batch_size=FLAGS.eval_batch_size, checkpoint_every=FLAGS.checkpoint_every,
      log_every=FLAGS.log_every)
  try:
    config.validate(jax.device_count())
    if not 0 < FLAGS.heldout_fraction < 1:
      raise ValueError(f"--heldout_fraction must be in (0, 1), got {FLAGS.heldout_fraction}")
    if FLAGS.bn_batches < 1:
      raise ValueError(f"--bn_batches must be >= 1, got {FLAGS.bn_batches}")
  except ValueError as e:
    _fail(str(e))

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  vocab_path = os.path.join(FLAGS.workdir, "vocab.json")
  spec = data_spec_from_flags()
  try:
    saved = cap.Vocabulary.load(vocab_path) if os.path.isfile(vocab_path) else None
    train_set, test_set, vocab, _, desc = build_data(spec, FLAGS.model, saved)
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  if saved is None:
    vocab.save(vocab_path)
  if "sentence" in MODEL_MODALITIES[FLAGS.model] and not desc["synthetic_features"] \
      and spec["test_captions"] and len(vocab) != cap.OFFICIAL_VOCAB_SIZE:
    logging.warning("vocabulary of %d words; the official train captions give %d", len(vocab),
                    cap.OFFICIAL_VOCAB_SIZE)
  model = networks_cub.cub_model(FLAGS.model, FLAGS.latent_dim, llik_scaling=FLAGS.llik_scaling,
                                 vocab_size=len(vocab), learn_prior=FLAGS.learn_prior,
                                 padding_quirk=FLAGS.padding_quirk, variant=FLAGS.sentence_variant,
                                 decoder_impl=FLAGS.decoder_impl)
  run_info = {"model": f"cub_{FLAGS.model}", "config": dataclasses.asdict(config),
              "data": spec, "data_description": desc,
              "modelspec": {"latent_dim": FLAGS.latent_dim, "llik_scaling": FLAGS.llik_scaling,
                            "learn_prior": FLAGS.learn_prior, "padding_quirk": FLAGS.padding_quirk,
                            "sentence_variant": FLAGS.sentence_variant,
                            "decoder_impl": FLAGS.decoder_impl},
              "modalities": {m.name: {"shape": list(m.data_shape), "llik_scale": m.llik_scale}
                             for m in model.modalities},
              "devices": [str(d) for d in jax.devices()]}
  with open(os.path.join(FLAGS.workdir, "run.json"), "w") as f:
    json.dump(run_info, f, indent=2)
  if desc["synthetic_features"]:
    logging.warning("the image modality holds SYNTHETIC class-conditional features (not ResNet "
                    "features of CUB images)")
  logging.info("model %s, λ = %s; %d train / %d test rows (%s); vocabulary %d; %d device(s)",
               model.names, [round(m.llik_scale, 5) for m in model.modalities], len(train_set),
               len(test_set), desc["kind"], len(vocab), jax.device_count())
  try:
    final = train.train_and_evaluate(model, config, FLAGS.workdir, train_set, test_set,
                                     figures=False)
  except train.NonFiniteLossError as e:
    _fail(str(e), 1)
  logging.info("done: %s", json.dumps(final))

  params, step = restore_params(model, run_info, FLAGS.workdir)
  params = with_batch_stats(model, params, train_set, num_batches=FLAGS.bn_batches,
                            batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  metrics, text = report(model, params, train_set, test_set, vocab, seed=FLAGS.seed,
                         num=FLAGS.report_num, num_examples=FLAGS.num_examples)
  metrics = {"checkpoint_step": step, **final, **metrics,
             "synthetic_features": desc["synthetic_features"]}
  header = ("[image modality: SYNTHETIC class-conditional features]\n"
            if desc["synthetic_features"] else "")
  with open(os.path.join(FLAGS.workdir, "samples.txt"), "w") as f:
    f.write(header + text + "\n")
  with open(os.path.join(FLAGS.workdir, "report.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  print(header + json.dumps(metrics, indent=2) + "\n" + text)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.flags_parser(PROG))
