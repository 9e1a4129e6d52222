"""Fetching and preparing tfds datasets on a connected machine (the scripts' ``--download=auto``).

`ensure_prepared(["mnist", "svhn_cropped"], data_dir)` leaves each dataset prepared in the
array_record format under ``data_dir`` (default: tfds's, ``~/tensorflow_datasets``), the format
`mmvae_jax.data.load_tfds` reads without TensorFlow:

1. A dataset already prepared there is read as it is: nothing touches the network.
2. Otherwise its files are those of tfds's registered checksums (URL, size, SHA-256, file
   name). Before anything is written, one TCP connection to each download host (or to the
   proxy that `http_proxy` / `https_proxy` name for it) must open within `PROBE_TIMEOUT_S`
   seconds; an offline machine fails there, in a few seconds, with one line
   (`DatasetNotPreparedError`) naming the remedies, and nothing is written.
3. Each file is fetched (a progress bar on a terminal), its size and SHA-256 checked against the
   registered ones, and only then moved into ``<data_dir>/downloads/mmvae_jax/<dataset>/``;
   a file being fetched lives under a ``*.part`` name that is removed on any failure, and a
   file already there with the right checksum is not fetched again.
4. tfds prepares the dataset from those files (its ``manual_dir``: tfds checks the checksums
   again) in its own temporary folder, renamed into place only when complete. The raw files are
   then deleted: the prepared dataset is the cache.

Preparing needs TensorFlow (``pip install -e ".[data]"``); reading does not.

``mirror``: a base URL (``http(s)://`` or ``file://``) holding ``<dataset>/<file name>``, used
instead of the original hosts (a local copy, a lab mirror, a host that moved); its files must
have the registered checksums. Two settings exist for tests that serve rebuilt files from a
local mirror, and change nothing unless set:

* ``MMVAE_JAX_DOWNLOAD_CHECKSUMS``: a file in tfds's ``checksums.tsv`` format
  (``url<TAB>size<TAB>sha256<TAB>file name``, the URL being the registered one) whose entries
  replace the registered size and SHA-256 of those files, for our check and for tfds's.
* ``MMVAE_JAX_DOWNLOAD_MAX_EXAMPLES``: write at most this many examples per split (tfds's
  ``max_examples_per_split``, a truncated dataset; for quick tests only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Callable, Iterable, Sequence

from mmvae_jax.data import sources as sources_lib
from mmvae_jax.data.sources import DatasetNotPreparedError
from mmvae_jax.errors import first_line

MODES = ("auto", "never")
PROBE_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
CHECKSUMS_ENV = "MMVAE_JAX_DOWNLOAD_CHECKSUMS"
MAX_EXAMPLES_ENV = "MMVAE_JAX_DOWNLOAD_MAX_EXAMPLES"
FILE_FORMAT = "array_record"
WORK_SUBDIR = os.path.join("downloads", "mmvae_jax")
PART_SUFFIX = ".part"
_CHUNK = 1 << 20

log = logging.getLogger("mmvae_jax.data")


class DownloadError(RuntimeError):
  """A download started but failed (HTTP error, broken connection, wrong checksum): one line."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One file of a dataset: where tfds registers it, where we fetch it, what it must be."""
  url: str        # the registered URL (the key of tfds's checksums)
  fetch_url: str  # the URL fetched (`url`, or its place on the mirror)
  size: int       # bytes
  sha256: str
  filename: str


# ---------------------------------------------------------------------------------------------
# What to fetch.


def _read_checksums(path: str) -> dict[str, tuple[int, str, str]]:
  """{url: (size, sha256, file name)} of a tfds checksums.tsv file."""
  out = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise ValueError(f"{CHECKSUMS_ENV}={path}: cannot read it ({e.strerror or e})") from None
  for i, line in enumerate(lines, 1):
    if not line.strip() or line.startswith("#"):
      continue
    parts = line.split("\t")
    try:
      url, size, sha = parts[0], int(parts[1]), parts[2].strip().lower()
    except (IndexError, ValueError):
      raise ValueError(f"{CHECKSUMS_ENV}={path}: line {i} is not 'url<TAB>size<TAB>sha256"
                       f"[<TAB>file name]'") from None
    name = parts[3].strip() if len(parts) > 3 and parts[3].strip() else os.path.basename(
        urllib.parse.urlsplit(url).path)
    out[url] = (size, sha, name)
  return out


def _mirror_url(mirror: str, name: str, filename: str) -> str:
  return f"{mirror.rstrip('/')}/{urllib.parse.quote(name)}/{urllib.parse.quote(filename)}"


