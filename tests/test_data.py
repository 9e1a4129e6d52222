"""Tests of mmvae_jax.data: sources, MNIST-SVHN style pairing, sharded prefetched batches."""
import os
import socket
import threading
import time

import jax
import numpy as np
import pytest

from mmvae_jax import parallel
from mmvae_jax.data import (DatasetNotPreparedError, PairedDataset, Source, batches,
                            global_batch_rows, host_batches, load_source, num_batches,
                            pair_by_label, source_from_arrays)

# Standard per-class counts of the datasets (digits 0..9).
MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
SVHN_TRAIN = [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659]
SVHN_TEST = [1744, 5099, 4149, 2882, 2523, 2384, 1977, 2019, 1660, 1595]


def _labels_from_counts(counts, seed):
  """Shuffled (sum(counts),) labels with counts[c] instances of class c."""
  labels = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(seed).permutation(labels)


# ----------------------------------------------------------------------------- pairing

@pytest.mark.parametrize("partners,train,test", [(30, 1_682_040, 300_000), (20, 1_121_360, 200_000)])
def test_pair_counts_from_official_class_counts(partners, train, test):
  tr = pair_by_label([_labels_from_counts(MNIST_TRAIN, 0), _labels_from_counts(SVHN_TRAIN, 1)],
                     partners=partners)
  te = pair_by_label([_labels_from_counts(MNIST_TEST, 2), _labels_from_counts(SVHN_TEST, 3)],
                     partners=partners)
  assert [len(a) for a in tr] == [train, train]
  assert [len(a) for a in te] == [test, test]
  # Every MNIST test image is used, `partners` times; 10,000 of the SVHN test images.
  assert np.all(np.bincount(te[0], minlength=10000) == partners)
  assert len(np.unique(te[1])) == 10000
  # Batches at B = 128, as the official loaders: 13,141 train (last 120), 2,344 test (last 96).
  assert num_batches(train, 128) == (13_141 if partners == 30 else 8_761)
  if partners == 30:
    assert train - 13_140 * 128 == 120 and test - 2_343 * 128 == 96
    assert num_batches(test, 128) == 2_344 and num_batches(test, 128, drop_remainder=True) == 2_343


def test_pairing_is_deterministic_given_seed():
  labels = [_labels_from_counts([50, 70, 40], 0), _labels_from_counts([60, 30, 45], 1)]
  a = pair_by_label(labels, partners=5, seed=7)
  b = pair_by_label(labels, partners=5, seed=7)
  c = pair_by_label(labels, partners=5, seed=8)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert all(x.dtype == np.int64 for x in a)


@pytest.mark.parametrize("m", [2, 3])
def test_pairs_share_labels_and_each_instance_appears_partners_times(m):
  counts = [[40, 25, 33, 0, 12], [18, 50, 33, 9, 12], [30, 30, 5, 4, 40]][:m]
  labels = [_labels_from_counts(c, s) for s, c in enumerate(counts)]
  partners, cap = 4, 30
  idx = pair_by_label(labels, partners=partners, max_per_class=cap, seed=3)
  n_c = np.minimum(np.min(np.array(counts), axis=0), cap)
  assert all(len(i) == partners * n_c.sum() for i in idx)
  pair_labels = [l[i] for l, i in zip(labels, idx)]
  for pl in pair_labels[1:]:
    np.testing.assert_array_equal(pl, pair_labels[0])
  # Classes in sorted order, each a block of partners * n_c pairs.
  np.testing.assert_array_equal(pair_labels[0], np.repeat(np.arange(5), partners * n_c))
  for l, i in zip(labels, idx):
    used, times = np.unique(i, return_counts=True)
    assert np.all(times == partners)
    # The used instances are the first n_c of each class in stable-argsort order.
    order = np.argsort(l, kind="stable")
    expected = np.concatenate([order[l[order] == c][:n_c[c]] for c in range(5)])
    np.testing.assert_array_equal(used, np.sort(expected))


def test_pair_by_label_rejects_bad_labels():
  with pytest.raises(ValueError, match="1-D"):
    pair_by_label([np.zeros((3, 2), int)])
  with pytest.raises(ValueError, match="integers"):
    pair_by_label([np.zeros(3, np.float32)])


# ----------------------------------------------------------------------------- sources

