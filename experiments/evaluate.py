r"""Evaluates a trained MNIST-SVHN model: the paper's Tables 1-3 and Figs 4-5 (spec §9).

    python experiments/evaluate.py --workdir=runs/offline

A workdir of experiments/cub.py (run.json model "cub_mmvae") gets Table 4 instead, the CCA
coherence of image features and captions (mmvae_jax.evaluation.cca; --step, --seed,
--batch_size, --joint_num, default 1,000 for CUB).

Reads `run.json` and the latest checkpoint of --workdir (as written by
experiments/mnist_svhn.py), rebuilds the model of `run.json["model"]` (mmvae, the default when
the key is absent; mvae; vae_mnist; vae_svhn) and its paired data, and computes

* digit classifiers for each modality (cached, checksummed; see mmvae_jax.evaluation.classifiers),
* Table 1: the latent linear probe (one posterior sample, per modality),
* Table 2: cross coherence in both directions and joint coherence (10,000 prior samples),
* Table 3: the four importance-sampled log-likelihoods (K = 1000, chunked),
* figures: generations, reconstructions / cross generations, latent traversals over ±5 learned
  prior standard deviations and the per-dimension KL box plot,

prints the tables with the paper's numbers for the same model beside ours and writes
`results.json` and `eval_*.png` into the workdir. It states the data sources the run was
trained on: numbers from a stand-in source (e.g. usps_colour.npz in SVHN's slot) are never the
paper's SVHN numbers.

What is evaluated depends on the model: an MVAE gets everything the MMVAE gets, with its
product-of-experts posteriors (Table 1 "MVAE (single)": probe on q(z | x_m), "MVAE (both)": on
q(z | x_m, x_n); Table 3 with PoE proposals); a single-modality VAE (vae_mnist, vae_svhn) gets
the probe of its modality (Table 1 "single-VAE"), log p(x_m | x_m) (IWAE with K samples) and the
figures (no classifiers, no coherence: there is no other modality).

Comparison rows (Tables 1-3 with one row per model, ours beside the paper's): evaluate every
run first, then

    python experiments/evaluate.py --workdir=W_mmvae --compare=W_mvae,W_vae_mnist,W_vae_svhn

reads the other workdirs' results.json, prints the combined tables after this workdir's
evaluation and stores them in this workdir's results.json["comparison"]; with --parts=none it
evaluates nothing and combines the existing results.json files only.

Quick check on a CPU (sizes limited by flags):

    python experiments/evaluate.py --workdir=W --num_test=2000 --probe_num_train=20000 \
        --classifier_epochs=2 --llik_k=100 --llik_num=100 --joint_num=2000
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import app, flags

from mmvae_jax import cli
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
                    "Comma-separated parts to run (coherence needs classifiers; a single-"
                    "modality VAE runs only probe, likelihood, figures); none: evaluate nothing, "
                    "only combine results.json files for --compare.")
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
flags.DEFINE_list("compare", [], "Other evaluated workdirs (each with results.json, e.g. an "
                  "MVAE run and single-VAE runs): print Tables 1-3 with one row per model beside "
                  "the paper's rows and store them in results.json['comparison'].")

PARTS = ("classifiers", "probe", "coherence", "likelihood", "figures")
NO_PARTS = ("", "none")  # --parts=none: no evaluation, only the --compare tables

# run.json["model"] (absent in older runs: "mmvae") -> the modalities it was trained on.
MODEL_SLOTS = {"mmvae": ("mnist", "svhn"), "mvae": ("mnist", "svhn"), "vae_mnist": ("mnist",),
               "vae_svhn": ("svhn",)}
MODEL_NAMES = {"mmvae": "MMVAE", "mvae": "MVAE", "vae_mnist": "single-VAE (MNIST)",
               "vae_svhn": "single-VAE (SVHN)"}
SINGLE_PARTS = ("probe", "likelihood", "figures")  # what applies to a single-modality VAE

# The paper's numbers (spec §11; Table 3's joint column is missing in the paper text).
PAPER_TABLE1 = {"mnist": 91.3, "svhn": 68.0}  # MMVAE
PAPER_TABLE2 = {"joint": 42.1, "mnist→svhn": 86.4, "svhn→mnist": 69.1}  # MMVAE
PAPER_TABLE3 = {("mnist", "svhn"): (None, 868.76, 868.37, 628.31),  # MMVAE
                ("svhn", "mnist"): (None, 3441.01, 3441.01, 2337.56)}
# Every model's rows: Table 1 columns of the paper become rows here.
PAPER_TABLE1_ROWS = {"MMVAE": PAPER_TABLE1,
                     "MVAE (single)": {"mnist": 95.7, "svhn": 9.1},
                     "MVAE (both)": {"mnist": 94.9, "svhn": 90.1},
                     "single-VAE": {"mnist": 85.3, "svhn": 20.7}}
PAPER_TABLE2_ROWS = {"MMVAE": PAPER_TABLE2,
                     "MVAE": {"joint": 12.7, "mnist→svhn": 9.5, "svhn→mnist": 9.3}}
PAPER_TABLE3_ROWS = {"MMVAE": PAPER_TABLE3,
                     "MVAE": {("mnist", "svhn"): (None, -176.68, -107.46, -778.20),
                              ("svhn", "mnist"): (None, 3395.12, 3536.86, -12747.50)}}
TABLE2_COLS = ("joint", "mnist→svhn", "svhn→mnist")
TABLE3_PAIRS = (("mnist", "svhn"), ("svhn", "mnist"))




def fail(message: str, code: int = 2):
  cli.fail("evaluate.py", message, code)


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


def model_kind(run: dict) -> str:
  """run.json's "model" (absent in runs older than --model: "mmvae"); ValueError if unknown."""
  kind = run.get("model") or "mmvae"
  if kind not in MODEL_SLOTS:
    raise ValueError(f"unknown model {kind!r} in run.json: choose {', '.join(MODEL_SLOTS)}")
  return kind


