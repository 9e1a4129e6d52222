r"""Evaluates a trained MNIST-SVHN MMVAE: the paper's Tables 1-3 and Figs 4-5 (spec §9).

    python experiments/evaluate.py --workdir=runs/offline

Reads `run.json` and the latest checkpoint of --workdir (as written by
experiments/mnist_svhn.py), rebuilds the model and the paired data, and computes

* digit classifiers for each modality (cached, checksummed; see mmvae_jax.evaluation.classifiers),
* Table 1: the latent linear probe (one posterior sample, per modality),
* Table 2: cross coherence in both directions and joint coherence (10,000 prior samples),
* Table 3: the four importance-sampled log-likelihoods (K = 1000, chunked),
* figures: generations, reconstructions / cross generations, latent traversals over ±5 learned
  prior standard deviations and the per-dimension KL box plot,

prints the tables with the paper's MMVAE numbers beside ours and writes `results.json` and
`eval_*.png` into the workdir. It states the data sources the run was trained on: numbers from
a stand-in source (e.g. usps_colour.npz in SVHN's slot) are never the paper's SVHN numbers.

Quick check on a CPU (sizes limited by flags):

    python experiments/evaluate.py --workdir=W --num_test=2000 --probe_num_train=20000 \
        --classifier_epochs=2 --llik_k=100 --llik_num=100 --joint_num=2000
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir with run.json and checkpoints/.")
flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate (-1: the latest).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (default: run.json's).")
flags.DEFINE_string("mnist", None, "Override the MNIST-slot source of run.json (tfds name or .npz).")
flags.DEFINE_string("svhn", None, "Override the SVHN-slot source of run.json (tfds name or .npz).")
flags.DEFINE_integer("seed", -1, "Seed of the evaluation samples and subsets (-1: the run's seed).")
flags.DEFINE_string("parts", "classifiers,probe,coherence,likelihood,figures",
                    "Comma-separated parts to run (coherence needs classifiers).")
flags.DEFINE_integer("batch_size", 256, "Batch size of the coherence and probe passes.")
flags.DEFINE_integer("num_test", 0, "Random subset of test pairs for coherence and the probe "
                     "test (0: all; the paper uses all 300,000).")
flags.DEFINE_integer("joint_num", 10000, "Prior samples for joint coherence (paper: 10,000).")
flags.DEFINE_integer("probe_epochs", 1, "Epochs of the linear probe (official code: 30).")
flags.DEFINE_integer("probe_num_train", 0, "Random subset of train pairs for the probe (0: all).")
flags.DEFINE_enum("classifier_recipe", "source", ["source", "paired"],
                  "source: train each digit classifier on its source's own train split (the "
                  "paper's 'off-the-shelf' reading); paired: the official 30 epochs over the "
                  "paired train set.")
flags.DEFINE_integer("classifier_epochs", 0, "Classifier epochs (0: the recipe default: source 5 epochs "
                     "and at least 1,500 steps (usps_colour: 52), paired 30).")
flags.DEFINE_string("classifier_cache", None,
                    "Classifier cache folder (default ~/.cache/mmvae_jax/classifiers).")
flags.DEFINE_boolean("retrain_classifiers", False, "Retrain the classifiers even when cached.")
flags.DEFINE_integer("llik_k", 1000, "Importance samples per expert K for Table 3 (paper: 1000).")
flags.DEFINE_integer("llik_num", 1000, "Random subset of test pairs for Table 3 (0: all).")
flags.DEFINE_integer("llik_chunk", 100, "Samples per expert decoded at once (bounds memory).")
flags.DEFINE_integer("llik_batch", 0, "Pairs per likelihood batch (0: floor(12000 / K)).")
flags.DEFINE_integer("kl_num", 1000, "Test pairs of the KL box plot.")
flags.DEFINE_integer("traversal_steps", 11, "Points per latent traversal over ±5 prior std.")
flags.DEFINE_enum("decoder_impl", "auto", ["auto", "matmul", "conv"], "SVHN decoder formulation.")

PARTS = ("classifiers", "probe", "coherence", "likelihood", "figures")

# The paper's MMVAE numbers (spec §11; Table 3's joint column is missing in the paper text).
PAPER_TABLE1 = {"mnist": 91.3, "svhn": 68.0}
PAPER_TABLE2 = {"joint": 42.1, "mnist→svhn": 86.4, "svhn→mnist": 69.1}
PAPER_TABLE3 = {("mnist", "svhn"): (None, 868.76, 868.37, 628.31),
                ("svhn", "mnist"): (None, 3441.01, 3441.01, 2337.56)}


def _parse(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"evaluate.py: error: {e}", file=sys.stderr)
    sys.exit(2)


def fail(message: str, code: int = 2):
  print(f"evaluate.py: error: {message}", file=sys.stderr)
  sys.exit(code)


def say(message: str = "") -> None:
  print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Sources: which data the run was trained on.


def _stem(spec: str) -> str:
  base = os.path.basename(spec.rstrip("/"))
  return base[:-4] if base.lower().endswith(".npz") else base


def is_genuine(slot: str, spec: str) -> bool:
  """Whether a source spec is the paper's dataset for `slot` ("mnist" or "svhn")."""
  stem = _stem(spec).lower()
  if slot == "mnist":
    return stem == "mnist"
  return "svhn" in stem


