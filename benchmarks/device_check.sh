#!/usr/bin/env bash
# The GPU check, in one command on one GPU (H100 / H200 class), in under 8 minutes:
#
#   benchmarks/device_check.sh [--official_src=DIR] [--wheels=DIR] [--out=FILE] [--budget_s=S]
#   benchmarks/device_check.sh --dry_run        # the same pipeline on the CPU at tiny sizes
#
# 1. install: each distribution of benchmarks/device_wheels.txt that the host lacks, from the
#    wheels in --wheels (default benchmarks/wheels/, filled beforehand on a connected machine by
#    benchmarks/fetch_wheels.sh), with --no-deps --no-index into a private folder put on
#    PYTHONPATH: no environment is modified and no network is needed;
# 2. tests: the numerical test modules (losses and their float64 / PyTorch references,
#    densities, networks, optimiser, the three models, the training step) on the device;
# 3. train_step: benchmarks/train_step.py at K = 1, 10, 30 with each decoder formulation
#    (--decoder_impl=conv and matmul), B = 128, with peak device memory;
# 4. official: benchmarks/compare_official.py at K = 1, 10, 30: the released official code
#    (--official_src, a checkout of github.com/iffsid/mmvae's src/, default
#    benchmarks/official_src/; never part of this repository) timed against ours on the same
#    device, interleaved.
#
# Writes one JSON object to --out (default: $OUT/device_check.json when $OUT is set, else
# device_check.json), rewritten after every stage so that a run cut short keeps what it
# measured. Each stage runs under a time limit, within --budget_s in all (default 450 s; with
# --dry_run 3600 s and six times the limits, as a CPU compiles for longer than it computes);
# a stage that fails is recorded (exit status, last lines of its output) and the check goes on.
# Exit status: 0 when every stage succeeded, 1 otherwise, 2 for bad arguments.
#
# --dry_run runs every stage on one CPU device (JAX_PLATFORMS=cpu) at B = 8 with two timed steps
# and three tests, to check that everything is wired before a GPU is spent on it.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PROG="device_check.sh"
OFFICIAL_SRC="$REPO/benchmarks/official_src"
WHEELS="$REPO/benchmarks/wheels"
OUT_FILE=""
BUDGET_S=""
DRY_RUN=0
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "$PROG: error: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --official_src=*) OFFICIAL_SRC="${arg#*=}" ;;
    --wheels=*) WHEELS="${arg#*=}" ;;
    --out=*) OUT_FILE="${arg#*=}" ;;
    --budget_s=*) BUDGET_S="${arg#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[[ -z "$BUDGET_S" ]] && { (( DRY_RUN )) && BUDGET_S=3600 || BUDGET_S=450; }
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] && (( BUDGET_S >= 60 )) || die "--budget_s must be a whole number of seconds >= 60"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3)"
if [[ -z "$OUT_FILE" ]]; then
  OUT_FILE="${OUT:+$OUT/}device_check.json"
fi
mkdir -p "$(dirname "$OUT_FILE")" || die "cannot create the folder of --out=$OUT_FILE"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")" || die "cannot create a temporary folder"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
SITE="$WORK/site"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export MMVAE_JAX_TRACEBACK=1  # a failing stage's output then says where it failed
# One persistent XLA cache for every stage: compare_official.py's side of ours then reuses
# train_step.py's compilations (the same step), leaving more of the budget for measuring.
export JAX_COMPILATION_CACHE_DIR="$WORK/xla_cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

if (( DRY_RUN )); then
  # One CPU device, as on one GPU: the tests that need four are deselected the same way.
  export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1
  BATCH=8; LIMIT_SCALE=6
  TESTS=(tests/test_optim.py tests/test_train.py::test_step_key_is_fold_in_of_the_seed_key
         tests/test_train.py::test_four_devices_equal_one_device)
  STEP_ARGS=(--steps=2 --warmup=0)
  CMP_ARGS=(--rounds=1 --steps_per_round=2 --warmup=0)