def build_model(run: dict, shapes: dict | None = None, decoder_impl: str = "auto"):
  """The model of a run, constructed as experiments/mnist_svhn.py constructs it.

  Args:
    run: the contents of run.json ("model", "config", "modalities").
    shapes: {slot: image shape} of the sources the model reads (default: run.json's
      "modalities" shapes, else MNIST 28×28×1 / SVHN 32×32×3).
    decoder_impl: SVHN decoder formulation (not part of the parameters).
  Returns:
    (kind, model): kind in MODEL_SLOTS; an `MMVAE` (mmvae), `MVAE` (mvae) or a one-modality
    `MMVAE` from `mvae.single_vae` (vae_mnist, vae_svhn).
  """
  from mmvae_jax import model as model_lib, mvae
  kind = model_kind(run)
  cfg = run.get("config", {})
  mods = run.get("modalities", {})
  shapes = dict(shapes or {})
  for slot in MODEL_SLOTS[kind]:
    if slot not in shapes and slot in mods:
      shapes[slot] = tuple(mods[slot]["shape"])
  latent_dim = int(cfg.get("latent_dim", 20))
  learn_prior = bool(cfg.get("learn_prior", True))
  # λ_MNIST as trained (run.json records it); 0 falls back to the flag default 3072/784.
  if kind in ("mmvae", "mvae") and "mnist" in mods:
    lam_mnist = float(mods["mnist"].get("llik_scale", 0.0))
  else:
    lam_mnist = float(cfg.get("llik_scaling", 0.0))
  base = model_lib.mnist_svhn(
      latent_dim, llik_scaling=lam_mnist, learn_prior=learn_prior, decoder_impl=decoder_impl,
      mnist_shape=tuple(shapes.get("mnist", (28, 28, 1))),
      svhn_shape=tuple(shapes.get("svhn", (32, 32, 3))))
  if kind == "mvae":
    return kind, mvae.MVAE(modalities=base.modalities, latent_dim=latent_dim)
  if kind in ("vae_mnist", "vae_svhn"):
    slot, = MODEL_SLOTS[kind]
    return kind, mvae.single_vae(base.modality(slot), latent_dim, learn_prior=learn_prior)
  return kind, base


def load_results(workdir: str) -> dict:
  """A workdir's results.json (one-line error when missing or unreadable)."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    fail(f"{path} not found: evaluate that run first (python experiments/evaluate.py "
         f"--workdir={workdir})")
  try:
    with open(path) as f:
      res = json.load(f)
  except (OSError, ValueError) as e:
    fail(f"cannot read {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
  if not isinstance(res, dict):
    fail(f"{path} is not a results.json of experiments/evaluate.py")
  return res


def restore_params(model, run: dict, workdir: str, step: int):
  """(params, step, extra) of checkpoint `step` (-1: latest); one-line failure otherwise."""
  from mmvae_jax import train
  try:
    return train.restore_params(model, run["config"], workdir, step)
  except train.CheckpointError as e:
    fail(str(e))


# ---------------------------------------------------------------------------------------------
# Printing.


def _fmt(v, width=10, digits=2):
  if v is None:
    return f"{'—':>{width}}"
  if isinstance(v, str):
    return f"{v:>{width}}"
  return f"{v:>{width}.{digits}f}"


def _probe_rows(probe: dict, kind: str) -> list[tuple[str, dict]]:
  """[(Table 1 row name, {slot: % or absent})] of one run's probe results."""
  if kind == "mvae":
    return [("MVAE (single)", probe.get("accuracy", {})),
            ("MVAE (both)", probe.get("accuracy_joint", {}))]
  if kind in ("vae_mnist", "vae_svhn"):
    return [("single-VAE", probe.get("accuracy", {}))]
  return [("MMVAE", probe.get("accuracy", {}))]


