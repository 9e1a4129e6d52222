"""The command line shared by every experiment script: one flag per `RunConfig` field, defined
once here, with each experiment's defaults; one-line errors.

    python experiments/mnist_svhn.py --k=30 --model=mopoe
    python experiments/three_digits.py --data_dir=path/to/npz --max_steps=20

Every script fails the same way on bad input: ``<script>: error: <cause>`` on stderr and exit
code 2 (1 for a failure while running), never a traceback.

Several hosts run the same command once per process (``--coordinator_address``,
``--num_processes``, ``--process_id``, or JAX's cluster detection: see `mmvae_jax.multihost`).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Callable, NoReturn

from absl import app, flags

FLAGS = flags.FLAGS

# Help of every RunConfig field that is a flag (sources and options are defined per experiment).
HELP = {
    "model": "Model name (the registry of mmvae_jax.models): mmvae = mixture of experts (the "
             "paper); mvae = product of experts (Wu & Goodman 2018); mopoe = mixture of "
             "products of experts (Sutter et al. 2021); vae_<modality> = single-modality VAE.",
    "k": "Importance samples per expert (K).",
    "estimator": "Gradient estimator: dreg = doubly-reparameterised (the paper's description; "
                 "the library default); legacy = what the official code computes (IWAE "
                 "sticking-the-landing), to reproduce its numbers; iwae = plain autodiff; "
                 "dreg_moe = doubly-reparameterised and unbiased for any number of experts "
                 "(stratified bound only; docs/estimators.md).",
    "objective": "Training objective, a name the model accepts (mmvae: moe_iwae, moe_elbo; "
                 "mvae: subsampled_elbo, subsampled_iwae, joint_elbo, joint_iwae; mopoe: "
                 "mopoe_elbo, mopoe_iwae; mmvae_plus: mmvae_plus_iwae); auto: the model's default.",
    "looser": "Stratified bound of eq. (3); --nolooser: the tight bound.",
    "learn_prior": "Learn the prior's scale logits.",
    "latent_dim": "Latent dimension D (mmvae_plus: the shared latent).",
    "private_dim": "Private latent dimension of each modality (mmvae_plus).",
    "beta": "Weight beta of the regularisation terms of the objective (mmvae_plus).",
    "batch_size": "Global batch size (split over all devices).",
    "epochs": "Epochs over the paired training set.",
    "max_steps": "Stop after this many steps in total (0: no limit).",
    "lr": "Learning rate of Adam with PyTorch-style AMSGrad.",
    "llik_scaling": "λ of the first modality's likelihood; 0: the experiment's rule.",
    "partners": "Same-class partners per instance when pairing sources (see "
                "docs/official-code.md#partners-per-instance).",
    "seed": "Seed of the parameters, pairing, data order and samples.",
    "data_dir": "tensorflow-datasets data directory, also searched for relative .npz sources.",
    "eval_every": "Steps between test evaluations (0: at each epoch end).",
    "eval_batches": "Test batches per evaluation (0: all test pairs).",
    "eval_batch_size": "Test batch size (0: --batch_size).",
    "checkpoint_every": "Steps between checkpoints (also at epoch ends).",
    "log_every": "Steps between metric logs.",
    "keep_checkpoints": "Checkpoints kept in the workdir.",
    "figures": "Save generation / reconstruction PNGs at each epoch end.",
    "expert_scale": "Scale of Gaussian experts (product-of-experts models): logvar (Wu & "
                    "Goodman), softplus + 1e-6, or modality (the modality's own constraint).",
    "missing": "Incomplete training data: comma-separated name:fraction entries, e.g. "
               "svhn:0.5 hides the svhn modality of half the training examples (for "
               "label-paired sources, of half the svhn instances, in every pair that holds "
               "one), drawn from --seed; an example is never left with nothing observed. "
               "Test data stay complete. See docs/incomplete-data.md.",
    "missing_mode": "With --missing: keep = train on every example that has at least one "
                    "modality (the incomplete ones too); drop = train on the complete "
                    "examples only.",
    "decoder_impl": "Transposed-convolution formulation: matmul (fast on CPU), conv (XLA "
                    "convolutions, fast on GPU/TPU), auto picks by backend.",
}
ENUMS = {"estimator": ["dreg", "legacy", "iwae", "dreg_moe"],
         "expert_scale": ["logvar", "softplus", "modality"],
         "decoder_impl": ["auto", "matmul", "conv"], "missing_mode": ["keep", "drop"]}
ALIASES = {"mvae_scale": "expert_scale"}
NOT_FLAGS = ("experiment", "sources", "options")


def fail(prog: str, message: str, code: int = 2, *, together: bool = True) -> NoReturn:
  """Print ``prog: error: message`` to stderr and exit with `code`.

  In a run of several processes the others learn why this one ended; `together` (an outcome
  that every process reaches: an agreed error, a coordinated stop) first waits a bounded time
  for them, so that each process ends with its own line and none waits in vain.
  """
  multihost = sys.modules.get("mmvae_jax.multihost")  # never imports JAX for a flag error
  if multihost is not None and multihost.active():
    multihost.exit_process(code, f"{prog}: error: {message}", wait_for_others=together)
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(code)


def flags_parser(prog: str, flag_values: flags.FlagValues = FLAGS
                 ) -> Callable[[list[str]], list[str]]:
  """An ``app.run(flags_parser=...)`` that fails with one line on an unknown or bad flag."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flag_values(argv)
    except flags.Error as e:
      fail(prog, str(e))

  return parse