def resolve_spec(spec: str, workdir: str) -> str:
  """An .npz path relative to the cwd, the repository or the workdir's parent; else as given."""
  if not spec.lower().endswith(".npz") or os.path.exists(spec) or os.path.isabs(spec):
    return spec
  for root in (REPO, os.path.dirname(os.path.abspath(workdir))):
    cand = os.path.join(root, spec)
    if os.path.exists(cand):
      return cand
  return spec


def slot_label(slot: str, spec: str) -> str:
  """"MNIST" / "SVHN" for the real datasets, else e.g. "usps_colour (stand-in for SVHN)"."""
  return slot.upper() if is_genuine(slot, spec) else f"{_stem(spec)} (stand-in for {slot.upper()})"


# ---------------------------------------------------------------------------------------------
# Loading.


def load_run(workdir: str) -> dict:
  path = os.path.join(workdir, "run.json")
  if not os.path.isfile(path):
    fail(f"{path} not found: train with experiments/mnist_svhn.py --workdir={workdir} first")
  with open(path) as f:
    return json.load(f)


def restore_params(model, run: dict, workdir: str, step: int):
  import jax
  from mmvae_jax import train
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
    fail(f"no checkpoint in {ckpt_dir}")
  fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
  config = train.TrainConfig(**{k: v for k, v in run["config"].items() if k in fields})
  template = train.init_state(model, train.make_optimizer(config), jax.random.key(0))
  ckpt = train.Checkpointer(workdir)
  try:
    latest = ckpt.latest_step()
    if latest is None:
      fail(f"no checkpoint in {ckpt_dir}")
    chosen = latest if step < 0 else step
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    if chosen not in steps:
      fail(f"no checkpoint step {chosen} in {ckpt_dir} (steps: {steps})")
    try:
      state, extra = ckpt.restore(template, {"epoch": 0, "step_in_epoch": 0}, step=chosen)
    except (ValueError, TypeError, KeyError) as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      fail(f"cannot restore step {chosen} of {ckpt_dir} into this model ({msg})")
  finally:
    ckpt.close()
  return state.params, int(chosen), extra


# ---------------------------------------------------------------------------------------------
# Printing.


def _fmt(v, width=10, digits=2):
  if v is None:
    return f"{'—':>{width}}"
  if isinstance(v, str):
    return f"{v:>{width}}"
  return f"{v:>{width}.{digits}f}"


