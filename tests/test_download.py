"""Downloading and preparing tfds datasets (`mmvae_jax.data.download`, the scripts' --download):
a local HTTP server on 127.0.0.1 serves MNIST in its original IDX/gzip files, rebuilt from the
real arrays, as a mirror; no test reaches the internet."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from absl import flags

from mmvae_jax import cli
from mmvae_jax.data import download, load_source, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNROUTABLE = "http://192.0.2.1:9"  # TEST-NET-1 (RFC 5737): never routed
# Examples written per split by the end-to-end test (tfds encodes every image as a PNG: the
# whole of MNIST takes about a minute on 2 cores, this a few seconds).
MAX_EXAMPLES = 300
TINY_RUN = ["--k=1", "--batch_size=4", "--latent_dim=4", "--eval_batches=1", "--nofigures",
            "--huge_pages=never"]
has_tensorflow = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                    reason="preparing a tfds dataset needs TensorFlow "
                                           "(pip install -e \".[data]\")")


class _Server(http.server.ThreadingHTTPServer):
  """Serves a folder; counts every connection (a bare probe included) and logs each GET."""
  daemon_threads = True

  def __init__(self, folder):
    handler = functools.partial(_Handler, directory=str(folder))
    super().__init__(("127.0.0.1", 0), handler)
    self.connections, self.paths = 0, []

  def process_request(self, request, client_address):
    self.connections += 1
    super().process_request(request, client_address)

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.SimpleHTTPRequestHandler):
  def do_GET(self):  # noqa: N802 (http.server's name)
    self.server.paths.append(self.path)
    super().do_GET()

  def log_message(self, *args):  # quiet
    pass

  def handle(self):
    try:
      super().handle()
    except OSError:  # a probe that connects and closes at once
      pass


@contextlib.contextmanager
def serving(folder):
  server = _Server(folder)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()


def _closed_port_url():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{s.getsockname()[1]}"


def _write_idx_gz(path, array, magic):
  """An IDX file (big-endian magic, dimensions, uint8 data), gzipped: MNIST's own format."""
  with gzip.open(path, "wb", compresslevel=1) as f:
    f.write(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def mnist_mirror(shared_data, tmp_path_factory):
  """(mirror folder with mnist/<the four files>, checksums.tsv for them under tfds's registered
  URLs, the arrays). The builder reads all 60,000 / 10,000 examples, so the files are whole."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("mirror")
  (folder / "mnist").mkdir()
  arrays = dict(np.load(shared_data / "mnist.npz"))
  for split, stem in (("train", "train"), ("test", "t10k")):
    _write_idx_gz(folder / "mnist" / f"{stem}-images-idx3-ubyte.gz", arrays[f"x_{split}"], 2051)
    _write_idx_gz(folder / "mnist" / f"{stem}-labels-idx1-ubyte.gz", arrays[f"y_{split}"], 2049)
  lines = []
  for url, info in type(tfds.builder("mnist")).url_infos.items():
    data = (folder / "mnist" / info.filename).read_bytes()
    lines.append(f"{url}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\t{info.filename}")
  checksums = folder / "checksums.tsv"
  checksums.write_text("\n".join(lines) + "\n")
  return folder, checksums, arrays


def _leftovers(root):
  """Partial or temporary files and folders under `root`."""
  return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
          if n.endswith(download.PART_SUFFIX) or "incomplete" in n or ".tmp." in n]


def _script(args, env=None, timeout=300, script="mnist_svhn.py"):
  start = time.monotonic()
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *args],
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})
  return proc, time.monotonic() - start


# ----------------------------------------------------------------------------- end to end

@has_tensorflow
def test_script_downloads_prepares_trains_and_never_fetches_again(mnist_mirror, tmp_path,
                                                                  monkeypatch):
  folder, checksums, arrays = mnist_mirror
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  env = {download.CHECKSUMS_ENV: str(checksums), download.MAX_EXAMPLES_ENV: str(MAX_EXAMPLES)}
  with serving(folder) as server:
    # The main script, MNIST from tfds (a single-modality model: the MNIST MLP compiles fast).
    proc, _ = _script([f"--data_dir={data_dir}", f"--workdir={workdir}", "--model=vae_mnist",
                       "--max_steps=2", f"--download_mirror={server.url}", *TINY_RUN], env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(server.paths) == sorted(f"/mnist/{n}" for n in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    assert "downloading tfds 'mnist'" in proc.stderr and "prepared tfds 'mnist'" in proc.stderr
    steps = [json.loads(line).get("step") for line in open(workdir / "metrics.jsonl")]
    assert 2 in steps
    # Prepared once, in the format the readers use; the raw files and temporaries are gone.
    assert sorted(os.listdir(data_dir)) == ["mnist"]
    assert _leftovers(data_dir) == []
    files = os.listdir(data_dir / "mnist" / "3.0.1")
    assert any(".array_record" in f for f in files) and "dataset_info.json" in files
    connections = server.connections

    # Prepared: never fetched again, not even a connection (the scripts call the same function).
    def no_network(*args, **kwargs):
      raise AssertionError("network access attempted")
    monkeypatch.setenv(download.CHECKSUMS_ENV, str(checksums))
    with monkeypatch.context() as m:
      m.setattr(socket, "create_connection", no_network)
      m.setattr(socket.socket, "connect", no_network)
      assert download.ensure_prepared(["mnist"], str(data_dir), mirror=server.url) == []
      train = load_source("mnist", "train", data_dir=str(data_dir))
    assert server.connections == connections
  assert len(train) == MAX_EXAMPLES and train.image_shape == (28, 28, 1)
  # The examples are the served ones, decoded exactly (tfds stores them shuffled).
  served = {(x.tobytes(), int(y)) for x, y in zip(arrays["x_train"][:MAX_EXAMPLES],
                                                  arrays["y_train"][:MAX_EXAMPLES])}
  assert {(x[..., 0].tobytes(), int(y)) for x, y in zip(train.images, train.labels)} == served


# ----------------------------------------------------------------------------- offline

@pytest.mark.parametrize("script,args", [
    ("mnist_svhn.py", []),
    ("three_digits.py", ["--mnist=mnist", "--model=vae_mnist"]),  # any script, any tfds source
])
def test_script_offline_fails_fast_in_one_line_without_files(script, args, tmp_path):
  data_dir = tmp_path / "tfds"
  proc, seconds = _script([f"--data_dir={data_dir}", f"--workdir={tmp_path / 'run'}",
                           f"--download_mirror={UNROUTABLE}", "--huge_pages=never", *args],
                          script=script)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith(f"{script}: error: tfds dataset 'mnist' is "
                                                 "not prepared"), proc.stderr
  if importlib.util.find_spec("tensorflow") is not None:
    assert "192.0.2.1:9 unreachable" in lines[-1]
  else:
    assert "needs TensorFlow" in lines[-1]
  for remedy in ("tfds build mnist", "--data_dir", ".npz"):
    assert remedy in lines[-1]
  assert not os.path.exists(data_dir) and not os.path.exists(tmp_path / "run")
  assert seconds < 60  # the interpreter and imports included; the probe itself: below


def test_offline_probe_fails_within_seconds_and_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "tensorflow_available", lambda: True)
  start = time.monotonic()
  with pytest.raises(sources.DatasetNotPreparedError) as info:
    download.ensure_prepared(["mnist", "svhn_cropped"], str(tmp_path / "tfds"),
                             mirror=UNROUTABLE, probe_timeout=1.0)
  assert time.monotonic() - start < 4
  msg = str(info.value)
  assert "\n" not in msg and "192.0.2.1:9 unreachable" in msg and "tfds build mnist" in msg
  assert os.listdir(tmp_path) == []


def test_download_never_touches_the_network(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("network access attempted")
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  values = flags.FlagValues()
  cli.define_download_flags(values)
  values(["prog", "--download=never", f"--download_mirror={UNROUTABLE}"])
  from mmvae_jax import experiments
  exp = experiments.get("mnist_svhn")
  cli.prepare_data("prog", exp, exp.config(data_dir=str(tmp_path)), flag_values=values)
  assert exp.tfds_datasets(exp.config()) == ("mnist", "svhn_cropped")
  assert exp.tfds_datasets(exp.config(sources={"svhn": "usps_colour.npz"}, model="mmvae")) == (
      "mnist",)
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- pieces

def test_fetch_checks_size_and_checksum_and_keeps_no_partial_file(tmp_path):
  served = tmp_path / "served"
  (served / "ds").mkdir(parents=True)
  payload = os.urandom(3000)
  (served / "ds" / "a.bin").write_bytes(payload)
  dest = tmp_path / "got" / "a.bin"
  dest.parent.mkdir()
  good = hashlib.sha256(payload).hexdigest()
  with serving(served) as server:
    url = download._mirror_url(server.url, "ds", "a.bin")  # pylint: disable=protected-access
    wrong = download.RemoteFile("u", url, 3000, "0" * 64, "a.bin")
    with pytest.raises(download.DownloadError, match="expected 3,000 bytes") as info:
      download.fetch(wrong, str(dest))
    assert "\n" not in str(info.value) and os.listdir(dest.parent) == []
    missing = download.RemoteFile("u", url.replace("a.bin", "b.bin"), 1, good, "b.bin")
    with pytest.raises(download.DownloadError, match="HTTP 404"):
      download.fetch(missing, str(tmp_path / "got" / "b.bin"))
    assert os.listdir(dest.parent) == []
    download.fetch(download.RemoteFile("u", url, 3000, good, "a.bin"), str(dest))
    assert dest.read_bytes() == payload and server.paths == ["/ds/a.bin", "/ds/b.bin", "/ds/a.bin"]
    download.fetch(download.RemoteFile("u", url, 3000, good, "a.bin"), str(dest))
    assert len(server.paths) == 3  # a complete file is not fetched again
  with pytest.raises(download.DownloadError, match="failed"):
    download.fetch(download.RemoteFile("u", _closed_port_url() + "/c", 1, good, "c"),
                   str(tmp_path / "got" / "c"))
  assert os.listdir(dest.parent) == ["a.bin"]
  # A mirror may be a local folder (file://), which needs no network.
  local = download._mirror_url(served.as_uri(), "ds", "a.bin")  # pylint: disable=protected-access
  assert download.probe_target(local) is None
  download.fetch(download.RemoteFile("u", local, 3000, good, "a.bin"), str(tmp_path / "a2.bin"))
  assert (tmp_path / "a2.bin").read_bytes() == payload
  # Part files of a killed fetch are removed once stale; a fresh one (a fetch elsewhere) stays.
  stale, fresh = (dest.parent / f"x.{i}{download.PART_SUFFIX}" for i in (1, 2))
  stale.write_bytes(b"1")
  fresh.write_bytes(b"2")
  os.utime(stale, (time.time() - 3600, time.time() - 3600))
  download._remove_stale_parts(str(dest.parent))  # pylint: disable=protected-access
  assert sorted(os.listdir(dest.parent)) == ["a.bin", fresh.name]


def test_probe_targets_follow_proxies(monkeypatch):
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
    monkeypatch.delenv(var, raising=False)
  assert download.probe_target("https://storage.googleapis.com/a/b.gz") == (
      "storage.googleapis.com", 443)
  assert download.probe_target("http://ufldl.stanford.edu/x.mat") == ("ufldl.stanford.edu", 80)
  assert download.probe_target("file:///data/mirror/mnist/a.gz") is None
  monkeypatch.setenv("https_proxy", "http://proxy.lab:3128")
  assert download.probe_target("https://storage.googleapis.com/a") == ("proxy.lab", 3128)
  monkeypatch.setenv("no_proxy", "storage.googleapis.com")
  assert download.probe_target("https://storage.googleapis.com/a") == (
      "storage.googleapis.com", 443)
  with serving(os.getcwd()) as server:
    port = server.server_address[1]
    assert download.unreachable([("127.0.0.1", port)], timeout=2) == {}
  closed = int(_closed_port_url().rsplit(":", 1)[1])
  assert ("127.0.0.1", closed) in download.unreachable([("127.0.0.1", closed)], timeout=2)


@has_tensorflow
def test_tfp_does_not_import_tensorflow_for_distrax():
  import mmvae_jax.distributions  # noqa: F401  (imports distrax, hence tfp's JAX substrate)
  from tensorflow_probability.python.internal.backend.jax import _utils
  assert _utils.can_copy_docstring is False  # its `import tensorflow` was refused


def test_remote_files_are_tfds_registered_ones(tmp_path, monkeypatch):
  """What the main job downloads (the sizes the README gives) and where a mirror puts it."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv(download.CHECKSUMS_ENV, raising=False)
  mnist = tfds.builder("mnist", data_dir=str(tmp_path))
  files = download.remote_files(mnist, "mnist")
  assert [f.filename for f in files] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                                         "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
  assert sum(f.size for f in files) == 11_594_722
  assert all(f.fetch_url == f.url and f.url.startswith("https://storage.googleapis.com/")
             for f in files)
  svhn = download.remote_files(tfds.builder("svhn_cropped", data_dir=str(tmp_path)), "svhn_cropped")
  assert {f.filename: f.size for f in svhn} == {"extra_32x32.mat": 1_329_278_602,
                                                "test_32x32.mat": 64_275_384,
                                                "train_32x32.mat": 182_040_794}
  mirrored = download.remote_files(mnist, "mnist", mirror="http://mirror.lab/tfds/")
  assert mirrored[0].fetch_url == "http://mirror.lab/tfds/mnist/t10k-images-idx3-ubyte.gz"
  assert [(f.url, f.size, f.sha256) for f in mirrored] == [(f.url, f.size, f.sha256) for f in files]
  # The documented replacement of checksums, for tfds too while preparing, and only then.
  (tmp_path / "sums.tsv").write_text(f"{files[0].url}\t12\t{'ab' * 32}\t{files[0].filename}\n")
  monkeypatch.setenv(download.CHECKSUMS_ENV, str(tmp_path / "sums.tsv"))
  replaced = download.remote_files(mnist, "mnist")
  assert (replaced[0].size, replaced[0].sha256) == (12, "ab" * 32) and replaced[1:] == files[1:]
  registered = type(mnist).url_infos
  with download._expected_by_tfds(mnist, replaced):  # pylint: disable=protected-access
    assert (registered[files[0].url].size, registered[files[0].url].checksum) == (12, "ab" * 32)
  assert int(registered[files[0].url].size) == files[0].size
  assert os.listdir(tmp_path) == ["sums.tsv"]