def test_source_from_arrays_conversions():
  u8 = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
  s = source_from_arrays(u8, [0, 1], "grey")
  assert s.images.dtype == np.uint8 and s.images.shape == (2, 4, 4, 1)
  assert s.images.base is not None or s.images is u8  # a view, not a copy
  np.testing.assert_array_equal(s.get([1, 0]), np.stack([u8[1], u8[0]])[..., None] / np.float32(255))
  assert s.get([0]).dtype == np.float32
  pm1 = np.linspace(-1, 1, 2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)
  s = source_from_arrays(pm1, np.array([[3], [4]]), "usps_like")
  assert s.images.dtype == np.float32 and s.images.shape == (2, 16, 16, 1)
  np.testing.assert_allclose(s.images[..., 0], (pm1 + 1) / 2, atol=1e-7)
  assert s.labels.dtype == np.int32 and list(s.labels) == [3, 4]
  nchw = np.zeros((3, 3, 32, 32), np.uint8)
  assert source_from_arrays(nchw, [0, 1, 2], "chw").image_shape == (32, 32, 3)
  svhn = source_from_arrays(np.zeros((3, 32, 32, 3), np.uint8), [10, 1, 9], "my_svhn")
  assert list(svhn.labels) == [0, 1, 9]
  with pytest.raises(ValueError, match=r"\[0, 1\] or \[-1, 1\]"):
    source_from_arrays(np.full((1, 2, 2), 3.0), [0], "bad")
  with pytest.raises(ValueError, match="2 images but 3 labels"):
    source_from_arrays(np.zeros((2, 2, 2), np.uint8), [0, 1, 2], "bad")


@pytest.fixture
def tfds_temp_in_tmp_path(tmp_path_factory, monkeypatch):
  """tfds's mock metadata (DatasetInfo.initialize_from_bucket, offline) makes a tempfile.mkdtemp
  folder it never removes: keep it among pytest's own temporary folders, not in /tmp."""
  import tempfile  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tfds_tempdir")))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("svhn_cropped", (32, 32, 3))])
def test_tfds_mock_data_source(name, shape, tmp_path, tfds_temp_in_tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=37):
    src = load_source(name, "train", data_dir=str(tmp_path))
    test = load_source(name, "test", data_dir=str(tmp_path))
  assert src.name == name and len(src) == 37 and len(test) == 37
  assert src.images.shape == (37,) + shape and src.images.dtype == np.uint8
  assert src.labels.shape == (37,) and src.labels.dtype == np.int32
  assert src.labels.min() >= 0 and src.labels.max() <= 9
  x = src.get(np.arange(5))
  assert x.dtype == np.float32 and x.shape == (5,) + shape and 0 <= x.min() and x.max() <= 1
  assert os.listdir(tmp_path) == []  # nothing written


def test_tfds_mock_pairs_and_batches(tmp_path, tfds_temp_in_tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=40):
    srcs = [load_source("mnist", "train", data_dir=str(tmp_path)),
            load_source("svhn_cropped", "train", data_dir=str(tmp_path))]
  data = PairedDataset(srcs, partners=3, seed=0)
  mesh = parallel.data_mesh()
  b = next(iter(batches(data, 8, mesh, seed=0, epoch=0)))
  assert b["x"][0].shape == (8, 28, 28, 1) and b["x"][1].shape == (8, 32, 32, 3)


def test_npz_sources(shared_data):
  mnist = load_source(str(shared_data / "mnist.npz"), "train")
  assert mnist.images.shape == (60000, 28, 28, 1) and mnist.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(mnist.labels), MNIST_TRAIN)
  assert len(load_source(str(shared_data / "mnist.npz"), "test")) == 10000
  colour = load_source(str(shared_data / "usps_colour.npz"), "test")
  assert colour.images.shape == (2007, 32, 32, 3) and colour.images.dtype == np.uint8
  assert colour.name == "usps_colour"
  usps = load_source(str(shared_data / "usps.npz"), "train")
  assert usps.images.shape == (7291, 16, 16, 1) and usps.images.dtype == np.float32
  assert usps.images.min() == 0 and usps.images.max() == 1
  raw = np.load(shared_data / "usps.npz")["x_train"][:4]
  np.testing.assert_allclose(usps.get(np.arange(4))[..., 0], (raw + 1) / 2, atol=1e-7)
  data = PairedDataset([mnist, usps], partners=30)
  n_c = np.minimum(MNIST_TRAIN, np.bincount(usps.labels))
  assert len(data) == 30 * n_c.sum()
  np.testing.assert_array_equal(mnist.labels[data.indices[0]], usps.labels[data.indices[1]])


# ----------------------------------------------------------------------------- errors