def _define(name: str, default, help_text: str, flag_values) -> None:
  if name in ENUMS:
    flags.DEFINE_enum(name, default, ENUMS[name], help_text, flag_values=flag_values)
  elif isinstance(default, bool):
    flags.DEFINE_boolean(name, default, help_text, flag_values=flag_values)
  elif isinstance(default, int):
    flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
  elif isinstance(default, float):
    flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
  else:
    flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def define_run_flags(experiment_name: str, flag_values: flags.FlagValues = FLAGS) -> None:
  """Every flag of a training script of `experiment_name`: the `RunConfig` fields (with the
  experiment's defaults), one source flag per modality (digit experiments), the experiment's
  own options, --workdir and the host-memory flags."""
  from mmvae_jax import experiments
  from mmvae_jax.config import RunConfig
  exp = experiments.get(experiment_name)
  base = exp.config()
  for f in dataclasses.fields(RunConfig):
    if f.name in NOT_FLAGS:
      continue
    default = getattr(base, f.name)
    if f.name == "model":
      flags.DEFINE_enum("model", default, exp.model_names(), HELP["model"], flag_values=flag_values)
    else:
      _define(f.name, default, HELP[f.name], flag_values)
  for alias, target in ALIASES.items():
    flags.DEFINE_alias(alias, target, flag_values=flag_values)
  for name, spec in dict(getattr(exp, "default_sources", ())).items():
    flags.DEFINE_string(name, spec, f"Source of the {name} modality: a tfds name or an .npz "
                        f"(x_train, y_train, x_test, y_test).", flag_values=flag_values)
  for name, (default, help_text) in exp.option_flags().items():
    _define(name, default, help_text, flag_values)
  flags.DEFINE_string("workdir", f"runs/{experiment_name}",
                      "Checkpoints, logs and figures go here; re-running the same command "
                      "resumes from the latest checkpoint.", flag_values=flag_values)
  flags.DEFINE_boolean("override_config", False,
                       "Resume a workdir with values that change its run (they are recorded in "
                       "launches.jsonl); without it such a launch is refused.",
                       flag_values=flag_values)
  define_host_memory_flags(flag_values)
  define_distributed_flags(flag_values)
  define_download_flags(flag_values)


def define_download_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """``--download`` and ``--download_mirror``: see `mmvae_jax.data.download`."""
  flags.DEFINE_enum(
      "download", "auto", ["auto", "never"],
      "tfds datasets missing from --data_dir: auto = download (checksummed) and prepare them "
      "when their hosts answer within 3 s, else fail at once (needs TensorFlow: pip install "
      "-e \".[data]\"); never = fail at once. A prepared dataset is never fetched again.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "download_mirror", None,
      "Base URL (http(s):// or file://) holding <dataset>/<file> with tfds's registered "
      "checksums, fetched instead of the original hosts.", flag_values=flag_values)