def print_table1(res: dict, labels: dict) -> None:
  say("\nTable 1: digit accuracy (%) of a linear probe on one posterior sample z ~ q_m(z | x_m)")
  say(f"  {'modality':<36}{'ours':>10}{'paper MMVAE':>14}")
  for slot in ("mnist", "svhn"):
    note = "" if labels[slot] == slot.upper() else f"   (real {slot.upper()}; not comparable here)"
    say(f"  {labels[slot]:<36}{_fmt(res['accuracy'][slot])}{_fmt(PAPER_TABLE1[slot], 14, 1)}{note}")
  say(f"  ({res['epochs']} probe epoch(s) over {res['num_train']} train pairs, "
      f"{res['num_test']} test pairs; the paper: 30 epochs over all pairs, 5 models)")


def print_table2(cross: dict, joint: dict, labels: dict) -> None:
  genuine = all(labels[s] == s.upper() for s in ("mnist", "svhn"))
  say("\nTable 2: probability of digit matching (%) (classifiers of the *target* modality)")
  cols = ["joint", "mnist→svhn", "svhn→mnist"]
  say(f"  {'':<14}" + "".join(f"{c:>14}" for c in ["Joint", "Cross M→S", "Cross S→M"]))
  ours = [joint["joint"] if joint else None] + [cross["cross"].get(c) if cross else None
                                                for c in cols[1:]]
  say(f"  {'ours':<14}" + "".join(_fmt(v, 14) for v in ours))
  if genuine:
    say(f"  {'paper MMVAE':<14}" + "".join(_fmt(PAPER_TABLE2[c], 14, 1) for c in cols))
  else:
    say(f"  {'paper MMVAE':<14}" + "".join(_fmt(PAPER_TABLE2[c], 14, 1) for c in cols)
        + "   (real SVHN; not comparable here)")
  say("  Directions are source→target (M = the MNIST slot, S = the SVHN slot). The paper's text "
      "says 86.4% = MNIST→SVHN, 69.1% = SVHN→MNIST; a third-party reading swaps them (spec "
      "trap 20).")
  if cross:
    say(f"  cross: {cross['num']} test pairs, K = 1, decoder means; self-reconstruction "
        + ", ".join(f"{k} {v:.2f}%" for k, v in cross["reconstruction"].items()))
  if joint:
    say(f"  joint: {joint['num']} prior samples; predicted-digit counts "
        + "; ".join(f"{n}: {c}" for n, c in joint["class_counts"].items()))


def print_table3(res: dict, labels: dict) -> None:
  genuine = all(labels[s] == s.upper() for s in ("mnist", "svhn"))
  lam = res["lambda"]
  say(f"\nTable 3: log-likelihoods ({res['num_samples']}-sample importance estimates, "
      f"{res['num']} test pairs)")
  heads = ["log p(xm,xn) [λ]", "log p(xm|xm,xn)", "log p(xm|xm)", "log p(xm|xn)"]
  say(f"  {'m, n':<16}{'':<8}" + "".join(f"{h:>19}" for h in heads))
  c = res["conditional"]
  for m, n in (("mnist", "svhn"), ("svhn", "mnist")):
    ours = [res["joint_weighted"], c[f"log p({m}|mnist,svhn)"], c[f"log p({m}|{m})"],
            c[f"log p({m}|{n})"]]
    name = f"{m.upper()}, {n.upper()}"
    say(f"  {name:<16}{'ours':<8}" + "".join(_fmt(v, 19) for v in ours))
    paper = PAPER_TABLE3[(m, n)]
    say(f"  {'':<16}{'paper':<8}" + "".join(_fmt(v if v is not None else "(missing)", 19)
                                             for v in paper)
        + ("" if genuine else "   (real SVHN; not comparable here)"))
  say(f"  λ convention: the joint column includes λ inside the log weights (λ = "
      + ", ".join(f"{k} {v:.4g}" for k, v in lam.items())
      + f"), as the official tight m_iwae: it is NOT a normalised log-density. With every "
      f"λ = 1 it is {res['joint_unweighted']:.2f}. The conditional columns are unweighted.")
  say("  The paper's positive magnitudes are impossible with the Laplace likelihood scale 0.75 "
      "(spec trap 21): compare orderings, e.g. p(xm|xm,xn) >= p(xm|xm) for MMVAE: "
      + ", ".join(f"{m}: {c[f'log p({m}|mnist,svhn)'] - c[f'log p({m}|{m})']:+.2f}"
                  for m in ("mnist", "svhn")))


