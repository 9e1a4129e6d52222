"""benchmarks/device_check.sh: its command line, and the wheels it carries against setup.cfg."""
import configparser
import pathlib
import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("args,needle", [
    (["--no_such_flag"], "unknown argument '--no_such_flag'"),
    (["--budget_s=5"], "--budget_s must be a whole number of seconds >= 60"),
    (["--budget_s=ten"], "--budget_s must be a whole number of seconds >= 60"),
])
def test_bad_arguments_one_line_exit_2(args, needle, tmp_path):
  proc = subprocess.run(["bash", str(SCRIPT), f"--out={tmp_path}/x.json"] + args,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("device_check.sh: error: "), proc.stderr
  assert needle in lines[0]
  assert not (tmp_path / "x.json").exists()


def _pins(path):
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line).groups()
      pins[canonicalize_name(name)] = version
  return pins


def test_carried_wheels_satisfy_the_package_requirements():
  """Every wheel the device check installs is a version setup.cfg accepts (tfp-nightly: the
  very build it pins), each listed once."""
  pins = _pins(REPO / "benchmarks" / "device_wheels.txt")
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  requirements = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n")
                  if r.strip()]
  checked = 0
  for req in requirements:
    name = canonicalize_name(req.name)
    if name in pins:
      assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
      checked += 1
  assert checked >= 5, "distrax, tfp-nightly, tensorflow-datasets, tensorboardX, tqdm at least"
  assert {"distrax", "tfp-nightly", "tensorflow-datasets", "tensorboardx"} <= set(pins)
