r"""Evaluates a trained run: Tables 1-3 and Figs 4-5 of the paper for digit runs, Table 4 for CUB.

    python experiments/evaluate.py --workdir=runs/mnist_svhn

Reads the workdir's run.json and a checkpoint (`mmvae_jax.load_run`: any experiment, any model,
any number of modalities) and runs `mmvae_jax.evaluation.report`:

* digit runs (mnist_svhn.py, three_digits.py): digit classifiers per modality (cached), the
  latent linear probe (Table 1), coherence from every proper subset of the modalities to every
  other modality plus joint coherence of prior samples (Table 2), the importance-sampled
  log-likelihoods (Table 3), and the figures (eval_*.png); a single-modality VAE gets the probe,
  the likelihood and the figures;
* CUB runs (cub.py): Table 4, the CCA coherence of image features and captions (--batch_size,
  --joint_num: default 1,000 prior samples for CUB, as the paper).

tfds sources missing from the data directory are downloaded and prepared first, as by the
training scripts (--download, --download_mirror).

The tables show the paper's numbers beside ours where it has them, and say so when a modality
was trained on a stand-in dataset. Results go to <workdir>/results.json (results of parts not
run now are kept when the checkpoint, sources and seed match). For the differences between the
paper and the official code see docs/official-code.md.

Comparison rows (one row per model, ours beside the paper's): evaluate every run first, then

    python experiments/evaluate.py --workdir=W_mmvae --compare=W_mvae,W_vae_mnist,W_vae_svhn

(with --parts=none it only combines the existing results.json files).

Quick check on a CPU:

    python experiments/evaluate.py --workdir=W --num_test=2000 --probe_num_train=20000 \
        --classifier_epochs=2 --llik_k=100 --llik_num=100 --joint_num=2000

Started on every host of a run of several processes (the training command's way, see README
"Several hosts"), process 0 evaluates on its own devices and writes; the others wait for it
and end with it, so the results are those of a single process, counted once.
"""
from __future__ import annotations

import os

from absl import app, flags
from absl import logging as absl_logging

from mmvae_jax import cli

PROG = "evaluate.py"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir with run.json and checkpoints/.")
flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate (-1: the latest).")
flags.DEFINE_list("source", [], "Read other data than run.json's: name=spec,... (spec a tfds "
                  "name or an .npz), e.g. --source=svhn=usps_colour.npz.")
flags.DEFINE_string("data_dir", None, "Data directory (default: run.json's).")
flags.DEFINE_integer("seed", -1, "Seed of the evaluation samples and subsets (-1: the run's seed).")
flags.DEFINE_string("parts", "classifiers,probe,coherence,likelihood,figures",
                    "Comma-separated parts to run (coherence needs classifiers; a single-"
                    "modality VAE runs only probe, likelihood, figures); none: evaluate nothing, "
                    "only combine results.json files for --compare.")
flags.DEFINE_integer("batch_size", 256, "Batch size of the coherence and probe passes.")
flags.DEFINE_integer("num_test", 0, "Random subset of test pairs for coherence and the probe "
                     "test (0: all).")
flags.DEFINE_integer("joint_num", 10000, "Prior samples for joint coherence (paper: 10,000; CUB "
                     "1,000 unless given).")
flags.DEFINE_integer("probe_epochs", 1, "Epochs of the linear probe (official code: 30).")
flags.DEFINE_integer("probe_num_train", 0, "Random subset of train pairs for the probe (0: all).")
flags.DEFINE_enum("classifier_recipe", "source", ["source", "paired"],
                  "source: train each digit classifier on its source's own train split (the "
                  "paper's 'off-the-shelf' reading); paired: the official 30 epochs over the "
                  "paired train set.")
flags.DEFINE_integer("classifier_epochs", 0, "Classifier epochs (0: the recipe's default).")
flags.DEFINE_string("classifier_cache", None,
                    "Classifier cache folder (default ~/.cache/mmvae_jax/classifiers).")
