"""Runs end to end through the library: every experiment trains from a `RunConfig` and
`mmvae_jax.load_run` gives back its model and parameters; run.json errors are one line."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mmvae_jax
from mmvae_jax import experiments, models, runs
from mmvae_jax.config import SCHEMA, RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(k=2, batch_size=4, max_steps=2, checkpoint_every=1, log_every=1, eval_batches=1,
            figures=False, partners=1, latent_dim=4)


def _digits_npz(path, shape, n=12, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split in ("train", "test"):
    arrays[f"x_{split}"] = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    arrays[f"y_{split}"] = np.arange(n) % 3
  np.savez(path, **arrays)
  return str(path)


def _captions_npz(path, images=8):
  words = ["a", "small", "bird", "with", "red", "wings", "and", "black", "head", "tail"]
  rng = np.random.default_rng(0)
  caps = [" ".join(rng.choice(words, size=6)) + " ." for _ in range(images * 10)]
  np.savez(path, captions=np.array(caps), class_id=np.repeat(np.arange(images) % 2 + 1, 10))
  return str(path)


def _config(name, model, tmp_path):
  exp = experiments.get(name)
  if name == "cub":
    return exp.config(model=model, **TINY, options={
        "captions": _captions_npz(tmp_path / "caps.npz"), "synthetic_features": True,
        "heldout_fraction": 0.25, "bn_batches": 1, "report_num": 4, "num_examples": 1})
  shapes = {"mnist": (28, 28, 1), "svhn": (32, 32, 3), "usps_colour": (32, 32, 3),
            "usps": (16, 16, 1)}
  sources = {n: _digits_npz(tmp_path / f"{n}.npz", shapes[n], seed=i)
             for i, n in enumerate(exp.modalities)}
  return exp.config(model=model, sources=sources, **TINY)


@pytest.mark.parametrize("name,model,cls", [
    ("three_digits", "mmvae", "MMVAE"), ("mnist_svhn", "mopoe", "MoPoE"),
    pytest.param("cub", "mvae", "MVAE", marks=pytest.mark.slow)])  # 35 s; CUB: tests/test_cub.py
def test_train_then_load_run(name, model, cls, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = _config(name, model, tmp_path)
  runs.train_run(config, workdir, devices=jax.devices()[:1], progress=False)
  info = json.load(open(os.path.join(workdir, "run.json")))
  assert info["schema"] == SCHEMA and info["experiment"] == name and info["model"] == model
  assert RunConfig.from_dict(info["config"]) == config  # the whole config, as trained
  run = mmvae_jax.load_run(workdir)
  assert type(run.model).__name__ == cls and run.model.names == experiments.get(name).modalities
  assert run.step == 2 and run.config == config and repr(run.model).startswith(cls)
  trained = jax.tree.leaves(run.params)
  earlier = mmvae_jax.load_run(workdir, step=1)
  assert earlier.step == 1 and len(jax.tree.leaves(earlier.params)) == len(trained)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(earlier.params), trained))
  with pytest.raises(runs.RunError, match="no checkpoint step 9"):
    mmvae_jax.load_run(workdir, step=9)
  if name != "cub":  # (a CUB run has already decoded its test pairs in its report)
    xs, _ = run.data().test.gather(np.arange(2))
    gen = run.model.cross_generate(run.eval_params(), {run.model.names[0]: xs[0]},
                                   jax.random.key(0), 1)
    assert set(gen) == set(run.model.names)
  else:
    assert os.path.exists(os.path.join(workdir, "report.json"))


def test_single_modality_models_read_one_modality(tmp_path):
  config = _config("mnist_svhn", "vae_svhn", tmp_path)
  exp = experiments.get("mnist_svhn")
  assert exp.used_modalities(config) == ("svhn",)
  data = exp.build_data(config)
  model = exp.build_model(config, data)
  assert model.names == ("svhn",) and model.modalities[0].llik_scale == 1.0
  with pytest.raises(ValueError, match="choose one of mmvae, mvae, mopoe, mmvae_plus, vae_mnist, vae_svhn"):
    models.used_modalities("vae_cifar", exp.modalities)


@pytest.mark.parametrize("content,needle", [
    (None, "run.json not found"),
    ("{not json", "cannot read"),
    ('{"model": "mmvae", "config": {}}', "schema 1"),
    (json.dumps({"schema": SCHEMA, "config": {"experiment": "nope"}}), "unknown experiment 'nope'"),
    (json.dumps({"schema": SCHEMA, "config": {"k": 3, "bogus": 1}}), "unknown config entries"),
])
def test_load_run_errors_are_one_line(content, needle, tmp_path):
  if content is not None:
    (tmp_path / "run.json").write_text(content)
  with pytest.raises(runs.RunError, match=needle) as e:
    mmvae_jax.load_run(str(tmp_path))
  assert "\n" not in str(e.value)


def test_script_lists_registered_models_on_a_bad_choice(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "mnist_svhn.py"),
                         f"--workdir={tmp_path}", "--model=nope"],
                        capture_output=True, text=True, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "mopoe" in lines[0] and "vae_svhn" in lines[0]
  assert not os.path.exists(tmp_path / "run.json")
