r"""Trains the MNIST-SVHN MMVAE (the paper's headline model) with the official defaults.

    python experiments/mnist_svhn.py --k=30

Offline (this repository's CI machine has no SVHN), with real MNIST and the SVHN-shaped USPS
stand-in of ../shared/data:

    python experiments/mnist_svhn.py --mnist=../shared/data/mnist.npz \
        --svhn=../shared/data/usps_colour.npz --workdir=runs/offline

Re-running the same command in the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

from absl import app, flags

from mmvae_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "mmvae", ["mmvae", "mvae", "vae_mnist", "vae_svhn"],
                  "mmvae: mixture of experts (the paper); mvae: product of experts (Wu & Goodman "
                  "2018) with the same networks; vae_mnist / vae_svhn: single-modality VAEs "
                  "(the single-VAE baselines, trained on that source alone).")
flags.DEFINE_integer("k", 30, "Importance samples per expert (K).")
flags.DEFINE_enum("estimator", "legacy", ["legacy", "dreg", "iwae"],
                  "Gradient estimator: legacy = the official code's effective gradient (IWAE "
                  "sticking-the-landing, reproduces its numbers); dreg = true doubly-"
                  "reparameterised gradients as the paper describes; iwae = plain autodiff.")
flags.DEFINE_enum("objective", None, ["moe_iwae", "moe_elbo"],
                  "moe_iwae (eq. (3); for --model=mvae the K-sample sub-sampled IWAE) or "
                  "moe_elbo (the official m_elbo, which ignores K and --looser; for --model=mvae "
                  "Wu & Goodman's sub-sampled ELBO). Default: moe_elbo for mvae, else moe_iwae.")
flags.DEFINE_boolean("looser", True, "Stratified bound of eq. (3); --nolooser: tight bound.")
flags.DEFINE_boolean("learn_prior", True, "Learn the prior's scale logits.")
flags.DEFINE_integer("latent_dim", 20, "Latent dimension D.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split over all local devices).")
flags.DEFINE_integer("epochs", 30, "Epochs over the paired training set.")
flags.DEFINE_integer("max_steps", 0, "Stop after this many steps in total (0: no limit).")
flags.DEFINE_float("lr", 1e-3, "Learning rate of Adam with PyTorch-style AMSGrad.")
flags.DEFINE_float("llik_scaling", 0.0,
                   "λ of the MNIST likelihood; 0 means the default 3072/784 (SVHN's λ is 1).")
flags.DEFINE_integer("partners", 30, "Same-class partners per instance (official code: 30; the "
                     "paper says 20).")
flags.DEFINE_integer("seed", 1, "Seed of the parameters, pairing, data order and samples.")
flags.DEFINE_string("workdir", "runs/mnist_svhn", "Checkpoints, logs and figures go here.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("mnist", "mnist", "MNIST-like source: a tfds name or an .npz path.")
flags.DEFINE_string("svhn", "svhn_cropped", "SVHN-like source: a tfds name or an .npz path.")
flags.DEFINE_integer("eval_every", 0, "Steps between test evaluations (0: each epoch end).")
flags.DEFINE_integer("eval_batches", 0, "Test batches per evaluation (0: all test pairs).")
flags.DEFINE_integer("eval_batch_size", 0, "Test batch size (0: --batch_size).")
flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints (also at epoch ends).")
flags.DEFINE_integer("log_every", 10, "Steps between metric logs.")
flags.DEFINE_enum("decoder_impl", "auto", ["auto", "matmul", "conv"],
                  "SVHN decoder formulation: matmul (fast on CPU), conv (XLA convolutions, "
                  "fast on GPU/TPU), auto picks by backend.")
cli.define_host_memory_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  num_modalities = 1 if FLAGS.model.startswith("vae_") else 2
  cli.apply_host_memory_flags(num_modalities * FLAGS.k * FLAGS.batch_size)
  import jax
  from mmvae_jax import data, model as model_lib, train

  objective = FLAGS.objective or ("moe_elbo" if FLAGS.model == "mvae" else "moe_iwae")
  config = train.TrainConfig(
      k=FLAGS.k, estimator=FLAGS.estimator, objective=objective, looser=FLAGS.looser,
      learn_prior=FLAGS.learn_prior, latent_dim=FLAGS.latent_dim, batch_size=FLAGS.batch_size,
      epochs=FLAGS.epochs, max_steps=FLAGS.max_steps, lr=FLAGS.lr,
      llik_scaling=FLAGS.llik_scaling, partners=FLAGS.partners, seed=FLAGS.seed,
      eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches,
      eval_batch_size=FLAGS.eval_batch_size, checkpoint_every=FLAGS.checkpoint_every,
      log_every=FLAGS.log_every)
  try:
    config.validate(1)  # every value but the device split, before a backend starts (and logs)
    config.validate(jax.device_count())
  except ValueError as e:
    print(f"mnist_svhn.py: error: {e}", file=sys.stderr)
    sys.exit(2)

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  specs = {"mnist": FLAGS.mnist, "svhn": FLAGS.svhn}
  used = {"vae_mnist": ["mnist"], "vae_svhn": ["svhn"]}.get(FLAGS.model, ["mnist", "svhn"])
  try:
    train_sources = data.load_sources([specs[n] for n in used], "train", FLAGS.data_dir)
    test_sources = data.load_sources([specs[n] for n in used], "test", FLAGS.data_dir)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"mnist_svhn.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  # A single-modality VAE visits its plain dataset (each instance once per epoch), as the
  # official unimodal models do; pairs of two sources use --partners.
  partners = FLAGS.partners if len(used) > 1 else 1
  train_set = data.PairedDataset(train_sources, partners=partners, seed=FLAGS.seed)
  test_set = data.PairedDataset(test_sources, partners=partners, seed=FLAGS.seed)
  shapes = {n: s.image_shape for n, s in zip(used, train_sources)}
  model = model_lib.mnist_svhn(
      FLAGS.latent_dim, llik_scaling=FLAGS.llik_scaling, learn_prior=FLAGS.learn_prior,
      decoder_impl=FLAGS.decoder_impl, mnist_shape=shapes.get("mnist", (28, 28, 1)),
      svhn_shape=shapes.get("svhn", (32, 32, 3)))
  if FLAGS.model == "mvae":
    from mmvae_jax import mvae
    model = mvae.MVAE(modalities=model.modalities, latent_dim=FLAGS.latent_dim)
  elif FLAGS.model.startswith("vae_"):
    from mmvae_jax import mvae
    model = mvae.single_vae(model.modality(used[0]), FLAGS.latent_dim,
                            learn_prior=FLAGS.learn_prior)

  os.makedirs(FLAGS.workdir, exist_ok=True)
  run_info = {"model": FLAGS.model, "config": dataclasses.asdict(config),
              "sources": {**{n: specs[n] for n in used}, "data_dir": FLAGS.data_dir},
              "modalities": {m.name: {"shape": list(m.data_shape), "llik_scale": m.llik_scale}
                             for m in model.modalities},
              "train_pairs": len(train_set), "test_pairs": len(test_set),
              "devices": [str(d) for d in jax.devices()]}
  with open(os.path.join(FLAGS.workdir, "run.json"), "w") as f:
    json.dump(run_info, f, indent=2)
  logging.info("model %s; %d train / %d test pairs; %d device(s)", model.names, len(train_set),
               len(test_set), jax.device_count())
  try:
    final = train.train_and_evaluate(model, config, FLAGS.workdir, train_set, test_set)
  except train.NonFiniteLossError as e:
    print(f"mnist_svhn.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  logging.info("done: %s", json.dumps(final))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("mnist_svhn.py"))
