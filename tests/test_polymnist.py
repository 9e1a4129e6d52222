"""PolyMNIST from its distributed folder layout, on a tiny fixture written here (never downloaded):
train/ and test/, each with m0 ... m4 folders of 28×28 RGB <index>.<label>.png files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmvae_jax import experiments, runs
from mmvae_jax.data import polymnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 5


def write_polymnist(root, n_train=12, n_test=6, seed=0, modalities=M):
  """A PolyMNIST folder: tuple t of a split has label t % 3 and, in modality m, a flat image of
  value 20·m + label (every channel), so alignment and labels can be read back from pixels.
  Files are written in a different order in each modality folder."""
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("test", n_test)):
    counts = {}
    tuples = []
    for t in range(n):
      label = t % 3
      index = counts.get(label, 0)
      counts[label] = index + 1
      tuples.append((index, label))
    for m in range(modalities):
      folder = os.path.join(root, split, f"m{m}")
      os.makedirs(folder, exist_ok=True)
      for t in rng.permutation(n):
        index, label = tuples[t]
        img = np.full((28, 28, 3), 20 * m + label, np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{index}.{label}.png"))
  return str(root)


def test_load_split_aligns_tuples_by_file_name(tmp_path):
  root = write_polymnist(tmp_path / "PolyMNIST")
  assert polymnist.modality_folders(root) == [f"m{i}" for i in range(M)]
  srcs = polymnist.load_split(root, "train")
  assert [s.name for s in srcs] == [f"polymnist_m{i}" for i in range(M)]
  assert all(s.image_shape == (28, 28, 3) and len(s) == 12 for s in srcs)
  # Tuple order: by label, then index; every modality's row i is the same tuple.
  np.testing.assert_array_equal(srcs[0].labels, np.repeat([0, 1, 2], 4))
  for m, s in enumerate(srcs):
    np.testing.assert_array_equal(s.images[:, 0, 0, 0], 20 * m + s.labels)
  data = polymnist.AlignedDataset(srcs)
  xs, y = data.gather([0, 5, 11])
  assert len(data) == 12 and [x.shape for x in xs] == [(3, 28, 28, 3)] * M
  np.testing.assert_array_equal(y, [0, 1, 2])
  np.testing.assert_allclose(xs[3][:, 0, 0, 0], (60 + y) / 255.0, rtol=1e-6)
  assert len(polymnist.load_split(root, "test", ["m1", "m4"], limit=4)[1]) == 4


@pytest.mark.parametrize("damage, message", [
    ("nothing", "not found"),
    ("no_test", "test: missing"),
    ("bad_name", "not a PolyMNIST image name"),
    ("missing_tuple", "not in every modality folder"),
    ("gap", "do not run m0"),
])
def test_malformed_folders_are_one_line_errors(tmp_path, damage, message):
  root = tmp_path / "PolyMNIST"
  if damage != "nothing":
    write_polymnist(root, n_train=3, n_test=3)
  if damage == "no_test":
    for m in range(M):
      for f in os.listdir(root / "test" / f"m{m}"):
        os.remove(root / "test" / f"m{m}" / f)
      os.rmdir(root / "test" / f"m{m}")
    os.rmdir(root / "test")
  elif damage == "bad_name":
    (root / "train" / "m2" / "x.png").write_bytes(b"")
  elif damage == "missing_tuple":
    os.remove(root / "train" / "m3" / "0.1.png")
  elif damage == "gap":
    os.rename(root / "train" / "m4", root / "train" / "m7")
  with pytest.raises(ValueError, match=message) as err:
    for split in ("train", "test"):
      polymnist.load_split(str(root), split)
  assert "\n" not in str(err.value)


def test_script_fails_in_one_line_on_a_missing_folder(tmp_path):
  res = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "polymnist.py"),
       f"--data_dir={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'run'}", "--max_steps=1"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert res.returncode == 2, res.stderr
  # One line of ours, the last (XLA's C++ start-up lines may precede it on some machines).
  ours = [l for l in res.stderr.splitlines() if l.startswith("polymnist.py:")]
  assert len(ours) == 1 and res.stderr.strip().splitlines()[-1] == ours[0], res.stderr
  assert "error:" in ours[0] and "nowhere" in ours[0] and "not found" in ours[0]
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "run" / "run.json").exists()


def _train(root, wd, model, **kw):
  config = experiments.get("polymnist").config(
      model=model, data_dir=root, k=1, batch_size=4, latent_dim=3, max_steps=1, eval_batches=1,
      figures=False, seed=0, **kw)
  runs.train_run(config, str(wd), progress=False)
  return config


def test_experiment_builds_data_and_models_from_the_fixture(tmp_path):
  root = write_polymnist(tmp_path / "PolyMNIST")
  exp = experiments.get("polymnist")
  config = exp.config(model="mmvae_plus", data_dir=root, latent_dim=3, private_dim=2)
  data = exp.build_data(config)
  assert (len(data.train), len(data.test)) == (12, 6)
  assert data.shapes == {f"m{i}": [28, 28, 3] for i in range(M)}
  assert [s.name for s in data.extras["test_sources"]] == [f"polymnist_m{i}" for i in range(M)]
  model = exp.build_model(config, data)
  assert model.names == tuple(f"m{i}" for i in range(M)) and model.network_latent_dim == 5
  assert all(m.llik_scale == 1.0 for m in model.modalities)
  for name in ("mmvae", "mvae", "mopoe"):
    assert exp.build_model(exp.config(model=name, data_dir=root), data).names == model.names
  with pytest.raises(ValueError, match="needs --data_dir"):
    exp.build_data(exp.config())


@pytest.mark.slow
def test_mmvae_plus_trains_on_the_fixture(tmp_path):
  root = write_polymnist(tmp_path / "PolyMNIST")
  _train(root, tmp_path / "run", "mmvae_plus", private_dim=2)
  info = json.loads((tmp_path / "run" / "run.json").read_text())
  assert info["config"]["experiment"] == "polymnist" and info["config"]["model"] == "mmvae_plus"
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert any("test_objective" in r and np.isfinite(r["test_objective"]) for r in rows)
  import mmvae_jax
  run = mmvae_jax.load_run(str(tmp_path / "run"))
  assert run.model.names == tuple(f"m{i}" for i in range(M))
  assert all(m.llik_scale == 1.0 for m in run.model.modalities)


@pytest.mark.slow
def test_every_model_trains_and_evaluates_on_the_fixture(tmp_path):
  root = write_polymnist(tmp_path / "PolyMNIST", n_train=30, n_test=15)
  for model in ("mmvae", "mvae", "mopoe", "mmvae_plus"):
    wd = tmp_path / model
    _train(root, wd, model)
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "evaluate.py"), f"--workdir={wd}",
         "--parts=classifiers,probe,coherence,figures", "--num_test=8", "--probe_num_train=8",
         "--batch_size=4", "--classifier_epochs=1", "--joint_num=4", "--kl_num=4",
         "--traversal_steps=2", f"--classifier_cache={tmp_path / 'cache'}"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO, capture_output=True, text=True,
        timeout=900)
    assert res.returncode == 0, (model, res.stderr[-3000:])
    out = json.loads((wd / "results.json").read_text())
    assert len(out["table2_coherence"]["cross"]["cross"]) == M * (M - 1)