def prepare_data(prog: str, experiment, config, workdir: str | None = None, *,
                 collective: bool = True, say: Callable[[str], None] | None = None,
                 flag_values: flags.FlagValues = FLAGS) -> None:
  """Downloads and prepares the tfds datasets `config` reads (``--download=auto``); one line
  and exit 2 when they cannot be. Of several processes (`collective`: all call this), process
  0 goes first, so that a --data_dir every host shares is prepared once; then each other
  process prepares what it still lacks (a data_dir of its own)."""
  if flag_values.download == "never":
    return
  names = experiment.tfds_datasets(config, workdir=workdir)
  if not names:
    return
  from mmvae_jax import multihost
  from mmvae_jax.data import download
  from mmvae_jax.errors import first_line

  def attempt() -> str | None:
    try:
      download.ensure_prepared(names, config.data_dir,
                               mirror=flag_values.download_mirror or None, say=say)
    except (download.DownloadError, FileNotFoundError, ValueError) as e:
      return first_line(e, 1000)
    return None

  if not (collective and multihost.is_multiprocess()):
    error = attempt()
  else:
    primary = multihost.is_primary()
    error = multihost.agree(attempt() if primary else None)
    if error is None:
      error = multihost.agree(None if primary else attempt())
  if error:
    fail(prog, error, together=collective)


def define_distributed_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """``--coordinator_address``, ``--num_processes``, ``--process_id``: one process of several."""
  flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0 when this is one of several processes (default: "
      "JAX_COORDINATOR_ADDRESS, or JAX's detection of a TPU slice, Slurm step or Open MPI job).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_processes", 0, "Processes of the run, one per host or per GPU (0: JAX_NUM_PROCESSES "
      "or the detected cluster's; 1: a single process, whatever the environment says).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "process_id", -1, "This process's number in [0, --num_processes) (-1: JAX_PROCESS_ID or "
      "the detected cluster's).", flag_values=flag_values)


def initialize_from_flags(prog: str, hint: str = "",
                          flag_values: flags.FlagValues = FLAGS) -> bool:
  """Joins the processes the distributed flags (or the environment) describe; one line and
  exit 2 when they cannot be joined. Returns whether this process is one of several."""
  from mmvae_jax import multihost
  multihost.set_program(prog, hint)
  if not flag_values["verbosity"].present:  # JAX's lines on joining
    logging.getLogger("jax._src.distributed").setLevel(logging.WARNING)
  try:
    several = multihost.initialize(flag_values.coordinator_address or None,
                                   flag_values.num_processes or None,
                                   None if flag_values.process_id < 0 else flag_values.process_id,
                                   prog=prog)
  except multihost.DistributedError as e:
    fail(prog, str(e))
  if several:
    if not show_tracebacks(flag_values):
      import faulthandler
      faulthandler.disable()  # JAX's own message suffices when it ends a process (process 0 lost)
    import orbax.checkpoint  # noqa: F401  (defines the flag below)
    barrier = "experimental_orbax_use_distributed_barrier"
    if barrier in flag_values and not flag_values[barrier].present:
      flag_values[barrier].value = True  # orbax's barriers through the coordination service
  return several


def config_from_flags(experiment_name: str, flag_values: flags.FlagValues = FLAGS):
  """The `RunConfig` the parsed flags describe."""
  from mmvae_jax import experiments
  from mmvae_jax.config import RunConfig
  exp = experiments.get(experiment_name)
  values = {f.name: flag_values[f.name].value for f in dataclasses.fields(RunConfig)
            if f.name not in NOT_FLAGS}
  sources = {n: flag_values[n].value for n in dict(getattr(exp, "default_sources", ()))}
  options = {n: flag_values[n].value for n in exp.option_flags()}
  return RunConfig(experiment=experiment_name, sources=sources, options=options, **values)


TRACEBACK_ENV = "MMVAE_JAX_TRACEBACK"


def quiet_libraries(flag_values: flags.FlagValues = FLAGS) -> None:
  """Library loggers (orbax, absl, jax) at WARNING unless --verbosity was given."""
  from absl import logging as absl_logging
  if not flag_values["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax", "orbax", "absl"):
      logging.getLogger(name).setLevel(logging.WARNING)


def show_tracebacks(flag_values: flags.FlagValues = FLAGS) -> bool:
  """Whether unexpected errors show their traceback (--verbosity >= 1 or MMVAE_JAX_TRACEBACK=1)."""
  import os
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or flag_values.verbosity >= 1