def _paper_name(kind: str) -> str:
  """The paper's Table 2/3 row of a model kind (None for the single-modality VAEs)."""
  return {"mmvae": "MMVAE", "mvae": "MVAE"}.get(kind)


def _not_comparable(slots, labels) -> str:
  bad = [s for s in slots if labels.get(s, s.upper()) != s.upper()]
  return ("   (real " + "/".join(s.upper() for s in bad) + "; not comparable here)") if bad else ""


def print_table1(res: dict, labels: dict, kind: str = "mmvae") -> None:
  posterior = {"mvae": "of the MVAE's product of experts: single z ~ q(z | x_m) = N(0, I)·q_m, "
                       "both z ~ q(z | x_m, x_n) = N(0, I)·q_m·q_n",
               "mmvae": "z ~ q_m(z | x_m)"}.get(kind, "z ~ q(z | x_m) of the single-modality VAE")
  say(f"\nTable 1: digit accuracy (%) of a linear probe on one posterior sample {posterior}")
  rows = _probe_rows(res, kind)
  say(f"  {'modality':<36}" + "".join(f"{name + ' ours':>20}{'paper':>8}" for name, _ in rows))
  for slot in ("mnist", "svhn"):
    if slot not in labels:
      continue
    note = _not_comparable([slot], labels)
    say(f"  {labels[slot]:<36}" + "".join(
        _fmt(ours.get(slot), 20) + _fmt(PAPER_TABLE1_ROWS[name][slot], 8, 1)
        for name, ours in rows) + note)
  say(f"  ({res['epochs']} probe epoch(s) over {res['num_train']} train pairs, "
      f"{res['num_test']} test pairs; the paper: 30 epochs over all pairs, 5 models"
      + ("; the official code trains a unimodal model's probe 10x as many epochs over the plain "
         "dataset)" if kind in ("vae_mnist", "vae_svhn") else ")"))


def print_table2(cross: dict, joint: dict, labels: dict, kind: str = "mmvae") -> None:
  paper_name = _paper_name(kind) or "MMVAE"
  say("\nTable 2: probability of digit matching (%) (classifiers of the *target* modality)")
  say(f"  {'':<14}" + "".join(f"{c:>14}" for c in ["Joint", "Cross M→S", "Cross S→M"]))
  ours = [joint["joint"] if joint else None] + [cross["cross"].get(c) if cross else None
                                                for c in TABLE2_COLS[1:]]
  say(f"  {'ours':<14}" + "".join(_fmt(v, 14) for v in ours))
  say(f"  {'paper ' + paper_name:<14}" + "".join(_fmt(PAPER_TABLE2_ROWS[paper_name][c], 14, 1)
                                                for c in TABLE2_COLS)
      + _not_comparable(("mnist", "svhn"), labels))
  say("  Directions are source→target (M = the MNIST slot, S = the SVHN slot). The paper's text "
      "says 86.4% = MNIST→SVHN, 69.1% = SVHN→MNIST; a third-party reading swaps them (spec "
      "trap 20).")
  if kind == "mvae":
    say("  MVAE: cross generations decode z ~ q(z | x_source) = N(0, I)·q_source (product of "
        "experts); joint ones decode z ~ N(0, I).")
  if cross:
    say(f"  cross: {cross['num']} test pairs, K = 1, decoder means; self-reconstruction "
        + ", ".join(f"{k} {v:.2f}%" for k, v in cross["reconstruction"].items()))
  if joint:
    say(f"  joint: {joint['num']} prior samples; predicted-digit counts "
        + "; ".join(f"{n}: {c}" for n, c in joint["class_counts"].items()))


TABLE3_HEADS = ["log p(xm,xn) [λ]", "log p(xm|xm,xn)", "log p(xm|xm)", "log p(xm|xn)"]


def _table3_values(res: dict, m: str, n: str, kind: str) -> list:
  """Our four Table 3 columns for (m, n) (None where the model has no such estimate)."""
  c = res.get("conditional", {})
  if kind in ("vae_mnist", "vae_svhn"):
    return [None, None, c.get(f"log p({m}|{m})"), None]
  return [res.get("joint_weighted"), c.get(f"log p({m}|mnist,svhn)"), c.get(f"log p({m}|{m})"),
          c.get(f"log p({m}|{n})")]