def remote_files(builder, name: str, mirror: str | None = None) -> list[RemoteFile]:
  """The files tfds's registered checksums list for `builder` (with ``CHECKSUMS_ENV``'s
  replacements), fetched from `mirror` when given."""
  registered = type(builder).url_infos or {}
  if not registered:
    raise DatasetNotPreparedError(
        f"tfds dataset {name!r} has no registered checksums, so it is not downloaded here; "
        f"prepare it with `tfds build {name} --file_format={FILE_FORMAT}` and pass --data_dir")
  override = _read_checksums(os.environ[CHECKSUMS_ENV]) if os.environ.get(CHECKSUMS_ENV) else {}
  files = []
  for url, info in sorted(registered.items()):
    filename = info.filename or os.path.basename(urllib.parse.urlsplit(url).path)
    size, sha = int(info.size), str(info.checksum)
    if url in override:
      size, sha, _ = override[url]
    files.append(RemoteFile(url=url, fetch_url=_mirror_url(mirror, name, filename) if mirror
                            else url, size=size, sha256=sha, filename=filename))
  return files


# ---------------------------------------------------------------------------------------------
# Reachability.


def probe_target(url: str) -> tuple[str, int] | None:
  """(host, port) a fetch of `url` first connects to: the proxy the environment names for it,
  else the host itself; None for a URL that needs no network (file://)."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https"):
    return None
  default = 443 if parts.scheme == "https" else 80
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
  return parts.hostname or "", parts.port or default


def unreachable(targets: Iterable[tuple[str, int]], timeout: float = PROBE_TIMEOUT_S
                ) -> dict[tuple[str, int], str]:
  """{(host, port): reason} of the targets to which no TCP connection opened within `timeout`
  seconds (name resolution included: every probe runs in its own thread, all at once)."""
  targets = list(dict.fromkeys(targets))
  result: dict[tuple[str, int], str] = {}

  def probe(target):
    try:
      socket.create_connection(target, timeout=timeout).close()
      result[target] = ""
    except OSError as e:
      result[target] = e.strerror or str(e) or type(e).__name__

  threads = [threading.Thread(target=probe, args=(t,), daemon=True) for t in targets]
  for t in threads:
    t.start()
  deadline = time.monotonic() + timeout + 0.5
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  return {t: result.get(t) or f"no answer within {timeout:g} s" for t in targets
          if result.get(t, None) != ""}


# ---------------------------------------------------------------------------------------------
# Fetching.


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _progress_bar(total: int, desc: str):
  if not sys.stderr.isatty():
    return None
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              file=sys.stderr, leave=False)


def fetch(file: RemoteFile, dest: str) -> None:
  """Fetches `file` to `dest` (written as ``dest.<random>.part``, moved into place only with
  the expected size and SHA-256; the part file is removed on any failure). A `dest` already
  holding the expected bytes is kept."""
  if os.path.isfile(dest):
    if os.path.getsize(dest) == file.size and _sha256(dest) == file.sha256:
      return
    os.remove(dest)
  tmp = f"{dest}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
  bar = None
  try:
    h, n = hashlib.sha256(), 0
    request = urllib.request.Request(file.fetch_url, headers={"User-Agent": "mmvae_jax"})
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response, \
        open(tmp, "wb") as out:
      bar = _progress_bar(file.size, file.filename)
      while chunk := response.read(_CHUNK):
        out.write(chunk)
        h.update(chunk)
        n += len(chunk)
        if bar is not None:
          bar.update(len(chunk))
    if n != file.size or h.hexdigest() != file.sha256:
      raise DownloadError(
          f"{file.fetch_url}: got {n:,} bytes with SHA-256 {h.hexdigest()[:16]}..., expected "
          f"{file.size:,} bytes with SHA-256 {file.sha256[:16]}... (a corrupted or changed file; "
          f"nothing kept); try again, or give --download_mirror a copy with the registered "
          f"checksums")
    os.replace(tmp, dest)
  except urllib.error.HTTPError as e:
    raise DownloadError(f"downloading {file.fetch_url} failed: HTTP {e.code} {e.reason} "
                        f"(nothing kept); try again later, or give --download_mirror a copy of "
                        f"{file.filename}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", None) or e
    raise DownloadError(f"downloading {file.fetch_url} failed: {first_line(reason)} "
                        f"(nothing kept); try again, or give --download_mirror a copy of "
                        f"{file.filename}") from None
  finally:
    if bar is not None:
      bar.close()
    if os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# Preparing.


@contextlib.contextmanager
def _expected_by_tfds(builder, files: Sequence[RemoteFile]):
  """While preparing, tfds expects the sizes and checksums of `files` (which differ from the
  registered ones only under ``CHECKSUMS_ENV``). tfds reads the expectations of a dataset from
  one dict per builder class, created once and handed to each download manager."""
  registered = type(builder).url_infos
  changed = {f.url: f for f in files if f.url in registered and
             (int(registered[f.url].size), str(registered[f.url].checksum)) != (f.size, f.sha256)}
  if not changed:
    yield
    return
  from tensorflow_datasets.core.download import checksums  # pylint: disable=import-outside-toplevel
  saved = {url: registered[url] for url in changed}
  for url, f in changed.items():
    registered[url] = checksums.UrlInfo(size=f.size, checksum=f.sha256, filename=f.filename)
  try:
    yield
  finally:
    registered.update(saved)


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _remove_created(paths: Sequence[str], existed: dict[str, bool]) -> None:
  """Removes the folders of `paths` that did not exist before (deepest first) when empty."""
  for path in sorted(paths, key=len, reverse=True):
    if not existed.get(path, True) and os.path.isdir(path):
      try:
        os.rmdir(path)
      except OSError:
        pass


def _remove_stale_parts(folder: str, age_s: float = 600.0) -> None:
  """Removes part files of fetches that ended without cleaning up (a killed process): those not
  written to for `age_s` seconds (a fetch in progress elsewhere keeps writing to its own)."""
  now = time.time()
  for entry in os.scandir(folder):
    if entry.name.endswith(PART_SUFFIX) and now - entry.stat().st_mtime > age_s:
      with contextlib.suppress(OSError):
        os.remove(entry.path)


def _prepare_one(tfds, builder, name: str, root: str, files: Sequence[RemoteFile],
                 say: Callable[[str], None]) -> None:
  work = os.path.join(root, WORK_SUBDIR, name)
  folders = [root, os.path.join(root, "downloads"), os.path.join(root, WORK_SUBDIR), work,
             os.path.join(root, name)]
  existed = {p: os.path.exists(p) for p in folders}
  total = sum(f.size for f in files)
  hosts = sorted({urllib.parse.urlsplit(f.fetch_url).netloc or "local files" for f in files})
  say(f"downloading tfds {name!r}: {len(files)} file(s), {_human(total)} from "
      f"{', '.join(hosts)} into {work}")
  ok = False
  try:
    os.makedirs(work, exist_ok=True)
    _remove_stale_parts(work)
    for f in files:
      fetch(f, os.path.join(work, f.filename))
    say(f"preparing tfds {name!r} ({FILE_FORMAT}) in {builder.data_dir}")
    start = time.monotonic()
    max_examples = os.environ.get(MAX_EXAMPLES_ENV)
    config = tfds.download.DownloadConfig(
        manual_dir=work, try_download_gcs=False, force_checksums_validation=True,
        max_examples_per_split=int(max_examples) if max_examples else None)
    if not sys.stderr.isatty():
      tfds.disable_progress_bar()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines
    with _expected_by_tfds(builder, files):
      builder.download_and_prepare(download_dir=os.path.join(work, "tfds"),
                                   download_config=config, file_format=FILE_FORMAT)
    say(f"prepared tfds {name!r} in {time.monotonic() - start:.0f} s")
    ok = True
  finally:
    # Raw files are kept only while the dataset is not prepared (a retry then reuses those
    # whose checksums match); tfds's extracted copies never outlive the call.
    shutil.rmtree(os.path.join(work, "tfds"), ignore_errors=True)
    if ok:
      shutil.rmtree(work, ignore_errors=True)
    _remove_created(folders, existed)


def ensure_prepared(names: Sequence[str], data_dir: str | None = None, *,
                    mirror: str | None = None, probe_timeout: float = PROBE_TIMEOUT_S,
                    say: Callable[[str], None] | None = None) -> list[str]:
  """Prepares the tfds datasets of `names` that are not prepared under `data_dir` (see the
  module docstring). Returns the names prepared now; a dataset already prepared never touches
  the network. Names tfds does not know are left to `load_tfds` to report.

  Raises:
    DatasetNotPreparedError: TensorFlow missing, or a download host unreachable (offline); one
      line, raised before anything is written.
    DownloadError: a download failed or a file has the wrong checksum (one line; no partial
      file is left).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import registered  # pylint: disable=import-outside-toplevel
  say = say or log.info
  todo = []
  for name in dict.fromkeys(names):
    try:
      with sources_lib.quiet_lookup():
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except registered.DatasetNotFoundError:
      continue
    if not prepared:
      todo.append((name, builder))
  if not todo:
    return []
  root = os.path.expanduser(os.fspath(data_dir) if data_dir is not None
                            else sources_lib.default_data_dir(tfds))
  if not sources_lib.tensorflow_available():
    name = todo[0][0]
    raise sources_lib.not_prepared(
        tfds, name, None, data_dir, str(todo[0][1].data_dir), "is not prepared",
        download="and cannot be prepared here: preparing a tfds dataset needs TensorFlow, not "
                 "installed (pip install -e \".[data]\", or pip install tensorflow-cpu)")
  plans = [(name, builder, remote_files(builder, name, mirror)) for name, builder in todo]
  targets = {}
  for name, _, files in plans:
    for f in files:
      target = probe_target(f.fetch_url)
      if target is not None:
        targets.setdefault(target, name)
  failed = unreachable(targets, probe_timeout)
  if failed:
    (host, port), reason = next(iter(failed.items()))
    name = targets[(host, port)]
    builder = dict((n, b) for n, b in todo)[name]
    raise sources_lib.not_prepared(
        tfds, name, None, data_dir, str(builder.data_dir), "is not prepared",
        download=f"and cannot be downloaded ({host}:{port} unreachable: {reason}; offline?)")
  for name, builder, files in plans:
    _prepare_one(tfds, builder, name, root, files, say)
  return [name for name, _, _ in plans]