# ---------------------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir:
    fail("--workdir is required")
  parts = [p.strip() for p in FLAGS.parts.split(",") if p.strip()]
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    fail(f"unknown --parts entry {unknown[0]!r}: choose from {','.join(PARTS)}")
  if "coherence" in parts and "classifiers" not in parts:
    parts.insert(0, "classifiers")
  for name in ("num_test", "joint_num", "probe_num_train", "llik_num", "llik_batch", "kl_num"):
    if getattr(FLAGS, name) < 0:
      fail(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
  for name in ("probe_epochs", "llik_k", "llik_chunk", "batch_size", "traversal_steps"):
    if getattr(FLAGS, name) < 1:
      fail(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines would bury the tables
  workdir = FLAGS.workdir
  run = load_run(workdir)
  import jax
  import numpy as np
  from mmvae_jax import data, model as model_lib
  from mmvae_jax import evaluation as ev

  cfg = run["config"]
  seed = cfg.get("seed", 1) if FLAGS.seed < 0 else FLAGS.seed
  specs = {"mnist": FLAGS.mnist or run["sources"]["mnist"],
           "svhn": FLAGS.svhn or run["sources"]["svhn"]}
  data_dir = FLAGS.data_dir or run["sources"].get("data_dir")
  labels = {slot: slot_label(slot, spec) for slot, spec in specs.items()}
  stand_ins = [slot for slot in specs if not is_genuine(slot, specs[slot])]

  say(f"Workdir {workdir}: trained on")
  for slot, spec in specs.items():
    say(f"  {slot:<6} modality <- {spec}" + ("" if slot not in stand_ins else
                                            f"   [{_stem(spec)}: NOT {slot.upper()}]"))
  notice = None
  if stand_ins:
    notice = ("NOTICE: the " + " and ".join(f"{s!r} modality was trained on {_stem(specs[s])!r}, "
                                              f"NOT {s.upper()}" for s in stand_ins)
              + ". All numbers of this evaluation are measured on that stand-in data; they are not the "
              "paper's " + "/".join(s.upper() for s in stand_ins) + " numbers and are not "
              "comparable with them.")
    say("\n" + "!" * 100 + "\n" + notice + "\n" + "!" * 100)

  try:
    paths = {slot: resolve_spec(spec, workdir) for slot, spec in specs.items()}
    train_src = data.load_sources([paths["mnist"], paths["svhn"]], "train", data_dir)
    test_src = data.load_sources([paths["mnist"], paths["svhn"]], "test", data_dir)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    fail(str(e))
  partners = int(cfg.get("partners", 30))
  train_set = data.PairedDataset(train_src, partners=partners, seed=cfg.get("seed", 1))
  test_set = data.PairedDataset(test_src, partners=partners, seed=cfg.get("seed", 1))
  mods = run.get("modalities", {})
  shapes = {n: tuple(mods[n]["shape"]) if n in mods else None for n in ("mnist", "svhn")}
  for n, src in zip(("mnist", "svhn"), train_src):
    if shapes[n] is not None and shapes[n] != src.image_shape:
      fail(f"{n}: run.json says images of shape {shapes[n]} but {specs[n]} has {src.image_shape}")
  lam_mnist = float(mods.get("mnist", {}).get("llik_scale", 0.0))
  try:
    model = model_lib.mnist_svhn(
        int(cfg.get("latent_dim", 20)), llik_scaling=lam_mnist,
        learn_prior=bool(cfg.get("learn_prior", True)), decoder_impl=FLAGS.decoder_impl,
        mnist_shape=train_src[0].image_shape, svhn_shape=train_src[1].image_shape)
  except ImportError as e:
    fail(f"cannot build the MNIST-SVHN networks ({e})")
  params, step, extra = restore_params(model, run, workdir, FLAGS.step)
  say(f"\nModel: checkpoint step {step} (epoch {extra.get('epoch')}), latent_dim "
      f"{model.latent_dim}, λ = " + ", ".join(f"{m.name} {m.llik_scale:.4g}" for m in model.modalities)
      + f"; {len(train_set)} train / {len(test_set)} test pairs; seed {seed}; "
      f"devices {jax.devices()}")

  key = jax.random.key(seed)
  results = {"workdir": os.path.abspath(workdir), "checkpoint_step": step,
             "sources": {slot: {"spec": specs[slot], "name": _stem(specs[slot]),
                                "genuine": slot not in stand_ins, "label": labels[slot]}
                         for slot in specs},
             "notice": notice, "seed": seed,
             "lambda": {m.name: m.llik_scale for m in model.modalities},
             "flags": {f: getattr(FLAGS, f) for f in (
                 "num_test", "joint_num", "probe_epochs", "probe_num_train", "classifier_recipe",
                 "classifier_epochs", "llik_k", "llik_num", "llik_chunk", "llik_batch",
                 "batch_size", "parts")},
             "paper": {"table1": PAPER_TABLE1, "table2": PAPER_TABLE2,
                       "table3": {f"{m},{n}": v for (m, n), v in PAPER_TABLE3.items()}},
             "seconds": {}}
  # A run of some --parts keeps the other parts' results of the same checkpoint and sources.
  previous = _previous_results(workdir, results)
  if previous:
    say(f"(keeping the results of parts not run now from {os.path.join(workdir, 'results.json')})")
    flags_now = results["flags"]
    results = {**previous, **{k: v for k, v in results.items() if k != "seconds"},
               "seconds": previous.get("seconds", {})}
    results["flags_by_part"] = previous.get("flags_by_part", {})
  else:
    results["flags_by_part"] = {}
    flags_now = results["flags"]
  for part in parts:
    results["flags_by_part"][part] = flags_now
  num_test = FLAGS.num_test or None

  def timed(name, fn):
    start = time.perf_counter()
    out = fn()
    results["seconds"][name] = round(time.perf_counter() - start, 1)
    say(f"[{name}: {results['seconds'][name]:.1f}s]")
    return out

  def write_results():
    path = os.path.join(workdir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2, ensure_ascii=False, default=_json_default)
    os.replace(tmp, path)

  classifiers = {}
  if "classifiers" in parts:
    say(f"\nDigit classifiers (recipe {FLAGS.classifier_recipe!r})")
    results["classifiers"] = {}
    for i, name in enumerate(model.names):
      kw = dict(epochs=FLAGS.classifier_epochs or None, seed=seed,
                cache_dir=FLAGS.classifier_cache, retrain=FLAGS.retrain_classifiers,
                log=lambda s, n=name: say(f"  {n}: {s}"))

      def make(i=i, kw=kw):
        if FLAGS.classifier_recipe == "source":
          return ev.classifiers.for_source(train_src[i], test_src[i], **kw)
        return ev.classifiers.for_paired(train_set, i, test_src[i], **kw)
      clf = timed(f"classifier_{name}", make)
      classifiers[name] = clf
      say(f"  {name} ({_stem(specs[name])}): test accuracy {clf.test_accuracy:.2f}% on its own "
          f"test split; {'trained' if clf.trained else 'loaded'}; {clf.path}; sha256 "
          f"{clf.checksum[:16]}…")
      results["classifiers"][name] = {"test_accuracy": clf.test_accuracy, "path": clf.path,
                                      "sha256": clf.checksum, "trained_now": clf.trained,
                                      "recipe": clf.meta.get("recipe"),
                                      "epochs": clf.meta.get("epochs")}
    write_results()

  if "probe" in parts:
    say("\nLatent linear probe")
    res = timed("probe", lambda: ev.latent_probe(
        model, params, train_set, test_set, key=jax.random.fold_in(key, 1),
        epochs=FLAGS.probe_epochs, batch_size=FLAGS.batch_size,
        num_train=FLAGS.probe_num_train or None, num_test=num_test, seed=seed, log=say))
    results["table1_probe"] = res
    print_table1(res, labels)
    write_results()

  if "coherence" in parts:
    say("\nCoherence")
    cross = timed("cross_coherence", lambda: ev.cross_coherence(
        model, params, test_set, classifiers, key=jax.random.fold_in(key, 2), num=num_test,
        batch_size=FLAGS.batch_size, seed=seed, log=lambda s: say(f"  {s}")))
    joint = timed("joint_coherence", lambda: ev.joint_coherence(
        model, params, classifiers, key=jax.random.fold_in(key, 3), num=FLAGS.joint_num,
        batch_size=min(1000, FLAGS.joint_num)))
    # With two modalities, every proper subset is one modality: subset coherence = cross.
    subsets = {"by_subset": dict(cross["cross"]),
               "by_size": {"1": float(np.mean(list(cross["cross"].values())))},
               "num": cross["num"]}
    results["table2_coherence"] = {"cross": cross, "joint": joint, "subsets": subsets}
    print_table2(cross, joint, labels)
    write_results()

  if "likelihood" in parts:
    say(f"\nLog-likelihoods (K = {FLAGS.llik_k}, chunks of {FLAGS.llik_chunk})")
    res = timed("likelihood", lambda: ev.log_likelihoods(
        model, params, test_set, key=jax.random.fold_in(key, 4), num_samples=FLAGS.llik_k,
        chunk_size=FLAGS.llik_chunk, batch_size=FLAGS.llik_batch or None,
        num=FLAGS.llik_num or None, seed=seed, log=lambda s: say(f"  {s}")))
    results["table3_likelihoods"] = res
    print_table3(res, labels)
    write_results()

  if "figures" in parts:
    say("\nFigures")
    results["figures"] = timed("figures", lambda: make_figures(
        ev, model, params, test_set, workdir, jax.random.fold_in(key, 5), seed))
    for p in results["figures"]["files"]:
      say(f"  wrote {p}")
    write_results()

  say(f"\nwrote {os.path.join(workdir, 'results.json')}")
  if notice:
    say(notice)


def make_figures(ev, model, params, test_set, workdir: str, key, seed: int) -> dict:
  import numpy as np
  files = []
  fig = ev.figures

  def out(name):
    path = os.path.join(workdir, name)
    files.append(path)
    return path

  fig.generation_grid(model, params, key, out("eval_generation.png"), num=64)
  rows = ev.common.select_rows(len(test_set), 8, seed)
  xs, _ = test_set.gather(rows)
  fig.reconstruction_grid(model, params, xs, key, out("eval_reconstruction.png"))
  xs1, y1 = test_set.gather(rows[:1])
  trav = fig.latent_traversals(model, params, xs1, out("eval_traversals.png"),
                               steps=FLAGS.traversal_steps)
  kl_rows = ev.common.select_rows(len(test_set), FLAGS.kl_num or None, seed)
  stats_parts = []
  for start in range(0, len(kl_rows), 500):
    xk, _ = test_set.gather(kl_rows[start:start + 500])
    stats_parts.append(fig.kl_statistics(model, params, xk))
  stats = {kind: {k: np.concatenate([s[kind][k] for s in stats_parts])
                  for k in stats_parts[0][kind]} for kind in ("prior", "symmetric")}
  fig.kl_boxplot(stats, out("eval_kl.png"))
  return {"files": files, "traversal_label": int(y1[0]),
          "prior_std": np.asarray(trav["prior_std"]).round(5).tolist(),
          "kl_per_dim_mean": fig.kl_summary(stats), "kl_num": int(len(kl_rows))}


def _previous_results(workdir: str, current: dict) -> dict | None:
  """results.json of the same checkpoint step and sources, or None."""
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      prev = json.load(f)
  except (OSError, ValueError):
    return None
  same = all(prev.get(k) == current[k] for k in ("checkpoint_step", "sources", "seed"))
  return prev if same else None


def _json_default(o):
  import numpy as np
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return None if not math.isfinite(float(o)) else float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