def print_table3(res: dict, labels: dict, kind: str = "mmvae") -> None:
  say(f"\nTable 3: log-likelihoods ({res['num_samples']}-sample importance estimates, "
      f"{res['num']} test pairs)")
  c = res["conditional"]
  if kind in ("vae_mnist", "vae_svhn"):
    slot, = MODEL_SLOTS[kind]
    say(f"  single-VAE of {labels[slot]}: log p(xm|xm) = {c[f'log p({slot}|{slot})']:.2f} "
        f"(the IWAE estimate of log p(x_m), proposal q(z | x_m), λ = 1); the paper has no "
        f"single-VAE row in Table 3.")
    return
  paper_name = _paper_name(kind)
  lam = res["lambda"]
  say(f"  {'m, n':<16}{'':<8}" + "".join(f"{h:>19}" for h in TABLE3_HEADS))
  for m, n in TABLE3_PAIRS:
    name = f"{m.upper()}, {n.upper()}"
    say(f"  {name:<16}{'ours':<8}" + "".join(_fmt(v, 19) for v in _table3_values(res, m, n, kind)))
    paper = PAPER_TABLE3_ROWS[paper_name][(m, n)]
    say(f"  {'':<16}{'paper':<8}" + "".join(_fmt(v if v is not None else "(missing)", 19)
                                             for v in paper)
        + _not_comparable(("mnist", "svhn"), labels))
  proposal = ("the joint product-of-experts posterior q(z | x_m, x_n) for the joint and "
              "p(xm|xm,xn), q(z | x_e) = N(0, I)·q_e for p(xm|x_e)" if kind == "mvae" else
              "the mixture q(z | x_m, x_n) = ½(q_m + q_n) for the joint and p(xm|xm,xn), the "
              "expert q_e for p(xm|x_e)")
  say(f"  {paper_name} proposals: {proposal}.")
  say(f"  λ convention: the joint column includes λ inside the log weights (λ = "
      + ", ".join(f"{k} {v:.4g}" for k, v in lam.items())
      + f"), as the official tight m_iwae: it is NOT a normalised log-density. With every "
      f"λ = 1 it is {res['joint_unweighted']:.2f}. The conditional columns are unweighted.")
  say("  The paper's positive magnitudes are impossible with the Laplace likelihood scale 0.75 "
      "(spec trap 21): compare orderings, the paper has p(xm|xm,xn) >= p(xm|xm) for MMVAE and < "
      f"for MVAE; ours ({paper_name}): "
      + ", ".join(f"{m}: {c[f'log p({m}|mnist,svhn)'] - c[f'log p({m}|{m})']:+.2f}"
                  for m in ("mnist", "svhn")))


# ---------------------------------------------------------------------------------------------
# Comparison rows (--compare).


def results_kind(workdir: str, res: dict) -> str:
  """The model of an evaluated workdir: results.json's "model", else run.json's, else mmvae."""
  kind = res.get("model")
  if not kind:
    try:
      with open(os.path.join(workdir, "run.json")) as f:
        kind = json.load(f).get("model")
    except (OSError, ValueError):
      kind = None
  kind = kind or "mmvae"
  if kind not in MODEL_SLOTS:
    fail(f"{os.path.join(workdir, 'results.json')}: unknown model {kind!r}")
  return kind


