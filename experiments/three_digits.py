r"""Three-modality digits, offline: MNIST + USPS colour (SVHN-shaped) + USPS grey (16×16).

    python experiments/three_digits.py --max_steps=20 --k=4 --batch_size=32
    python experiments/three_digits.py --model=mvae --workdir=runs/three_digits_mvae

Modalities (data from ../shared/data, paired by digit label for any number of sources):

  mnist        28×28×1  official MNIST MLP (mmvae_jax.networks)        λ = 3072/784
  usps_colour  32×32×3  official SVHN CNN (mmvae_jax.networks)         λ = 1
  usps         16×16×1  the MNIST MLP's widths for 16×16 (networks_generic)  λ = 3072/256 = 12

λ_d = (largest datum size) / (datum size d), the MNIST-SVHN convention (3072/784 for MNIST)
generalised. Every likelihood is Laplace with scale 0.75, as MNIST-SVHN.

--model=mmvae: the MMVAE (Laplace experts with softmax·D + 1e-6 scales, learned Laplace prior),
trained with the stratified MoE-IWAE of eq. (3) over the three experts.
--model=mvae: the MVAE baseline (mmvae_jax.mvae.MVAE), the same networks with Gaussian experts,
a product-of-experts posterior and a N(0, I) prior; by default trained with Wu & Goodman's
sub-sampled ELBO (--objective=moe_elbo: joint + one ELBO per modality; moe_iwae: the K-sample
IWAE version). The test objective logged for the MVAE is the IWAE bound of the joint PoE posterior.

Re-running the same command in the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from absl import app, flags

from mmvae_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
PROG = "three_digits.py"

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "mmvae", ["mmvae", "mvae"],
                  "mmvae: mixture of experts; mvae: product of experts (Wu & Goodman 2018).")
flags.DEFINE_integer("k", 30, "Importance samples per expert (K).")
flags.DEFINE_enum("estimator", "legacy", ["legacy", "dreg", "iwae"],
                  "Gradient estimator: legacy = the official code's (IWAE-STL); dreg = true "
                  "doubly-reparameterised gradients; iwae = plain autodiff.")
flags.DEFINE_enum("objective", "auto", ["auto", "moe_iwae", "moe_elbo"],
                  "auto: moe_iwae for the MMVAE, moe_elbo (sub-sampled ELBO) for the MVAE.")
flags.DEFINE_boolean("looser", True, "MMVAE: stratified bound of eq. (3); --nolooser: tight.")
flags.DEFINE_boolean("learn_prior", True, "MMVAE: learn the prior's scale logits.")
flags.DEFINE_enum("mvae_scale", "logvar", ["logvar", "softplus", "modality"],
                  "MVAE expert scale from the encoder's second head: logvar (Wu & Goodman), "
                  "softplus + 1e-6, or modality (the MMVAE's softmax·D + 1e-6).")
flags.DEFINE_integer("latent_dim", 20, "Latent dimension D.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split over all local devices).")
flags.DEFINE_integer("epochs", 30, "Epochs over the paired training set.")
flags.DEFINE_integer("max_steps", 0, "Stop after this many steps in total (0: no limit).")
flags.DEFINE_float("lr", 1e-3, "Learning rate of Adam with PyTorch-style AMSGrad.")
flags.DEFINE_integer("partners", 30, "Same-class partners per instance (official: 30).")
flags.DEFINE_integer("seed", 1, "Seed of the parameters, pairing, data order and samples.")
flags.DEFINE_string("workdir", "runs/three_digits", "Checkpoints, logs and figures go here.")
flags.DEFINE_string("mnist", os.path.join(SHARED, "mnist.npz"), "MNIST .npz (28×28×1).")
flags.DEFINE_string("usps_colour", os.path.join(SHARED, "usps_colour.npz"),
                    "SVHN-shaped USPS .npz (32×32×3).")
flags.DEFINE_string("usps", os.path.join(SHARED, "usps.npz"), "USPS .npz (16×16×1).")
flags.DEFINE_integer("eval_every", 0, "Steps between test evaluations (0: each epoch end).")
flags.DEFINE_integer("eval_batches", 0, "Test batches per evaluation (0: all test pairs).")
flags.DEFINE_integer("eval_batch_size", 0, "Test batch size (0: --batch_size).")
flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints (also at epoch ends).")
flags.DEFINE_integer("log_every", 10, "Steps between metric logs.")
flags.DEFINE_boolean("figures", True, "Save generation/reconstruction PNGs at each epoch end.")
flags.DEFINE_enum("decoder_impl", "auto", ["auto", "matmul", "conv"],
                  "SVHN-CNN decoder formulation: matmul (fast on CPU), conv (GPU/TPU), auto.")
cli.define_host_memory_flags()

NAMES = ("mnist", "usps_colour", "usps")


def build_model(kind: str, shapes, *, latent_dim: int = 20, learn_prior: bool = True,
                mvae_scale: str = "logvar", decoder_impl: str = "auto"):
  """The three-modality MMVAE or MVAE for data shapes (mnist, usps_colour, usps).

  Returns an `MMVAE` or `MVAE` with modalities named `NAMES`; λ_d = max_e |x_e| / |x_d|.
  """
  import math

  from mmvae_jax import model as model_lib
  from mmvae_jax import mvae as mvae_lib
  from mmvae_jax import networks, networks_generic

  shapes = [tuple(s) for s in shapes]
  sizes = [math.prod(s) for s in shapes]
  lam = [max(sizes) / s for s in sizes]
  if shapes[0] == networks.MNIST_SHAPE:
    mnist_enc, mnist_dec = (networks.MnistEncoder(latent_dim=latent_dim),
                            networks.MnistDecoder(latent_dim=latent_dim))
  else:  # same widths, any shape
    mnist_enc, mnist_dec = (networks_generic.MLPEncoder(latent_dim=latent_dim),
                            networks_generic.MLPDecoder(data_shape=shapes[0]))
  encoders = [mnist_enc, networks.SvhnEncoder(latent_dim=latent_dim),
              networks_generic.MLPEncoder(latent_dim=latent_dim)]
  decoders = [mnist_dec, networks.SvhnDecoder(latent_dim=latent_dim, impl=decoder_impl),
              networks_generic.MLPDecoder(data_shape=shapes[2])]
  mods = tuple(model_lib.Modality(name=n, encoder=e, decoder=d, data_shape=s, llik_scale=l)
               for n, e, d, s, l in zip(NAMES, encoders, decoders, shapes, lam))
  if kind == "mvae":
    return mvae_lib.MVAE(mods, latent_dim=latent_dim, expert_scale=mvae_scale)
  return model_lib.MMVAE(modalities=mods, latent_dim=latent_dim, learn_prior=learn_prior)


def _fail(msg: str, code: int = 2):
  cli.fail(PROG, msg, code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.apply_host_memory_flags(len(NAMES) * FLAGS.k * FLAGS.batch_size)
  import jax
  from mmvae_jax import data, train

  objective = FLAGS.objective
  if objective == "auto":
    objective = "moe_elbo" if FLAGS.model == "mvae" else "moe_iwae"
  config = train.TrainConfig(
      k=FLAGS.k, estimator=FLAGS.estimator, objective=objective, looser=FLAGS.looser,
      learn_prior=FLAGS.learn_prior, latent_dim=FLAGS.latent_dim, batch_size=FLAGS.batch_size,
      epochs=FLAGS.epochs, max_steps=FLAGS.max_steps, lr=FLAGS.lr, partners=FLAGS.partners,
      seed=FLAGS.seed, eval_every=FLAGS.eval_every, eval_batches=FLAGS.eval_batches,
      eval_batch_size=FLAGS.eval_batch_size, checkpoint_every=FLAGS.checkpoint_every,
      log_every=FLAGS.log_every)
  try:
    config.validate(jax.device_count())
  except ValueError as e:
    _fail(str(e))

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  specs = [FLAGS.mnist, FLAGS.usps_colour, FLAGS.usps]
  try:
    train_sources = data.load_sources(specs, "train")
    test_sources = data.load_sources(specs, "test")
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  train_set = data.PairedDataset(train_sources, partners=FLAGS.partners, seed=FLAGS.seed)
  test_set = data.PairedDataset(test_sources, partners=FLAGS.partners, seed=FLAGS.seed)
  model = build_model(FLAGS.model, [s.image_shape for s in train_sources],
                      latent_dim=FLAGS.latent_dim, learn_prior=FLAGS.learn_prior,
                      mvae_scale=FLAGS.mvae_scale, decoder_impl=FLAGS.decoder_impl)

  os.makedirs(FLAGS.workdir, exist_ok=True)
  run_info = {"model": FLAGS.model, "config": dataclasses.asdict(config),
              "sources": dict(zip(NAMES, specs)),
              "modalities": {m.name: {"shape": list(m.data_shape), "llik_scale": m.llik_scale}
                             for m in model.modalities},
              "train_pairs": len(train_set), "test_pairs": len(test_set),
              "devices": [str(d) for d in jax.devices()]}
  if FLAGS.model == "mvae":
    run_info["mvae_scale"] = FLAGS.mvae_scale
  with open(os.path.join(FLAGS.workdir, "run.json"), "w") as f:
    json.dump(run_info, f, indent=2)
  logging.info("%s %s, λ = %s; %d train / %d test pairs; %d device(s)", FLAGS.model,
               model.names, [round(m.llik_scale, 4) for m in model.modalities], len(train_set),
               len(test_set), jax.device_count())
  try:
    final = train.train_and_evaluate(model, config, FLAGS.workdir, train_set, test_set,
                                     figures=FLAGS.figures)
  except train.NonFiniteLossError as e:
    _fail(str(e), 1)
  logging.info("done: %s", json.dumps(final))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