else
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
  BATCH=128; LIMIT_SCALE=1
  TESTS=(tests/test_loss.py tests/test_distributions.py tests/test_networks.py
         tests/test_official_torch.py tests/test_optim.py tests/test_mvae.py tests/test_mopoe.py
         tests/test_train.py)
  STEP_ARGS=(--steps=20 --warmup=2)
  CMP_ARGS=()
fi
KS=(1 10 30)
# Tests that compare 4 devices with 1 (conftest.py fakes 4 CPU devices); deselected on fewer.
FOUR_DEVICE_TESTS=(tests/test_loss.py::test_shard_map_data_parallel_matches_unsharded
                   tests/test_loss.py::test_sharded_jit_matches_unsharded
                   tests/test_train.py::test_four_devices_equal_one_device)
IMPLS=(conv matmul)

elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( BUDGET_S - $(elapsed) )); }

# run_stage NAME LIMIT_S CMD...: runs CMD under `timeout`, output in $WORK/NAME.out, and records
# {"stage", "rc", "seconds", "timed_out"} in $WORK/stages.jsonl. Skips when the budget is spent.
run_stage() {
  local name="$1" limit=$(( $2 * LIMIT_SCALE )); shift 2
  local left; left=$(remaining)
  (( limit > left - 10 )) && limit=$(( left - 10 ))
  if (( limit < 5 )); then
    echo "{\"stage\": \"$name\", \"skipped\": \"time budget spent\"}" >> "$WORK/stages.jsonl"
    echo "[$(elapsed)s] $name: skipped (time budget spent)" >&2
    return 1
  fi
  echo "[$(elapsed)s] $name (limit ${limit}s): $*" >&2
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.out" 2>&1
  rc=$?
  local timed_out=false; (( rc == 124 || rc == 137 )) && timed_out=true
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"timed_out\": $timed_out}" \
    >> "$WORK/stages.jsonl"
  echo "[$(elapsed)s] $name: exit status $rc" >&2
  return $rc
}