def comparison_table(entries: list[tuple[str, dict]]) -> dict:
  """Tables 1-3 with one row per model from evaluated workdirs.

  Args:
    entries: [(workdir, its results.json)], any models (mmvae, mvae, vae_mnist, vae_svhn; more
      than one of a kind gives more than one row).
  Returns:
    {"table1": [{"model", "workdirs": {slot: workdir}, "ours": {slot: %}, "paper": {slot: %}}],
     "table2": [{"model", "workdir", "ours": {col: %}, "paper": {col: %}}],
     "table3": [{"m", "n", "model", "workdir", "ours": [4], "paper": [4]}],
     "columns": {...}, "runs": [{"workdir", "model", "sources": {slot: name}, "genuine": {...}}],
     "stand_ins": {slot: [source names]}, "notice": str or None, "warnings": [str]}.
    Values the workdir did not evaluate are None; the paper's are None where it has none.
  """
  runs = []
  for wd, res in entries:
    kind = results_kind(wd, res)
    srcs = res.get("sources", {})
    runs.append({"workdir": wd, "model": kind,
                 "sources": {s: v.get("name") for s, v in srcs.items()},
                 "genuine": {s: bool(v.get("genuine", True)) for s, v in srcs.items()},
                 "res": res})
  order = list(MODEL_SLOTS)  # rows in the paper's order, whatever the order of the workdirs
  runs.sort(key=lambda r: order.index(r["model"]))
  t1, t2, t3 = [], [], []
  singles = {s: [r for r in runs if r["model"] == f"vae_{s}"] for s in ("mnist", "svhn")}
  for r in runs:
    kind, res, wd = r["model"], r["res"], r["workdir"]
    if kind not in ("mmvae", "mvae"):
      continue
    for name, ours in _probe_rows(res.get("table1_probe", {}), kind):
      t1.append({"model": name, "workdirs": {"mnist": wd, "svhn": wd},
                 "ours": {s: ours.get(s) for s in ("mnist", "svhn")},
                 "paper": dict(PAPER_TABLE1_ROWS[name])})
  for i in range(max(len(v) for v in singles.values())):
    row = {"model": "single-VAE", "workdirs": {}, "ours": {}, "paper": dict(PAPER_TABLE1_ROWS["single-VAE"])}
    for s in ("mnist", "svhn"):
      r = singles[s][i] if i < len(singles[s]) else None
      row["workdirs"][s] = r["workdir"] if r else None
      row["ours"][s] = r["res"].get("table1_probe", {}).get("accuracy", {}).get(s) if r else None
    t1.append(row)
  for r in runs:
    kind, res, wd = r["model"], r["res"], r["workdir"]
    if kind not in ("mmvae", "mvae"):
      continue
    coh = res.get("table2_coherence", {})
    cross = coh.get("cross", {}).get("cross", {})
    ours = {"joint": coh.get("joint", {}).get("joint")}
    ours.update({c: cross.get(c) for c in TABLE2_COLS[1:]})
    t2.append({"model": _paper_name(kind), "workdir": wd, "ours": ours,
               "paper": dict(PAPER_TABLE2_ROWS[_paper_name(kind)])})
  for m, n in TABLE3_PAIRS:
    for r in runs:
      kind, res, wd = r["model"], r["res"], r["workdir"]
      if kind in ("vae_mnist", "vae_svhn") and kind != f"vae_{m}":
        continue
      llik = res.get("table3_likelihoods")
      name = _paper_name(kind) or "single-VAE"
      ours = _table3_values(llik, m, n, kind) if llik else [None] * 4
      paper = list(PAPER_TABLE3_ROWS[name][(m, n)]) if name in PAPER_TABLE3_ROWS else [None] * 4
      t3.append({"m": m, "n": n, "model": name, "workdir": wd, "ours": ours, "paper": paper,
                 "num_samples": llik.get("num_samples") if llik else None})
  # Data: stand-ins and runs trained on different sources for the same slot.
  stand_ins, warnings = {}, []
  for s in ("mnist", "svhn"):
    used = [r for r in runs if s in r["sources"]]
    names = sorted({r["sources"][s] for r in used if r["sources"][s]})
    bad = sorted({r["sources"][s] for r in used if not r["genuine"].get(s, True)})
    if bad:
      stand_ins[s] = bad
    if len(names) > 1:
      warnings.append(f"WARNING: the compared runs read different data in the {s!r} slot ("
                      + "; ".join(f"{r['workdir']}: {r['sources'][s]}" for r in used)
                      + "): their rows are not comparable with each other.")
  notice = None
  if stand_ins:
    notice = ("NOTICE: " + " and ".join(
        f"the {s!r} modality of the compared runs was trained on "
        + "/".join(repr(x) for x in names) + f", NOT {s.upper()}" for s, names in stand_ins.items())
        + ". Every 'ours' number in these tables is measured on that stand-in data; it is not the "
        "paper's " + "/".join(s.upper() for s in stand_ins) + " number and is not comparable "
        "with it.")
  return {"table1": t1, "table2": t2, "table3": t3,
          "columns": {"table1": ["mnist", "svhn"], "table2": list(TABLE2_COLS),
                      "table3": ["log p(xm,xn) [lambda inside]", "log p(xm|xm,xn)",
                                 "log p(xm|xm)", "log p(xm|xn)"]},
          "runs": [{k: v for k, v in r.items() if k != "res"} for r in runs],
          "stand_ins": stand_ins, "notice": notice, "warnings": warnings}


def _short(wd) -> str:
  return "—" if not wd else os.path.basename(os.path.normpath(wd)) or wd