def test_unprepared_tfds_dataset_fails_at_once_in_one_line(tmp_path, monkeypatch,
                                                          tfds_temp_in_tmp_path):
  def no_network(*args, **kwargs):
    raise AssertionError("network access attempted")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  start = time.perf_counter()
  with pytest.raises(DatasetNotPreparedError) as info:
    load_source("mnist", "train", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5
  msg = str(info.value)
  assert "\n" not in msg
  for part in ("'mnist'", str(tmp_path), "tfds build mnist", "--file_format=array_record",
               "--data_dir", ".npz", "x_train, y_train, x_test, y_test"):
    assert part in msg, part
  assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RuntimeError)
  assert os.listdir(tmp_path) == []  # no partial files


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="neither a registered tfds dataset"):
    load_source("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
  missing = tmp_path / "missing.npz"
  with pytest.raises(FileNotFoundError, match="missing.npz: no such .npz file"):
    load_source(str(missing), "train")
  keys = tmp_path / "keys.npz"
  np.savez(keys, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
  with pytest.raises(ValueError, match=r"keys.npz: missing key\(s\) x_test, y_test") as info:
    load_source(str(keys), "train")
  assert "\n" not in str(info.value)
  mismatch = tmp_path / "mismatch.npz"
  np.savez(mismatch, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.zeros(2, np.int64),
           x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.zeros(1, np.int64))
  with pytest.raises(ValueError, match="mismatch.npz.*one label per image"):
    load_source(str(mismatch), "train")
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    load_source(str(mismatch), "validation")
  shape = tmp_path / "shape.npz"
  np.savez(shape, x_train=np.zeros((2, 4), np.uint8), y_train=np.zeros(2, np.int64),
           x_test=np.zeros((1, 4), np.uint8), y_test=np.zeros(1, np.int64))
  with pytest.raises(ValueError, match=r"shape.npz.*\(N, H, W\)"):
    load_source(str(shape), "test")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="garbage.npz: not a readable .npz"):
    load_source(str(garbage), "train")


# ----------------------------------------------------------------------------- batches

def _index_source(n, hw, channels, name, classes=5):
  """Source whose image i encodes i in two uint8 pixels (hi, lo); labels i % classes."""
  images = np.zeros((n,) + hw + (channels,), np.uint8)
  flat = images.reshape(n, -1)
  flat[:, 0], flat[:, 1] = np.arange(n) // 256, np.arange(n) % 256
  return Source(images=images, labels=(np.arange(n) % classes).astype(np.int32), name=name)


def _decode(x):
  """(B, H, W, C) float32 from `_index_source` -> (B,) source indices."""
  flat = np.round(np.asarray(x).reshape(x.shape[0], -1)[:, :2] * 255).astype(np.int64)
  return flat[:, 0] * 256 + flat[:, 1]


@pytest.fixture(scope="module")
def paired():
  """3 modalities, 3 * 5 * 21 = 315 pairs (not a multiple of 8: the last batch is partial)."""
  srcs = [_index_source(105, (4, 4), 1, "a"), _index_source(130, (6, 6), 3, "b"),
          _index_source(300, (2, 2), 1, "c")]
  return PairedDataset(srcs, partners=3, seed=1)


def _epoch(data, mesh, **kw):
  kw.setdefault("seed", 5)
  kw.setdefault("epoch", 0)
  return [jax.tree.map(np.asarray, b) for b in batches(data, 8, mesh, **kw)]


def test_batch_shapes_and_sharding(paired):
  mesh = parallel.data_mesh()
  assert mesh.devices.size == 4
  it = batches(paired, 8, mesh, seed=0, epoch=0)
  assert it.num_batches == num_batches(315, 8) == 40 and len(it) == 40
  b = next(it)
  it.close()
  shapes = [(8, 4, 4, 1), (8, 6, 6, 3), (8, 2, 2, 1)]
  for x, shape in zip(b["x"], shapes):
    assert isinstance(x, jax.Array) and x.shape == shape and x.dtype == np.float32
    assert x.sharding == parallel.batch_sharding(mesh)
    assert [s.data.shape for s in x.addressable_shards] == [(2,) + shape[1:]] * 4
  assert b["y"].dtype == np.int32 and b["y"].shape == (8,)
  assert b["mask"].dtype == np.float32 and b["mask"].sharding == parallel.batch_sharding(mesh)


def test_epoch_visits_every_pair_once_and_pads_last_batch(paired):
  got = _epoch(paired, parallel.data_mesh())
  assert len(got) == 40
  mask = np.concatenate([b["mask"] for b in got])
  assert mask.sum() == 315 and np.all(mask[:315] == 1) and np.all(mask[315:] == 0)
  last = got[-1]
  assert list(last["mask"]) == [1, 1, 1, 0, 0, 0, 0, 0]
  # Padding rows repeat a valid pair (the first real row of the batch).
  for x in last["x"]:
    assert np.all(x[3:] == x[0])
  keep = mask == 1
  idx = [_decode(np.concatenate([b["x"][m] for b in got]))[keep] for m in range(3)]
  got_pairs = sorted(zip(*idx))
  want_pairs = sorted(zip(*paired.indices.tolist()))
  assert got_pairs == want_pairs  # nothing lost, nothing repeated
  y = np.concatenate([b["y"] for b in got])[keep]
  for m, src in enumerate(paired.sources):
    np.testing.assert_array_equal(src.labels[idx[m]], y)


def test_drop_remainder(paired):
  got = _epoch(paired, parallel.data_mesh(), drop_remainder=True)
  assert len(got) == 39 == num_batches(315, 8, drop_remainder=True)
  assert all(np.all(b["mask"] == 1) for b in got)


def test_same_batches_on_one_device_and_seeded_epochs(paired):
  four = _epoch(paired, parallel.data_mesh(), epoch=2)
  one = _epoch(paired, parallel.data_mesh(jax.devices()[:1]), epoch=2, prefetch=0)
  for a, b in zip(four, one):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  other = _epoch(paired, parallel.data_mesh(), epoch=3)
  assert not np.array_equal(four[0]["x"][0], other[0]["x"][0])
  unshuffled = _epoch(paired, parallel.data_mesh(), shuffle=False)
  np.testing.assert_array_equal(_decode(unshuffled[0]["x"][1]), paired.indices[1, :8])


def test_resume_from_epoch_and_step(paired):
  mesh = parallel.data_mesh()
  full = _epoch(paired, mesh, epoch=1)
  it = batches(paired, 8, mesh, seed=5, epoch=1, start_step=37)
  assert it.step == 37 and len(it) == 3
  tail = [jax.tree.map(np.asarray, b) for b in it]
  assert len(tail) == 3 and it.step == 40
  for a, b in zip(full[37:], tail):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert list(batches(paired, 8, mesh, seed=5, epoch=1, start_step=40)) == []
  with pytest.raises(ValueError, match="start_step 41"):
    batches(paired, 8, mesh, seed=5, epoch=1, start_step=41)


@pytest.mark.parametrize("process_count", [2, 4])
def test_faked_processes_share_each_global_batch(paired, process_count):
  kw = dict(seed=9, epoch=4)
  whole = list(host_batches(paired, 16, **kw))
  shares = [list(host_batches(paired, 16, process_index=p, process_count=process_count, **kw))
            for p in range(process_count)]
  assert all(len(s) == len(whole) == 20 for s in shares)
  for step, full in enumerate(whole):
    parts = [s[step] for s in shares]
    assert all(len(p["rows"]) == 16 // process_count for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["rows"] for p in parts]), full["rows"])
    np.testing.assert_array_equal(np.concatenate([p["mask"] for p in parts]), full["mask"])
    for m in range(3):
      np.testing.assert_array_equal(np.concatenate([p["x"][m] for p in parts]), full["x"][m])
  rows = np.concatenate([b["rows"][b["mask"] == 1] for b in whole])
  np.testing.assert_array_equal(np.sort(rows), np.arange(315))
  # On this single-process mesh a faked second process cannot place its rows.
  with pytest.raises(ValueError, match="devices hold rows"):
    batches(paired, 16, parallel.data_mesh(), process_index=1, process_count=process_count, **kw)


def test_global_batch_rows_padding():
  rows, mask = global_batch_rows(np.array([5, 3, 9, 1, 7]), 1, 4)
  assert list(rows) == [7, 7, 7, 7] and list(mask) == [1, 0, 0, 0]


def test_batch_size_must_split_over_devices(paired):
  with pytest.raises(ValueError, match="does not split evenly over 4 devices"):
    batches(paired, 6, parallel.data_mesh(), seed=0, epoch=0)


def test_prefetch_thread_errors_and_shutdown(paired, monkeypatch):
  mesh = parallel.data_mesh()
  baseline = {t.ident for t in threading.enumerate()}
  it = batches(paired, 8, mesh, seed=0, epoch=0, prefetch=2)
  next(it)
  it.close()
  assert list(it) == []
  assert {t.ident for t in threading.enumerate() if t.is_alive()} <= baseline

  calls = {"n": 0}
  original = PairedDataset.gather

  def failing(self, rows):
    calls["n"] += 1
    if calls["n"] == 3:
      raise RuntimeError("disk on fire")
    return original(self, rows)
  monkeypatch.setattr(PairedDataset, "gather", failing)
  with batches(paired, 8, mesh, seed=0, epoch=0, prefetch=2) as it:
    next(it), next(it)
    with pytest.raises(RuntimeError, match="disk on fire"):
      next(it)
  assert {t.ident for t in threading.enumerate() if t.is_alive()} <= baseline