# Collects $WORK into one JSON object at $OUT_FILE (standard library only).
assemble() {
  "$PYTHON" - "$WORK" "$OUT_FILE" "$DRY_RUN" "$START" "$OFFICIAL_SRC" <<'PY'
import glob, json, os, re, sys, time
import xml.etree.ElementTree as ET

work, out_file, dry_run, start, official_src = sys.argv[1:6]

def read(name):
  try:
    with open(os.path.join(work, name)) as f:
      return f.read()
  except OSError:
    return ""

def last_json(text):
  """The last line of `text` that is a JSON object (the benchmarks print one)."""
  for line in reversed(text.splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except ValueError:
        pass
  return None

stages = {}
for line in read("stages.jsonl").splitlines():
  record = json.loads(line)
  stages[record.pop("stage")] = record

def tail(name, n=15):
  return read(name + ".out").splitlines()[-n:]

result = {"benchmark": "device_check", "dry_run": dry_run == "1",
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "elapsed_s": round(time.time() - float(start)), "stages": stages}
env = last_json(read("environment.out"))
result["environment"] = env if env is not None else {"error": tail("environment")}
if "install" in stages:
  result["install"] = {"installed": read("install.list").split(), **stages["install"]}
  if stages["install"].get("rc"):
    result["install"]["output_tail"] = tail("install")

if "tests" in stages:
  tests = dict(stages["tests"])
  try:
    suite = ET.parse(os.path.join(work, "tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    count = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests.update(count, passed=count["tests"] - count["failures"] - count["errors"] - count["skipped"])
    tests["not_passed"] = [
        f"{case.get('classname')}::{case.get('name')}: {child.tag}: "
        + (child.get("message") or "").splitlines()[0][:200] if child.get("message") else
        f"{case.get('classname')}::{case.get('name')}: {child.tag}"
        for case in suite.iter("testcase") for child in case
        if child.tag in ("failure", "error")]
  except (OSError, ET.ParseError, AttributeError):  # cut short: no report; count the -v lines
    lines = read("tests.out").splitlines()
    outcome = lambda line: next((o for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")
                                 if f" {o}" in line and "::" in line), None)
    outcomes = [(line.split(" ")[0], outcome(line)) for line in lines if outcome(line)]
    tests.update({key: sum(1 for _, x in outcomes if x == o) for o, key in (
        ("PASSED", "passed"), ("FAILED", "failures"), ("ERROR", "errors"), ("SKIPPED", "skipped"))})
    tests["not_passed"] = [f"{name}: {o}" for name, o in outcomes if o in ("FAILED", "ERROR")]
    tests["output_tail"] = tail("tests")
  deselected = read("deselected.list").split()
  if deselected:
    tests["deselected_need_4_devices"] = deselected
  result["tests"] = tests

peaks = []
def collect(prefix):
  runs = []
  for path in sorted(glob.glob(os.path.join(work, prefix + "_*.out")),
                     key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]):
    name = os.path.basename(path)[:-4]
    record = {"run": name, **stages.get(name, {})}
    parsed = last_json(read(name + ".out"))
    if parsed is None or record.get("rc"):
      record["output_tail"] = tail(name)
    if parsed is not None:
      record["result"] = parsed
      def walk(node, where):
        if isinstance(node, dict):
          for key, value in node.items():
            if key == "peak_device_mb" and isinstance(value, (int, float)):
              peaks.append({"run": where, "peak_device_mb": value})
            else:
              walk(value, f"{where}.{key}" if isinstance(value, dict) else where)
      walk(parsed, name)
    runs.append(record)
  return runs

result["train_step"] = collect("train_step")
result["official"] = collect("official")
result["official_src"] = official_src if os.path.isdir(official_src) else None
result["peak_device_memory"] = peaks
result["ok"] = bool(stages) and all(s.get("rc") == 0 for s in stages.values())
tmp = out_file + ".tmp"
with open(tmp, "w") as f:
  json.dump(result, f, indent=1)
  f.write("\n")
os.replace(tmp, out_file)
PY
}

# The whole check is one function, read in full before it runs: editing this file during a
# run cannot change what the run does.
main() {
  # --- 1. install what the host lacks, from the carried wheels --------------------------------
  "$PYTHON" - "$REPO/benchmarks/device_wheels.txt" > "$WORK/install.list" <<'PY'
import importlib.metadata as md, re, sys
for line in open(sys.argv[1]):
  requirement = line.split("#")[0].strip()
  if requirement:
    try:
      md.distribution(re.split(r"[=<>!~ ;\[]", requirement, maxsplit=1)[0])
    except md.PackageNotFoundError:
      print(requirement)
PY
  if [[ -s "$WORK/install.list" ]]; then
    if [[ ! -d "$WHEELS" ]]; then
      echo "$PROG: error: missing here: $(tr '\n' ' ' < "$WORK/install.list")and no wheels at $WHEELS (run benchmarks/fetch_wheels.sh on a connected machine first)" >&2
      exit 2
    fi
    run_stage install 120 "$PYTHON" -m pip install --no-deps --no-index --find-links "$WHEELS" \
        --no-compile --target "$SITE" --disable-pip-version-check -q -r "$WORK/install.list"
  else
    echo '{"stage": "install", "rc": 0, "seconds": 0, "timed_out": false}' >> "$WORK/stages.jsonl"
  fi

  # --- environment ----------------------------------------------------------------------------
  run_stage environment 90 "$PYTHON" - <<'PY'
import json, platform, subprocess, sys
import importlib.metadata as md
info = {"python": platform.python_version(), "machine": platform.machine()}
for dist in ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "distrax",
             "tfp-nightly", "tensorflow-datasets", "tensorboardX", "torch"):
  try:
    info[dist] = md.version(dist)
  except md.PackageNotFoundError:
    info[dist] = None
try:
  info["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
      capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
except (OSError, subprocess.SubprocessError):
  info["nvidia_smi"] = None
import jax  # after the versions: a broken jax install still leaves them in the JSON
info.update(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
            device_kind=jax.devices()[0].device_kind)
import distrax, mmvae_jax.train  # the package imports with what was installed
try:
  import torch
  info["torch_cuda"] = torch.cuda.is_available()
except ImportError:
  pass
print(json.dumps(info))
PY
  assemble

  # --- 2. tests on the device -----------------------------------------------------------------
  # -v: one line per test, which is what is left to count if the stage is cut short.
  TEST_ARGS=(-v --tb=short -p no:cacheprovider --junitxml="$WORK/tests.xml" -o junit_family=xunit1)
  DEVICES=$("$PYTHON" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["environment"].get("devices", [])))' "$OUT_FILE" 2>/dev/null || echo 0)
  if (( DEVICES < 4 )); then
    for t in "${FOUR_DEVICE_TESTS[@]}"; do TEST_ARGS+=(--deselect "$t"); done
    printf '%s\n' "${FOUR_DEVICE_TESTS[@]}" > "$WORK/deselected.list"
  fi
  run_stage tests 150 "$PYTHON" -m pytest "${TEST_ARGS[@]}" "${TESTS[@]}"
  assemble

  # --- 3. our training step, both decoder formulations ----------------------------------------
  for k in "${KS[@]}"; do
    for impl in "${IMPLS[@]}"; do
      run_stage "train_step_k${k}_${impl}" 60 "$PYTHON" "$REPO/benchmarks/train_step.py" \
          --k="$k" --batch_size="$BATCH" --decoder_impl="$impl" "${STEP_ARGS[@]}" --json
      assemble
    done
  done

  # --- 4. the released official code on the same device ---------------------------------------
  # compare_official.py's options are read from its --help, so that this script also runs
  # with versions of it that lack some of them.
  CMP_HELP="$("$PYTHON" "$REPO/benchmarks/compare_official.py" --help 2>&1)"
  has_flag() { grep -q -- "$1" <<<"$CMP_HELP"; }
  OFFICIAL_ARGS=()
  OFFICIAL_SKIP=""
  if has_flag --official_src; then
    if [[ -d "$OFFICIAL_SRC" ]]; then
      OFFICIAL_ARGS+=(--official_src="$OFFICIAL_SRC")
    else
      OFFICIAL_SKIP="no official code at $OFFICIAL_SRC (a copy of the src/ folder of github.com/iffsid/mmvae; --official_src=DIR)"
    fi
  else
    echo "$PROG: this compare_official.py takes no --official_src: timing its own reference" >&2
  fi
  # On a GPU the host allocator's tuning is beside the point: the official code as it runs.
  has_flag "--official OFFICIAL" && CMP_ARGS+=(--official=as_is)
  (( DRY_RUN )) && has_flag --roofline && CMP_ARGS+=(--no-roofline)
  for k in "${KS[@]}"; do
    if [[ -n "$OFFICIAL_SKIP" ]]; then
      echo "{\"stage\": \"official_k$k\", \"skipped\": $("$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$OFFICIAL_SKIP")}" >> "$WORK/stages.jsonl"
      echo "[$(elapsed)s] official_k$k: skipped: $OFFICIAL_SKIP" >&2
      continue
    fi
    run_stage "official_k${k}" 90 "$PYTHON" "$REPO/benchmarks/compare_official.py" \
        "${OFFICIAL_ARGS[@]}" --k="$k" --batch_size="$BATCH" "${CMP_ARGS[@]}" --json
    assemble
  done
  assemble

  echo "[$(elapsed)s] wrote $OUT_FILE" >&2
  "$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT_FILE"
}

main; exit "$?"
