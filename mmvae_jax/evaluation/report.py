"""The evaluation of a trained run: every part, the printed tables and ``results.json``.

    import mmvae_jax
    from mmvae_jax.evaluation import report
    run = mmvae_jax.load_run("runs/three_digits")
    results = report.evaluate(run, report.Settings(parts=("classifiers", "coherence")))

`evaluate` reads everything from the run (`mmvae_jax.runs.Run`: model, parameters, run.json's
configuration and data) and works for any model and any number of modalities M:

* digit experiments (``run.experiment.evaluation == "digits"``), M >= 2: digit classifiers per
  modality (`classifiers`), the latent linear probe (Table 1), coherence from every non-empty
  proper subset of the modalities to every modality outside it plus cross coherence and joint
  coherence of prior samples (Table 2), the importance-sampled log-likelihoods (Table 3) and the
  figures (generations, reconstructions, latent traversals, KL box plot);
* single-modality VAEs (M = 1): the probe, the likelihood and the figures;
* CUB (``evaluation == "cca"``): Table 4, by `mmvae_jax.experiments.cub.evaluate_table4`.

The tables print the paper's numbers beside ours where the experiment has them
(``run.experiment.paper``), and say when a modality was trained on stand-in data (a digit
experiment's ``is_genuine``). ``results.json`` (in the workdir) keeps the results of parts not
run now when the checkpoint step, the data sources, the model and the seed are the same; every
key is plain ASCII ("mnist->svhn", "mnist+usps->svhn"). `compare_and_write` combines the
results of several evaluated workdirs into one table per paper table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import numpy as np

from mmvae_jax.runs import RunError, write_json

PARTS = ("classifiers", "probe", "coherence", "likelihood", "figures")
SINGLE_PARTS = ("probe", "likelihood", "figures")  # what applies to a single-modality VAE
RESULTS_FILE = "results.json"
DEFAULT_JOINT_NUM = {"digits": 10000, "cca": 1000}  # prior samples of joint coherence
# The evaluation settings each part depends on (stored in results.json["settings"][part]).
PART_SETTINGS = {
    "classifiers": ("classifier_recipe", "classifier_epochs"),
    "probe": ("probe_epochs", "probe_num_train", "num_test", "batch_size"),
    "coherence": ("num_test", "joint_num", "batch_size"),
    "likelihood": ("llik_k", "llik_num", "llik_chunk", "llik_batch"),
    "figures": ("kl_num", "traversal_steps"),
}
PAPER_MODELS = {"mmvae": "MMVAE", "mvae": "MVAE"}  # the paper's row of a model (Tables 2-3)
SINGLE_PREFIX = "vae_"

Say = Callable[[str], None]


def _print(message: str = "") -> None:
  print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass
class Settings:
  """What an evaluation computes and with which sizes (the flags of experiments/evaluate.py).

  Attributes:
    parts: the parts to run, a subset of `PARTS` (coherence needs classifiers).
    seed: seed of the evaluation samples and subsets; -1: the run's seed.
    batch_size: batch of the coherence and probe passes (CUB: of the cross coherence).
    num_test: random subset of test pairs for coherence and the probe test (0: all).
    joint_num: prior samples of joint coherence (None: 10,000; CUB 1,000, as the paper).
    probe_epochs, probe_num_train: epochs of the linear probe; its train subset (0: all).
    classifier_recipe, classifier_epochs: see `mmvae_jax.evaluation.classifiers` (epochs 0:
      the recipe's default).
    classifier_cache, retrain_classifiers: cache folder (None: the default); retrain anyway.
    llik_k, llik_num, llik_chunk, llik_batch: importance samples K per proposal component, test
      pairs (0: all), samples decoded at once, pairs per batch (0: floor(12000 / K)).
    kl_num, traversal_steps: test pairs of the KL box plot; points per latent traversal.
  """
  parts: tuple[str, ...] = PARTS
  seed: int = -1
  batch_size: int = 256
  num_test: int = 0
  joint_num: int | None = None
  probe_epochs: int = 1
  probe_num_train: int = 0
  classifier_recipe: str = "source"
  classifier_epochs: int = 0
  classifier_cache: str | None = None
  retrain_classifiers: bool = False
  llik_k: int = 1000
  llik_num: int = 1000
  llik_chunk: int = 100
  llik_batch: int = 0
  kl_num: int = 1000
  traversal_steps: int = 11

  def validate(self) -> None:
    """ValueError (one line, naming the flag) for the first impossible value."""
    parse_parts(",".join(self.parts) or "none")
    for name in ("num_test", "probe_num_train", "llik_num", "llik_batch", "kl_num",
                 "classifier_epochs"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    for name in ("probe_epochs", "llik_k", "llik_chunk", "batch_size", "traversal_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.joint_num is not None and self.joint_num < 1:
      raise ValueError(f"--joint_num must be >= 1, got {self.joint_num}")
    from mmvae_jax.evaluation.classifiers import RECIPES
    if self.classifier_recipe not in RECIPES:
      raise ValueError(f"unknown --classifier_recipe {self.classifier_recipe!r}: choose "
                       f"{' or '.join(RECIPES)}")

  def of_part(self, part: str) -> dict:
    return {k: getattr(self, k) for k in PART_SETTINGS[part]}


def parse_parts(text: str) -> tuple[str, ...]:
  """The parts a comma-separated list names, in `PARTS` order ("none" or "": no part);
  coherence brings in classifiers. ValueError for an unknown name."""
  names = [p.strip() for p in text.split(",") if p.strip()]
  if [p.lower() for p in names] in ([], ["none"]):
    return ()
  unknown = [p for p in names if p not in PARTS]
  if unknown:
    raise ValueError(f"unknown --parts entry {unknown[0]!r}: choose from {','.join(PARTS)} "
                     f"(or none)")
  if "coherence" in names:
    names.append("classifiers")
  return tuple(p for p in PARTS if p in names)


def parse_sources(entries) -> dict[str, str]:
  """{modality: source} from ["name=spec", ...] (ValueError for an entry without "=")."""
  out = {}
  for entry in entries:
    name, sep, spec = str(entry).partition("=")
    if not sep or not name.strip() or not spec.strip():
      raise ValueError(f"--source entries are name=spec (a tfds name or an .npz), got {entry!r}")
    out[name.strip()] = spec.strip()
  return out


def with_overrides(run, *, sources: dict | None = None, data_dir: str | None = None,
                   decoder_impl: str | None = None):
  """A copy of `run` reading other data sources / data_dir, or with another decoder
  formulation (not part of the parameters). ValueError for a modality the model lacks."""
  from mmvae_jax import runs
  sources = dict(sources or {})
  unknown = [n for n in sources if n not in run.model.names]
  if unknown:
    raise ValueError(f"--source names modality {unknown[0]!r}, but the model of {run.workdir} "
                     f"has {', '.join(run.model.names)}")
  if not sources and data_dir is None and decoder_impl in (None, run.config.decoder_impl):
    return run
  changes = {}
  if sources:
    changes["sources"] = {**run.config.sources, **sources}
  if data_dir is not None:
    changes["data_dir"] = data_dir
  if decoder_impl is not None:
    changes["decoder_impl"] = decoder_impl
  config = dataclasses.replace(run.config, **changes)
  model = run.model
  if config.decoder_impl != run.config.decoder_impl:
    model = runs.build_model(run.info, config, run.experiment, run.workdir)
  return dataclasses.replace(run, config=config, model=model, _data=None)


# ---------------------------------------------------------------------------------------------
# Names and labels.


def display_name(model: str) -> str:
  """"MMVAE", "MVAE", "single-VAE (MNIST)", else the registry name."""
  if model in PAPER_MODELS:
    return PAPER_MODELS[model]
  if model.startswith(SINGLE_PREFIX):
    return f"single-VAE ({model[len(SINGLE_PREFIX):].upper()})"
  return model


def _stem(spec: str) -> str:
  base = os.path.basename(str(spec).rstrip("/"))
  return base[:-4] if base.lower().endswith(".npz") else base


def source_info(experiment, sources: dict) -> dict:
  """{name: {"spec", "name", "genuine", "label"}} of the data each modality was read from."""
  check = getattr(experiment, "is_genuine", None)
  out = {}
  for name, spec in sources.items():
    genuine = True if check is None else bool(check(name, spec))
    label = name.upper() if genuine else f"{_stem(spec)} (stand-in for {name.upper()})"
    out[name] = {"spec": spec, "name": _stem(spec), "genuine": genuine, "label": label}
  return out


def stand_in_notice(sources: dict) -> str | None:
  bad = [n for n, s in sources.items() if not s["genuine"]]
  if not bad:
    return None
  return ("NOTICE: the " + " and ".join(f"{n!r} modality was trained on {sources[n]['name']!r}, "
                                         f"NOT {n.upper()}" for n in bad)
          + ". All numbers of this evaluation are measured on that stand-in data; they are not "
          "the paper's " + "/".join(n.upper() for n in bad) + " numbers and are not comparable "
          "with them.")


def _banner(text: str, say: Say) -> None:
  say("\n" + "!" * 100 + "\n" + text + "\n" + "!" * 100)


def _labels(results: dict) -> dict:
  return {n: s.get("label", n.upper()) for n, s in results.get("sources", {}).items()}


def _not_comparable(names, labels) -> str:
  bad = [n for n in names if labels.get(n, n.upper()) != n.upper()]
  return ("   (real " + "/".join(n.upper() for n in bad) + "; not comparable here)") if bad else ""


def _fmt(v, width=10, digits=2):
  if v is None:
    return f"{'-':>{width}}"
  if isinstance(v, str):
    return f"{v:>{width}}"
  return f"{v:>{width}.{digits}f}"


def _short(wd) -> str:
  return "-" if not wd else os.path.basename(os.path.normpath(wd)) or wd


def _direction(sources, target) -> str:
  from mmvae_jax.evaluation.coherence import direction
  return direction(sources, target)


# ---------------------------------------------------------------------------------------------
# results.json


def read_results(workdir: str) -> dict | None:
  """A workdir's results.json, or None when it is missing or unreadable."""
  try:
    with open(os.path.join(workdir, RESULTS_FILE)) as f:
      res = json.load(f)
  except (OSError, ValueError):
    return None
  return res if isinstance(res, dict) else None


def load_results(workdir: str) -> dict:
  """A workdir's results.json (RunError, one line, when missing or unreadable)."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isfile(path):
    raise RunError(f"{path} not found: evaluate that run first (python experiments/evaluate.py "
                   f"--workdir={workdir})")
  res = read_results(workdir)
  if res is None:
    raise RunError(f"cannot read {path} as a results.json of experiments/evaluate.py")
  return res


def _merge_previous(workdir: str, results: dict, say: Say) -> dict:
  """`results` on top of the workdir's results.json when that one is of the same checkpoint step,
  sources, model and seed (the parts not run now keep their results)."""
  prev = read_results(workdir)
  if not prev or any(prev.get(k) != results[k]
                     for k in ("checkpoint_step", "sources", "seed", "model")):
    return results
  say(f"(keeping the results of parts not run now from {os.path.join(workdir, RESULTS_FILE)})")
  for stale in ("comparison", "flags", "flags_by_part"):  # --compare writes "comparison" again
    prev.pop(stale, None)
  merged = {**prev, **{k: v for k, v in results.items() if k not in ("settings", "seconds")}}
  merged["settings"] = {**prev.get("settings", {}), **results["settings"]}
  merged["seconds"] = dict(prev.get("seconds", {}))
  return merged


def paper_numbers(experiment, model: str) -> dict:
  """The experiment's paper numbers for `model`: {"table1": {row: ...}, "table2", "table3"}."""
  paper = dict(getattr(experiment, "paper", None) or {})
  out = {}
  rows = {row: paper.get("table1", {}).get(row) for row, _ in probe_rows({}, model)}
  rows = {k: v for k, v in rows.items() if v}
  if rows:
    out["table1"] = rows
  name = PAPER_MODELS.get(model)
  for table in ("table2", "table3"):
    if name and paper.get(table, {}).get(name):
      out[table] = paper[table][name]
  return out


# ---------------------------------------------------------------------------------------------
# The evaluation.


def evaluate(run, settings: Settings | None = None, *, say: Say = _print) -> dict:
  """Evaluates a loaded run (`mmvae_jax.load_run`), prints the tables, writes results.json.

  Returns:
    the results (as written to ``<workdir>/results.json``).
  Raises:
    ValueError (RunError included): bad settings, data that do not fit the model.
  """
  settings = settings or Settings()
  settings.validate()
  settings = dataclasses.replace(settings, parts=parse_parts(",".join(settings.parts) or "none"))
  seed = run.config.seed if settings.seed < 0 else settings.seed
  kind = getattr(run.experiment, "evaluation", "digits")
  joint_num = settings.joint_num or DEFAULT_JOINT_NUM.get(kind, 10000)
  if kind == "cca":
    return evaluate_cca(run, settings, seed=seed, joint_num=joint_num, say=say)
  if kind != "digits":
    raise ValueError(f"experiment {run.experiment.name!r} has evaluation {kind!r}, which this "
                     f"version cannot run")
  return evaluate_digits(run, settings, seed=seed, joint_num=joint_num, say=say)


def evaluate_cca(run, settings: Settings, *, seed: int, joint_num: int, say: Say = _print
                 ) -> dict:
  """Table 4 of a CUB run (`mmvae_jax.experiments.cub.evaluate_table4`), stored in results.json
  ["table4"]."""
  from mmvae_jax.experiments import cub
  res = cub.evaluate_table4(run, batch_size=settings.batch_size, joint_num=joint_num, seed=seed,
                            say=say)
  results = read_results(run.workdir) or {}
  results.update({"workdir": os.path.abspath(run.workdir), "experiment": run.experiment.name,
                  "model": run.config.model, "checkpoint_step": run.step, "seed": seed,
                  "table4": res})
  results.setdefault("settings", {})["table4"] = {"batch_size": settings.batch_size,
                                                   "joint_num": joint_num}
  write_json(os.path.join(run.workdir, RESULTS_FILE), results)
  return results


def evaluate_digits(run, settings: Settings, *, seed: int, joint_num: int, say: Say = _print
                    ) -> dict:
  """Classifiers, probe, coherence, likelihoods and figures of a digit run (module docstring)."""
  import jax
  model, names = run.model, run.model.names
  parts = list(settings.parts)
  skipped = []
  if len(names) == 1:
    skipped = [p for p in parts if p not in SINGLE_PARTS]
    parts = [p for p in parts if p in SINGLE_PARTS]
  data = run.data()
  for n in names:
    shape = tuple(data.shapes.get(n, model.modality(n).data_shape))
    if shape != tuple(model.modality(n).data_shape):
      raise RunError(f"{n}: the model reads images of shape {tuple(model.modality(n).data_shape)} "
                     f"but its source gives {shape}")
  specs = dict(data.description.get("sources", {}))
  sources = source_info(run.experiment, {n: specs.get(n, n) for n in names})
  notice = stand_in_notice(sources)
  say(f"Workdir {run.workdir}: {display_name(run.config.model)} (model {run.config.model!r}, "
      f"experiment {run.experiment.name!r}), trained on")
  for n, s in sources.items():
    say(f"  {n:<12} modality <- {s['spec']}" + ("" if s["genuine"] else
                                               f"   [{s['name']}: NOT {n.upper()}]"))
  if skipped:
    say(f"  (a single-modality VAE: skipping {', '.join(skipped)}; evaluating "
        f"{', '.join(parts) or 'nothing'})")
  if notice:
    _banner(notice, say)
  params = run.eval_params()
  say(f"\nModel: {display_name(run.config.model)} ({type(model).__name__} {list(names)}), "
      f"checkpoint step {run.step} (epoch {run.position.get('epoch')}), latent_dim "
      f"{model.latent_dim}, lambda = " + ", ".join(f"{m.name} {m.llik_scale:.4g}"
                                                  for m in model.modalities)
      + f"; {len(data.train)} train / {len(data.test)} test pairs; seed {seed}; devices "
      f"{jax.devices()}")

  results = {"workdir": os.path.abspath(run.workdir), "experiment": run.experiment.name,
             "model": run.config.model, "modalities": list(names),
             "checkpoint_step": run.step, "sources": sources, "notice": notice, "seed": seed,
             "lambda": {m.name: m.llik_scale for m in model.modalities},
             "paper": paper_numbers(run.experiment, run.config.model),
             "settings": {p: {**settings.of_part(p), **({"joint_num": joint_num}
                                                        if p == "coherence" else {})}
                          for p in parts},
             "seconds": {}}
  results = _merge_previous(run.workdir, results, say)
  path = os.path.join(run.workdir, RESULTS_FILE)
  key = jax.random.key(seed)
  num_test = settings.num_test or None

  def timed(name, fn):
    start = time.perf_counter()
    out = fn()
    results["seconds"][name] = round(time.perf_counter() - start, 1)
    say(f"[{name}: {results['seconds'][name]:.1f}s]")
    return out

  classifiers = {}
  if "classifiers" in parts:
    say(f"\nDigit classifiers (recipe {settings.classifier_recipe!r})")
    classifiers, results["classifiers"] = train_classifiers(run, settings, seed, timed, say)
    write_json(path, results)

  from mmvae_jax import evaluation as ev
  if "probe" in parts:
    say("\nLatent linear probe")
    res = timed("probe", lambda: ev.latent_probe(
        model, params, data.train, data.test, key=jax.random.fold_in(key, 1),
        epochs=settings.probe_epochs, batch_size=settings.batch_size,
        num_train=settings.probe_num_train or None, num_test=num_test, seed=seed, log=say))
    results["table1_probe"] = res
    print_table1(res, results, say)
    write_json(path, results)

  if "coherence" in parts:
    say("\nCoherence")
    cross = timed("cross_coherence", lambda: ev.cross_coherence(
        model, params, data.test, classifiers, key=jax.random.fold_in(key, 2), num=num_test,
        batch_size=settings.batch_size, seed=seed, log=lambda s: say(f"  {s}")))
    if len(names) == 2:  # every proper subset is one modality: subset coherence = cross
      subsets = {"by_subset": dict(cross["cross"]),
                 "by_size": {"1": float(np.mean(list(cross["cross"].values())))},
                 "num": cross["num"]}
    else:
      subsets = timed("subset_coherence", lambda: ev.subset_coherence(
          model, params, data.test, classifiers, key=jax.random.fold_in(key, 6), num=num_test,
          batch_size=settings.batch_size, seed=seed))
    joint = timed("joint_coherence", lambda: ev.joint_coherence(
        model, params, classifiers, key=jax.random.fold_in(key, 3), num=joint_num,
        batch_size=min(1000, joint_num)))
    results["table2_coherence"] = {"cross": cross, "joint": joint, "subsets": subsets}
    print_table2(results["table2_coherence"], results, say)
    write_json(path, results)

  if "likelihood" in parts:
    say(f"\nLog-likelihoods (K = {settings.llik_k}, chunks of {settings.llik_chunk})")
    res = timed("likelihood", lambda: ev.log_likelihoods(
        model, params, data.test, key=jax.random.fold_in(key, 4), num_samples=settings.llik_k,
        chunk_size=settings.llik_chunk, batch_size=settings.llik_batch or None,
        num=settings.llik_num or None, seed=seed, log=lambda s: say(f"  {s}")))
    results["table3_likelihoods"] = res
    print_table3(res, results, say)
    write_json(path, results)

  if "figures" in parts:
    say("\nFigures")
    results["figures"] = timed("figures", lambda: make_figures(
        model, params, data.test, run.workdir, jax.random.fold_in(key, 5), seed, settings))
    for p in results["figures"]["files"]:
      say(f"  wrote {p}")
    write_json(path, results)

  write_json(path, results)
  say(f"\nwrote {path}")
  return results


def train_classifiers(run, settings: Settings, seed: int, timed, say: Say = _print
                      ) -> tuple[dict, dict]:
  """({name: Classifier}, their summary for results.json) of every modality of a digit run:
  recipe "source" trains on the modality's source (its own train split), "paired" on the
  paired train set."""
  from mmvae_jax.evaluation import classifiers as clf_lib
  data = run.data()
  train_src, test_src = data.extras.get("train_sources"), data.extras.get("test_sources")
  if not train_src or not test_src:
    raise RunError(f"experiment {run.experiment.name!r} provides no digit sources for the "
                   f"classifiers")
  classifiers, summary = {}, {}
  for i, name in enumerate(run.model.names):
    kw = dict(epochs=settings.classifier_epochs or None, seed=seed,
              cache_dir=settings.classifier_cache, retrain=settings.retrain_classifiers,
              log=lambda s, n=name: say(f"  {n}: {s}"))

    def make(i=i, kw=kw):
      if settings.classifier_recipe == "source":
        return clf_lib.for_source(train_src[i], test_src[i], **kw)
      return clf_lib.for_paired(data.train, i, test_src[i], **kw)
    clf = timed(f"classifier_{name}", make)
    classifiers[name] = clf
    say(f"  {name} ({train_src[i].name}): test accuracy {clf.test_accuracy:.2f}% on its own "
        f"test split; {'trained' if clf.trained else 'loaded'}; {clf.path}; sha256 "
        f"{clf.checksum[:16]}...")
    summary[name] = {"test_accuracy": clf.test_accuracy, "path": clf.path,
                     "sha256": clf.checksum, "trained_now": clf.trained,
                     "recipe": clf.meta.get("recipe"), "epochs": clf.meta.get("epochs")}
  return classifiers, summary


def make_figures(model, params, test_set, workdir: str, key, seed: int, settings: Settings
                 ) -> dict:
  """eval_generation.png, eval_reconstruction.png, eval_traversals.png and eval_kl.png."""
  from mmvae_jax.evaluation import common, figures as fig
  files = []

  def out(name):
    path = os.path.join(workdir, name)
    files.append(path)
    return path

  fig.generation_grid(model, params, key, out("eval_generation.png"), num=64)
  rows = common.select_rows(len(test_set), 8, seed)
  xs, _ = test_set.gather(rows)
  fig.reconstruction_grid(model, params, xs, key, out("eval_reconstruction.png"))
  xs1, y1 = test_set.gather(rows[:1])
  trav = fig.latent_traversals(model, params, xs1, out("eval_traversals.png"),
                               steps=settings.traversal_steps)
  kl_rows = common.select_rows(len(test_set), settings.kl_num or None, seed)
  parts = []
  for start in range(0, len(kl_rows), 500):
    xk, _ = test_set.gather(kl_rows[start:start + 500])
    parts.append(fig.kl_statistics(model, params, xk))
  stats = {kind: {k: np.concatenate([s[kind][k] for s in parts]) for k in parts[0][kind]}
           for kind in ("prior", "symmetric")}
  fig.kl_boxplot(stats, out("eval_kl.png"))
  return {"files": files, "traversal_label": int(y1[0]),
          "prior_std": np.asarray(trav["prior_std"]).round(5).tolist(),
          "kl_per_dim_mean": fig.kl_summary(stats), "kl_num": int(len(kl_rows))}


# ---------------------------------------------------------------------------------------------
# Tables of one run.


def probe_rows(probe: dict, model: str, extra: bool = False) -> list[tuple[str, dict]]:
  """[(Table 1 row, {modality: %})] of one run's probe results: the paper's rows ("MMVAE",
  "MVAE (single)" and "MVAE (both)", "single-VAE"); with `extra`, also the joint-posterior probe
  of a model whose paper row has none."""
  acc, joint = probe.get("accuracy", {}), probe.get("accuracy_joint")
  if model == "mvae":
    return [("MVAE (single)", acc), ("MVAE (both)", joint or {})]
  if model.startswith(SINGLE_PREFIX):
    return [("single-VAE", acc)]
  name = display_name(model)
  rows = [(name, acc)]
  if extra and joint:
    rows.append((f"{name} (joint)", joint))
  return rows


def print_table1(res: dict, results: dict, say: Say = _print) -> None:
  """Table 1: probe accuracy per modality, ours beside the paper's where it has the row."""
  model, labels = results["model"], _labels(results)
  paper = results.get("paper", {}).get("table1", {})
  rows = probe_rows(res, model, extra=True)
  say("\nTable 1: digit accuracy (%) of a linear probe on one posterior sample")
  say(f"  {'modality':<36}" + "".join(f"{name + ' ours':>22}" + (f"{'paper':>8}" if name in paper
                                                                   else "") for name, _ in rows))
  for n in results["modalities"]:
    say(f"  {labels.get(n, n):<36}" + "".join(
        _fmt(ours.get(n), 22) + (_fmt(paper[name].get(n), 8, 1) if name in paper else "")
        for name, ours in rows) + (_not_comparable([n], labels) if paper else ""))
  views = "; ".join(f"{name}: z ~ q(z | x_1..x_M)" if (name.endswith("(joint)") or
                                                       name == "MVAE (both)")
                    else f"{name}: z ~ q(z | x_m)" for name, _ in rows)
  say(f"  ({views}, the model's own posteriors; {res['epochs']} probe epoch(s) over "
      f"{res['num_train']} train pairs, {res['num_test']} test pairs; the paper: 30 epochs over "
      "all pairs, see docs/official-code.md)")


def print_table2(coh: dict, results: dict, say: Say = _print) -> None:
  """Table 2: joint coherence and coherence from every proper subset of the modalities."""
  names, labels = results["modalities"], _labels(results)
  paper = results.get("paper", {}).get("table2")
  cross, joint, subsets = coh.get("cross"), coh.get("joint"), coh.get("subsets")
  say("\nTable 2: probability of digit matching (%) (classifiers of the *target* modality)")
  if len(names) == 2:
    cols = ["joint"] + [_direction([a], b) for a in names for b in names if a != b]
    say(f"  {'':<16}" + "".join(f"{c:>16}" for c in cols))
    ours = [joint["joint"] if joint else None] + [cross["cross"].get(c) if cross else None
                                                  for c in cols[1:]]
    say(f"  {'ours':<16}" + "".join(_fmt(v, 16) for v in ours))
    if paper:
      say(f"  {'paper ' + display_name(results['model']):<16}"
          + "".join(_fmt(paper.get(c), 16, 1) for c in cols) + _not_comparable(names, labels))
  else:
    say(f"  joint coherence: {joint['joint']:.2f}%" if joint else "  joint coherence: -")
    say("  coherence from every proper subset S of the modalities to each target outside S:")
    for d, v in (subsets or {}).get("by_subset", {}).items():
      say(f"    {d:<40}{_fmt(v, 8)}")
    say("    mean by |S|: " + ", ".join(f"|S| = {k}: {v:.2f}%"
                                       for k, v in (subsets or {}).get("by_size", {}).items()))
  say("  Directions are source->target (docs/official-code.md, \"Table 2 direction labels\"). "
      "Each generation decodes one sample of the model's posterior of the source modalities.")
  if cross:
    say(f"  cross: {cross['num']} test pairs, K = 1, decoder means; self-reconstruction "
        + ", ".join(f"{k} {v:.2f}%" for k, v in cross["reconstruction"].items()))
  if joint:
    say(f"  joint: {joint['num']} prior samples; predicted-digit counts "
        + "; ".join(f"{n}: {c}" for n, c in joint["class_counts"].items()))


def table3_heads(num_modalities: int) -> list[str]:
  every = "xm,xn" if num_modalities == 2 else "x1..xM"
  return [f"log p({every}) [lambda]", f"log p(xm|{every})", "log p(xm|xm)", "log p(xm|xn)"]


def table3_values(res: dict, m: str, n: str, names, single: bool = False) -> list:
  """Our four Table 3 columns for the pair (m, n) (None where the model has no such estimate)."""
  c = res.get("conditional", {})
  if single:
    return [None, None, c.get(f"log p({m}|{m})"), None]
  return [res.get("joint_weighted"), c.get(f"log p({m}|{','.join(names)})"),
          c.get(f"log p({m}|{m})"), c.get(f"log p({m}|{n})")]


def print_table3(res: dict, results: dict, say: Say = _print) -> None:
  """Table 3: the log-likelihood estimates, one row per ordered pair of modalities."""
  names, labels = results["modalities"], _labels(results)
  model = results["model"]
  c = res["conditional"]
  say(f"\nTable 3: log-likelihoods ({res['num_samples']}-sample importance estimates, "
      f"{res['num']} test pairs)")
  if len(names) == 1:
    n, = names
    say(f"  {display_name(model)} of {labels.get(n, n)}: log p(xm|xm) = "
        f"{c[f'log p({n}|{n})']:.2f} (the IWAE estimate of log p(x_m), proposal q(z | x_m)); the "
        "paper has no single-VAE row in Table 3.")
    return
  paper = results.get("paper", {}).get("table3", {})
  say(f"  {'m, n':<28}{'':<8}" + "".join(f"{h:>20}" for h in table3_heads(len(names))))
  for m in names:
    for n in names:
      if m == n:
        continue
      say(f"  {m + ', ' + n:<28}{'ours':<8}"
          + "".join(_fmt(v, 20) for v in table3_values(res, m, n, names)))
      if f"{m},{n}" in paper:
        say(f"  {'':<28}{'paper':<8}" + "".join(
            _fmt(v if v is not None else "(missing)", 20) for v in paper[f"{m},{n}"])
            + _not_comparable(names, labels))
  props = res.get("proposals") or {}
  say("  proposals, the model's posteriors: " + ", ".join(
      f"q(z | {s}) " + ("single" if k == 1 else f"mixture of {k} (K samples each)")
      for s, k in props.items()) + ".")
  say("  lambda convention: the joint column keeps lambda inside the log weights (lambda = "
      + ", ".join(f"{k} {v:.4g}" for k, v in res["lambda"].items())
      + f"), as the official test objective: it is NOT a normalised log-density. With every "
      f"lambda = 1 it is {res['joint_unweighted']:.2f}. The conditional columns are unweighted.")
  if paper:
    every = ",".join(names)
    say("  The paper's positive magnitudes cannot occur with the Laplace likelihood scale 0.75 "
        "(docs/official-code.md, \"Table 3 magnitudes\"): compare orderings; the paper has "
        "p(xm|xm,xn) >= p(xm|xm) for the MMVAE and < for the MVAE; ours: "
        + ", ".join(f"{m}: {c[f'log p({m}|{every})'] - c[f'log p({m}|{m})']:+.2f}"
                    for m in names))


# ---------------------------------------------------------------------------------------------
# Comparison of evaluated runs (--compare).


def results_model(workdir: str, res: dict) -> str:
  """The model of an evaluated workdir: results.json's "model", else run.json's, else mmvae."""
  model = res.get("model")
  if not model:
    try:
      with open(os.path.join(workdir, "run.json")) as f:
        model = json.load(f).get("model")
    except (OSError, ValueError, AttributeError):
      model = None
  return model or "mmvae"


def _paper_of(experiment_name: str | None) -> dict:
  if not experiment_name:
    return {}
  from mmvae_jax import experiments
  try:
    return dict(experiments.get(experiment_name).paper or {})
  except ValueError:
    return {}


def _rank(model: str) -> tuple:
  order = list(PAPER_MODELS)
  if model in order:
    return (order.index(model), model)
  return (len(order) + (1 if model.startswith(SINGLE_PREFIX) else 0), model)


def comparison_table(entries: list[tuple[str, dict]]) -> dict:
  """Tables 1-3 with one row per model from evaluated workdirs.

  Args:
    entries: [(workdir, its results.json)], any models (more than one of a kind gives more than
      one row); the paper's numbers are those of the first run's experiment.
  Returns:
    {"table1": [{"model", "workdirs": {name: workdir}, "ours": {name: %}, "paper": {name: %}}],
     "table2": [{"model", "workdir", "ours": {col: %}, "paper": {col: %}}],
     "table3": [{"m", "n", "model", "workdir", "ours": [4], "paper": [4], "num_samples"}],
     "columns": {...}, "runs": [{"workdir", "model", "sources": {name: source}, "genuine"}],
     "stand_ins": {name: [source names]}, "notice": str or None, "warnings": [str]}.
    Values a workdir did not evaluate are None; the paper's are None where it has none.
  """
  runs = []
  for wd, res in entries:
    srcs = res.get("sources", {})
    runs.append({"workdir": wd, "model": results_model(wd, res),
                 "experiment": res.get("experiment"),
                 "modalities": list(res.get("modalities") or srcs),
                 "sources": {s: v.get("name") for s, v in srcs.items()},
                 "genuine": {s: bool(v.get("genuine", True)) for s, v in srcs.items()},
                 "res": res})
  runs.sort(key=lambda r: _rank(r["model"]))  # the paper's order, whatever the workdirs' order
  paper = _paper_of(next((r["experiment"] for r in runs if r["experiment"]), None))
  names = []
  for r in runs:
    names += [n for n in r["modalities"] if n not in names]
  multi = [r for r in runs if len(r["modalities"]) > 1]
  t1, t2, t3 = [], [], []
  for r in multi:
    for row, ours in probe_rows(r["res"].get("table1_probe", {}), r["model"]):
      t1.append({"model": row, "workdirs": {n: r["workdir"] for n in names},
                 "ours": {n: ours.get(n) for n in names},
                 "paper": {n: paper.get("table1", {}).get(row, {}).get(n) for n in names}})
  singles = {n: [r for r in runs if r["model"] == SINGLE_PREFIX + n] for n in names}
  for i in range(max([len(v) for v in singles.values()] + [0])):
    row = {"model": "single-VAE", "workdirs": {}, "ours": {},
           "paper": {n: paper.get("table1", {}).get("single-VAE", {}).get(n) for n in names}}
    for n in names:
      r = singles[n][i] if i < len(singles[n]) else None
      row["workdirs"][n] = r["workdir"] if r else None
      row["ours"][n] = r["res"].get("table1_probe", {}).get("accuracy", {}).get(n) if r else None
    t1.append(row)
  cols = ["joint"] + [_direction([a], b) for a in names for b in names if a != b]
  for r in multi:
    coh = r["res"].get("table2_coherence", {})
    cross = coh.get("cross", {}).get("cross", {})
    name = PAPER_MODELS.get(r["model"], display_name(r["model"]))
    ours = {"joint": coh.get("joint", {}).get("joint"), **{c: cross.get(c) for c in cols[1:]}}
    t2.append({"model": name, "workdir": r["workdir"], "ours": ours,
               "paper": {c: paper.get("table2", {}).get(name, {}).get(c) for c in cols}})
  for m in names:
    for n in names:
      if m == n:
        continue
      for r in runs:
        single = len(r["modalities"]) == 1
        if single and r["modalities"] != [m]:
          continue
        llik = r["res"].get("table3_likelihoods")
        name = "single-VAE" if single else PAPER_MODELS.get(r["model"], display_name(r["model"]))
        ours = table3_values(llik, m, n, r["modalities"], single) if llik else [None] * 4
        ref = paper.get("table3", {}).get(name, {}).get(f"{m},{n}")
        t3.append({"m": m, "n": n, "model": name, "workdir": r["workdir"], "ours": ours,
                   "paper": list(ref) if ref else [None] * 4,
                   "num_samples": llik.get("num_samples") if llik else None})
  stand_ins, warnings = {}, []
  for s in names:
    used = [r for r in runs if s in r["sources"]]
    srcs = sorted({r["sources"][s] for r in used if r["sources"][s]})
    bad = sorted({r["sources"][s] for r in used if not r["genuine"].get(s, True)})
    if bad:
      stand_ins[s] = bad
    if len(srcs) > 1:
      warnings.append(f"WARNING: the compared runs read different data in the {s!r} modality ("
                      + "; ".join(f"{r['workdir']}: {r['sources'][s]}" for r in used)
                      + "): their rows are not comparable with each other.")
  notice = None
  if stand_ins:
    notice = ("NOTICE: " + " and ".join(
        f"the {s!r} modality of the compared runs was trained on "
        + "/".join(repr(x) for x in v) + f", NOT {s.upper()}" for s, v in stand_ins.items())
        + ". Every 'ours' number in these tables is measured on that stand-in data; it is not the "
        "paper's " + "/".join(s.upper() for s in stand_ins) + " number and is not comparable "
        "with it.")
  return {"table1": t1, "table2": t2, "table3": t3,
          "columns": {"table1": names, "table2": cols, "table3": table3_heads(len(names))},
          "runs": [{k: v for k, v in r.items() if k != "res"} for r in runs],
          "stand_ins": stand_ins, "notice": notice, "warnings": warnings}


def print_comparison(comp: dict, say: Say = _print) -> None:
  """Prints `comparison_table`'s Tables 1-3 (ours beside the paper's, one row per model)."""
  stand = comp["stand_ins"]
  names = comp["columns"]["table1"]
  head = {s: s.upper() if s not in stand else f"{s.upper()}*" for s in names}
  if comp["notice"]:
    _banner(comp["notice"], say)
  for w in comp["warnings"]:
    say(w)
  say("\nComparison of the runs " + ", ".join(f"{_short(r['workdir'])} "
                                           f"({display_name(r['model'])})" for r in comp["runs"]))
  star = ("  * " + ", ".join(f"{s.upper()} = {'/'.join(v)} (stand-in): the paper's "
                             f"{s.upper()} numbers are not comparable" for s, v in stand.items())
          if stand else None)

  say("\nTable 1 (comparison): digit accuracy (%) of a linear probe on one posterior sample")
  say(f"  {'model':<16}" + "".join(f"{head[s] + ' ours':>18}{'paper':>8}" for s in names)
      + "   workdir")
  for row in comp["table1"]:
    wds = [w for w in row["workdirs"].values() if w]
    where = (_short(wds[0]) if len(set(wds)) == 1 else
             ", ".join(f"{_short(w)} ({s})" for s, w in row["workdirs"].items() if w))
    say(f"  {row['model']:<16}" + "".join(_fmt(row["ours"][s], 18) + _fmt(row["paper"][s], 8, 1)
                                         for s in names) + f"   {where}")
  say("  Each row samples its model's own posterior: MMVAE, single-VAE: z ~ q_m(z | x_m); MVAE "
      "(single): z ~ N(0, I)·q_m; MVAE (both): z ~ N(0, I)·q_m·q_n.")
  if star:
    say(star)

  cols = comp["columns"]["table2"]
  say("\nTable 2 (comparison): probability of digit matching (%), directions source->target")
  say(f"  {'model':<16}" + "".join(f"{c + ' ours':>20}{'paper':>8}" for c in cols) + "   workdir")
  for row in comp["table2"]:
    say(f"  {row['model']:<16}" + "".join(_fmt(row["ours"][c], 20) + _fmt(row["paper"][c], 8, 1)
                                         for c in cols) + f"   {_short(row['workdir'])}")
  if not comp["table2"]:
    say("  (no multimodal run among the compared workdirs)")
  if star:
    say(star)

  say("\nTable 3 (comparison): log-likelihoods (importance estimates; joint column with lambda "
      "inside)")
  say(f"  {'m, n':<20}{'model':<12}{'':<7}" + "".join(f"{h:>20}" for h in comp["columns"]["table3"])
      + "   workdir")
  for row in comp["table3"]:
    say(f"  {row['m'] + ', ' + row['n']:<20}{row['model']:<12}{'ours':<7}"
        + "".join(_fmt(v, 20) for v in row["ours"]) + f"   {_short(row['workdir'])}"
        + (f" (K = {row['num_samples']})" if row["num_samples"] else " (not evaluated)"))
    if any(v is not None for v in row["paper"]):
      say(f"  {'':<20}{'':<12}{'paper':<7}" + "".join(
          _fmt(v if v is not None else ("(missing)" if i == 0 else None), 20)
          for i, v in enumerate(row["paper"])))
  say("  The paper's Table 3 has MMVAE and MVAE rows only; its positive magnitudes cannot occur "
      "with the Laplace likelihood scale 0.75 (docs/official-code.md, \"Table 3 magnitudes\"): "
      "compare orderings between models.")
  if star:
    say(star)
  if comp["notice"]:
    say(comp["notice"])


def compare_and_write(workdir: str, results: dict, others: list[str], say: Say = _print) -> dict:
  """Prints the comparison of `workdir` (its `results`) with the evaluated `others` and stores
  it in workdir/results.json["comparison"]."""
  entries = [(workdir, results)] + [(wd, load_results(wd)) for wd in others]
  comp = comparison_table(entries)
  print_comparison(comp, say)
  results["comparison"] = comp
  path = os.path.join(workdir, RESULTS_FILE)
  write_json(path, results)
  say(f"\nwrote the comparison into {path} ['comparison']")
  return comp