def print_comparison(comp: dict) -> None:
  """Prints `comparison_table`'s Tables 1-3 (ours beside the paper's, one row per model)."""
  stand = comp["stand_ins"]
  slot_head = {s: s.upper() if s not in stand else f"{s.upper()}-slot*" for s in ("mnist", "svhn")}
  if comp["notice"]:
    say("\n" + "!" * 100 + "\n" + comp["notice"] + "\n" + "!" * 100)
  for w in comp["warnings"]:
    say(w)
  say("\nComparison of the runs " + ", ".join(f"{_short(r['workdir'])} ({MODEL_NAMES[r['model']]})"
                                           for r in comp["runs"]))
  star = ("  * " + ", ".join(f"{s.upper()} slot = {'/'.join(v)} (stand-in): the paper's "
                             f"{s.upper()} numbers are not comparable" for s, v in stand.items())
          if stand else None)

  say("\nTable 1 (comparison): digit accuracy (%) of a linear probe on one posterior sample")
  say(f"  {'model':<16}" + "".join(f"{slot_head[s] + ' ours':>18}{'paper':>8}" for s in ("mnist", "svhn"))
      + "   workdir")
  for row in comp["table1"]:
    wds = row["workdirs"]
    where = (_short(wds["mnist"]) if wds["mnist"] == wds["svhn"] else
             ", ".join(f"{_short(wds[s])} ({s})" for s in ("mnist", "svhn") if wds[s]))
    say(f"  {row['model']:<16}" + "".join(_fmt(row["ours"][s], 18) + _fmt(row["paper"][s], 8, 1)
                                         for s in ("mnist", "svhn")) + f"   {where}")
  say("  MMVAE, single-VAE: z ~ the modality's own posterior; MVAE (single): z ~ N(0, I)·q_m; "
      "MVAE (both): z ~ N(0, I)·q_m·q_n.")
  if star:
    say(star)

  say("\nTable 2 (comparison): probability of digit matching (%), directions source→target")
  heads = {"joint": "Joint", "mnist→svhn": "Cross M→S", "svhn→mnist": "Cross S→M"}
  say(f"  {'model':<16}" + "".join(f"{heads[c] + ' ours':>16}{'paper':>8}" for c in TABLE2_COLS)
      + "   workdir")
  for row in comp["table2"]:
    say(f"  {row['model']:<16}" + "".join(_fmt(row["ours"][c], 16) + _fmt(row["paper"][c], 8, 1)
                                         for c in TABLE2_COLS) + f"   {_short(row['workdir'])}")
  if not comp["table2"]:
    say("  (no multimodal run among the compared workdirs)")
  if star:
    say(star)

  say("\nTable 3 (comparison): log-likelihoods (importance estimates; joint column with λ inside)")
  say(f"  {'m, n':<14}{'model':<12}{'':<7}" + "".join(f"{h:>19}" for h in TABLE3_HEADS)
      + "   workdir")
  for m, n in TABLE3_PAIRS:
    for row in [r for r in comp["table3"] if (r["m"], r["n"]) == (m, n)]:
      say(f"  {m.upper() + ', ' + n.upper():<14}{row['model']:<12}{'ours':<7}"
          + "".join(_fmt(v, 19) for v in row["ours"])
          + f"   {_short(row['workdir'])}" + (f" (K = {row['num_samples']})"
                                              if row["num_samples"] else " (not evaluated)"))
      say(f"  {'':<14}{'':<12}{'paper':<7}"
          + "".join(_fmt(v if v is not None else ("(missing)" if i == 0 and row["model"] != "single-VAE"
                                                  else None), 19)
                    for i, v in enumerate(row["paper"])))
  say("  The paper's Table 3 has MMVAE and MVAE rows only; its positive magnitudes are impossible "
      "with the Laplace likelihood scale 0.75 (spec trap 21): compare orderings between models.")
  if star:
    say(star)
  if comp["notice"]:
    say(comp["notice"])