flags.DEFINE_boolean("retrain_classifiers", False, "Retrain the classifiers even when cached.")
flags.DEFINE_integer("llik_k", 1000, "Importance samples K per proposal component for Table 3 "
                     "(paper: 1000).")
flags.DEFINE_integer("llik_num", 1000, "Random subset of test pairs for Table 3 (0: all).")
flags.DEFINE_integer("llik_chunk", 100, "Samples per component decoded at once (bounds memory).")
flags.DEFINE_integer("llik_batch", 0, "Pairs per likelihood batch (0: floor(12000 / K)).")
flags.DEFINE_integer("kl_num", 1000, "Test pairs of the KL box plot.")
flags.DEFINE_integer("traversal_steps", 11, "Points per latent traversal over +-5 prior std.")
flags.DEFINE_enum("decoder_impl", None, ["auto", "matmul", "conv"],
                  "Transposed-convolution formulation of the decoders (default: the run's).")
flags.DEFINE_list("compare", [], "Other evaluated workdirs (each with results.json): print "
                  "Tables 1-3 with one row per model beside the paper's rows and store them in "
                  "results.json['comparison'].")
cli.define_distributed_flags()
cli.define_download_flags()

SETTINGS = ("seed", "batch_size", "num_test", "probe_epochs", "probe_num_train",
            "classifier_recipe", "classifier_epochs", "classifier_cache", "retrain_classifiers",
            "llik_k", "llik_num", "llik_chunk", "llik_batch", "kl_num", "traversal_steps")


def fail(message: str, code: int = 2):
  cli.fail(PROG, message, code, together=False)  # other processes wait in wait_for_primary


def say(message: str = "") -> None:
  print(message, flush=True)


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir:
    fail("--workdir is required")
  from mmvae_jax.evaluation import report
  workdir = FLAGS.workdir
  try:
    settings = report.Settings(
        parts=report.parse_parts(FLAGS.parts),
        joint_num=FLAGS.joint_num if FLAGS["joint_num"].present else None,
        **{name: FLAGS[name].value for name in SETTINGS})
    settings.validate()
    sources = report.parse_sources(FLAGS.source)
  except ValueError as e:
    fail(first_line(e))
  others = []
  for wd in (w.strip() for w in FLAGS.compare):
    if wd and os.path.abspath(wd) != os.path.abspath(workdir) and wd not in others:
      others.append(wd)
  if not settings.parts and not others:
    fail("--parts=none evaluates nothing: give --compare=W1,... to combine evaluated workdirs")
  if cli.initialize_from_flags(PROG):
    from mmvae_jax import multihost
    if not multihost.is_primary():
      try:
        multihost.wait_for_primary("evaluate")
      except multihost.PeerStopped as e:
        fail(str(e), e.code)
      return
    cli.guarded(PROG, lambda: evaluate(workdir, settings, sources, others))
    multihost.primary_done("evaluate")
    return
  evaluate(workdir, settings, sources, others)


def evaluate(workdir: str, settings, sources: dict, others: list[str]) -> None:
  """Evaluates `workdir` (process 0 of several, or the only process) and writes results.json."""
  import mmvae_jax
  from mmvae_jax.evaluation import report
  try:
    for wd in others:  # fail before a long evaluation when a compared workdir was not evaluated
      report.load_results(wd)
    if not settings.parts:
      report.compare_and_write(workdir, report.load_results(workdir), others, say)
      return
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines would bury the tables
    run = report.with_overrides(mmvae_jax.load_run(workdir, FLAGS.step), sources=sources,
                                data_dir=FLAGS.data_dir, decoder_impl=FLAGS.decoder_impl)
    cli.prepare_data(PROG, run.experiment, run.config, run.workdir, collective=False, say=say)
    results = report.evaluate(run, settings, say=say)
  except (ValueError, FileNotFoundError) as e:  # mmvae_jax.RunError is a ValueError
    fail(first_line(e))
  if others:
    report.compare_and_write(workdir, results, others, say)
  elif results.get("notice"):
    say(results["notice"])


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