def guarded(prog: str, fn: Callable[[], None]) -> None:
  """Runs `fn`; a bad environment or an unexpected error becomes one line on stderr."""
  try:
    fn()
  except SystemExit:
    raise
  except KeyboardInterrupt as e:
    code = getattr(e, "exit_code", None)  # a coordinated stop (mmvae_jax.train.Interrupted)
    fail(prog, str(e) or "interrupted", code or 130, together=code is not None)
  except MemoryError:
    fail(prog, "out of host memory: lower --batch_size or --k", 2, together=False)
  except OSError as e:
    if show_tracebacks():
      raise
    fail(prog, f"{e.strerror or type(e).__name__}: {e.filename or e}", 2, together=False)
  except Exception as e:  # pylint: disable=broad-except
    multihost = sys.modules.get("mmvae_jax.multihost")
    if multihost is not None and isinstance(e, multihost.PeerStopped):
      fail(prog, str(e), e.code, together=False)
    if multihost is not None:
      multihost.await_watchdog(e)  # a collective that lost a peer: the watchdog's line
    if show_tracebacks():
      raise
    text = str(e).strip().splitlines()
    fail(prog, f"unexpected {type(e).__name__}: {text[0] if text else ''} (set "
               f"{TRACEBACK_ENV}=1 or --verbosity=1 for the traceback)", 1, together=False)


def train_main(experiment_name: str, prog: str) -> Callable[[list[str]], None]:
  """The ``main`` of a training script: flags → `RunConfig` → `mmvae_jax.runs.train_run`."""

  def main(argv):
    if len(argv) > 1:
      fail(prog, f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_from_flags(experiment_name)
    try:
      config.validate()  # every value but the device split, before a backend starts (and logs)
    except ValueError as e:
      fail(prog, str(e))
    from mmvae_jax import experiments
    num_modalities = len(experiments.get(experiment_name).used_modalities(config))
    apply_host_memory_flags(num_modalities * config.k * config.batch_size)
    quiet_libraries()
    several = initialize_from_flags(
        prog, "run the same command on every host to resume from the last checkpoint")
    log = logging.getLogger("mmvae_jax")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if several:
      import jax
      if jax.process_index() != 0:
        log.setLevel(logging.ERROR)  # process 0 reports for all
    log.propagate = False  # absl's handler (at WARNING) would drop the progress lines

    def run():
      from mmvae_jax import experiments, runs, train
      try:
        final = runs.train_run(
            config, FLAGS.workdir, override_config=FLAGS.override_config,
            before_data=lambda: prepare_data(prog, experiments.get(experiment_name), config,
                                             FLAGS.workdir))
      except runs.RunError as e:
        fail(prog, str(e))
      except train.NonFiniteLossError as e:
        fail(prog, str(e), 1)
      import json
      log.info("done: %s", json.dumps(final, default=str))

    guarded(prog, run)

  return main


def run_script(experiment_name: str, prog: str) -> None:
  """Defines the flags of `experiment_name` and runs its training main."""
  define_run_flags(experiment_name)
  app.run(train_main(experiment_name, prog), flags_parser=flags_parser(prog))


def define_host_memory_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """``--retain_host_memory`` and ``--huge_pages``: see `mmvae_jax.hostmem`."""
  flags.DEFINE_enum(
      "retain_host_memory", "auto", ["auto", "always", "never"],
      "Keep freed host memory for reuse (glibc malloc settings), so that XLA:CPU's per-step "
      "buffer is not page-faulted in again every step. auto: only for small steps (at most "
      "512 decoded latents, M*K*B), where it is faster at no memory cost; never: glibc's "
      "defaults.", flag_values=flag_values)
  flags.DEFINE_enum(
      "huge_pages", "auto", ["auto", "never"],
      "Restart once with glibc malloc asking for transparent huge pages (GLIBC_TUNABLES="
      "glibc.malloc.hugetlb=1), so that large host buffers are faulted in 2 MiB at a time. "
      "auto: where the kernel's THP mode is 'madvise' and glibc >= 2.35; never: as started.",
      flag_values=flag_values)


def apply_host_memory_flags(latents_per_step: int,
                            flag_values: flags.FlagValues = FLAGS) -> None:
  """Applies ``--huge_pages`` (`hostmem.restart_with_huge_pages`: may re-execute the program)
  and ``--retain_host_memory`` (`hostmem.apply_policy`) for a step decoding `latents_per_step`
  latents. Call before the first JAX computation."""
  from mmvae_jax import hostmem
  hostmem.restart_with_huge_pages(flag_values.huge_pages)
  hostmem.apply_policy(flag_values.retain_host_memory, latents_per_step)