# ---------------------------------------------------------------------------------------------


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.workdir:
    fail("--workdir is required")
  parts = [p.strip() for p in FLAGS.parts.split(",") if p.strip()]
  compare_only = FLAGS.parts.strip().lower() in NO_PARTS
  if compare_only:
    parts = []
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    fail(f"unknown --parts entry {unknown[0]!r}: choose from {','.join(PARTS)} (or none)")
  if "coherence" in parts and "classifiers" not in parts:
    parts.insert(0, "classifiers")
  for name in ("num_test", "joint_num", "probe_num_train", "llik_num", "llik_batch", "kl_num"):
    if getattr(FLAGS, name) < 0:
      fail(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
  for name in ("probe_epochs", "llik_k", "llik_chunk", "batch_size", "traversal_steps"):
    if getattr(FLAGS, name) < 1:
      fail(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
  workdir = FLAGS.workdir
  others = []
  for wd in (w.strip() for w in FLAGS.compare):
    if wd and os.path.abspath(wd) != os.path.abspath(workdir) and wd not in others:
      others.append(wd)
  if compare_only and not FLAGS.compare:
    fail("--parts=none evaluates nothing: give --compare=W1,... to combine evaluated workdirs")
  # Fail before a long evaluation when a compared workdir was not evaluated.
  for wd in others:
    load_results(wd)
  if compare_only:
    results = load_results(workdir)
    compare_and_write(workdir, results, others)
    return

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's INFO lines would bury the tables
  run = load_run(workdir)
  if str(run.get("model", "")).startswith("cub_"):
    evaluate_cub(workdir, run)
    return
  try:
    kind = model_kind(run)
  except ValueError as e:
    fail(f"{os.path.join(workdir, 'run.json')}: {e}")
  slots = MODEL_SLOTS[kind]
  if len(slots) == 1:
    skipped = [p for p in parts if p not in SINGLE_PARTS]
    parts = [p for p in parts if p in SINGLE_PARTS]
  else:
    skipped = []
  import jax
  import numpy as np
  from mmvae_jax import data
  from mmvae_jax import evaluation as ev

  cfg = run["config"]
  seed = cfg.get("seed", 1) if FLAGS.seed < 0 else FLAGS.seed
  overrides = {"mnist": FLAGS.mnist, "svhn": FLAGS.svhn}
  missing = [s for s in slots if not overrides[s] and s not in run.get("sources", {})]
  if missing:
    fail(f"{os.path.join(workdir, 'run.json')} names no {missing[0]!r} source (give --{missing[0]})")
  specs = {slot: overrides[slot] or run["sources"][slot] for slot in slots}
  data_dir = FLAGS.data_dir or run["sources"].get("data_dir")
  labels = {slot: slot_label(slot, spec) for slot, spec in specs.items()}
  stand_ins = [slot for slot in specs if not is_genuine(slot, specs[slot])]

  say(f"Workdir {workdir}: {MODEL_NAMES[kind]} (run.json model {kind!r}), trained on")
  for slot, spec in specs.items():
    say(f"  {slot:<6} modality <- {spec}" + ("" if slot not in stand_ins else
                                            f"   [{_stem(spec)}: NOT {slot.upper()}]"))
  if skipped:
    say(f"  (a single-modality VAE: skipping {', '.join(skipped)}; evaluating "
        f"{', '.join(parts) or 'nothing'})")
  notice = None
  if stand_ins:
    notice = ("NOTICE: the " + " and ".join(f"{s!r} modality was trained on {_stem(specs[s])!r}, "
                                              f"NOT {s.upper()}" for s in stand_ins)
              + ". All numbers of this evaluation are measured on that stand-in data; they are not the "
              "paper's " + "/".join(s.upper() for s in stand_ins) + " numbers and are not "
              "comparable with them.")
    say("\n" + "!" * 100 + "\n" + notice + "\n" + "!" * 100)

  try:
    paths = [resolve_spec(specs[slot], workdir) for slot in slots]
    train_src = data.load_sources(paths, "train", data_dir)
    test_src = data.load_sources(paths, "test", data_dir)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    fail(str(e))
  # As experiments/mnist_svhn.py: a single source is visited once per epoch (partners = 1).
  partners = int(cfg.get("partners", 30)) if len(slots) > 1 else 1
  train_set = data.PairedDataset(train_src, partners=partners, seed=cfg.get("seed", 1))
  test_set = data.PairedDataset(test_src, partners=partners, seed=cfg.get("seed", 1))
  mods = run.get("modalities", {})
  for n, src in zip(slots, train_src):
    if n in mods and tuple(mods[n]["shape"]) != src.image_shape:
      fail(f"{n}: run.json says images of shape {tuple(mods[n]['shape'])} but {specs[n]} has "
           f"{src.image_shape}")
  try:
    _, model = build_model(run, {n: src.image_shape for n, src in zip(slots, train_src)},
                           FLAGS.decoder_impl)
  except ImportError as e:
    fail(f"cannot build the MNIST-SVHN networks ({e})")
  params, step, extra = restore_params(model, run, workdir, FLAGS.step)
  say(f"\nModel: {MODEL_NAMES[kind]} ({type(model).__name__} {list(model.names)}), checkpoint step {step} (epoch "
      f"{extra.get('epoch')}), latent_dim {model.latent_dim}, λ = "
      + ", ".join(f"{m.name} {m.llik_scale:.4g}" for m in model.modalities)
      + f"; {len(train_set)} train / {len(test_set)} test pairs; seed {seed}; "
      f"devices {jax.devices()}")

  key = jax.random.key(seed)
  paper_name = _paper_name(kind)
  paper = {"table1": {name: PAPER_TABLE1_ROWS[name] for name, _ in _probe_rows({}, kind)}}
  if paper_name:
    paper["table2"] = PAPER_TABLE2_ROWS[paper_name]
    paper["table3"] = {f"{m},{n}": v for (m, n), v in PAPER_TABLE3_ROWS[paper_name].items()}
  results = {"workdir": os.path.abspath(workdir), "model": kind, "checkpoint_step": step,
             "sources": {slot: {"spec": specs[slot], "name": _stem(specs[slot]),
                                "genuine": slot not in stand_ins, "label": labels[slot]}
                         for slot in specs},
             "notice": notice, "seed": seed,
             "lambda": {m.name: m.llik_scale for m in model.modalities},
             "flags": {f: getattr(FLAGS, f) for f in (
                 "num_test", "joint_num", "probe_epochs", "probe_num_train", "classifier_recipe",
                 "classifier_epochs", "llik_k", "llik_num", "llik_chunk", "llik_batch",
                 "batch_size", "parts")},
             "paper": paper,
             "seconds": {}}
  # A run of some --parts keeps the other parts' results of the same checkpoint and sources.
  previous = _previous_results(workdir, results)
  if previous:
    say(f"(keeping the results of parts not run now from {os.path.join(workdir, 'results.json')})")
    previous.pop("comparison", None)  # may be stale now: --compare writes it again
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
    _write_json(os.path.join(workdir, "results.json"), results)

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
    print_table1(res, labels, kind)
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
    print_table2(cross, joint, labels, kind)
    write_results()

  if "likelihood" in parts:
    say(f"\nLog-likelihoods (K = {FLAGS.llik_k}, chunks of {FLAGS.llik_chunk})")
    res = timed("likelihood", lambda: ev.log_likelihoods(
        model, params, test_set, key=jax.random.fold_in(key, 4), num_samples=FLAGS.llik_k,
        chunk_size=FLAGS.llik_chunk, batch_size=FLAGS.llik_batch or None,
        num=FLAGS.llik_num or None, seed=seed, log=lambda s: say(f"  {s}")))
    results["table3_likelihoods"] = res
    print_table3(res, labels, kind)
    write_results()

  if "figures" in parts:
    say("\nFigures")
    results["figures"] = timed("figures", lambda: make_figures(
        ev, model, params, test_set, workdir, jax.random.fold_in(key, 5), seed))
    for p in results["figures"]["files"]:
      say(f"  wrote {p}")
    write_results()

  say(f"\nwrote {os.path.join(workdir, 'results.json')}")
  if others:
    compare_and_write(workdir, results, others)
  elif notice:
    say(notice)


def evaluate_cub(workdir: str, run: dict) -> None:
  """Table 4 (CCA coherence) of a CUB run of experiments/cub.py (see its `evaluate_table4`).

  Uses --step, --seed, --batch_size and --joint_num (default 1,000 prior samples for CUB, as the
  paper; an explicit --joint_num wins); the other flags are for MNIST-SVHN runs.
  """
  import importlib.util
  if run.get("model") != "cub_mmvae":
    fail(f"{os.path.join(workdir, 'run.json')}: model {run.get('model')!r} is a single-modality CUB "
         f"VAE; Table 4 needs the image-feature + caption MMVAE (cub_mmvae)")
  spec = importlib.util.spec_from_file_location("cub_experiment", os.path.join(REPO, "experiments", "cub.py"))
  cub = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cub)
  joint_num = FLAGS.joint_num if FLAGS["joint_num"].present else 1000
  try:
    cub.evaluate_table4(workdir, step=FLAGS.step, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                        joint_num=joint_num, say=say)
  except (FileNotFoundError, ValueError) as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def compare_and_write(workdir: str, results: dict, others: list[str]) -> dict:
  """Prints the comparison of `workdir` (its `results`) with the evaluated `others` and stores
  it in workdir/results.json["comparison"]."""
  entries = [(workdir, results)] + [(wd, load_results(wd)) for wd in others]
  comp = comparison_table(entries)
  print_comparison(comp)
  results["comparison"] = comp
  path = os.path.join(workdir, "results.json")
  _write_json(path, results)
  say(f"\nwrote the comparison into {path} ['comparison']")
  return comp


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
  os.replace(tmp, path)


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
  same = (all(prev.get(k) == current[k] for k in ("checkpoint_step", "sources", "seed"))
          and (prev.get("model") or "mmvae") == current["model"])
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
  app.run(main, flags_parser=cli.flags_parser("evaluate.py"))
