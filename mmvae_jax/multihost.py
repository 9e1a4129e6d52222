"""Several processes, one run: joining them (`jax.distributed`), one writer, agreeing on
outcomes, and never hanging when one of them dies.

A run on a TPU pod slice or on several GPU nodes is the same command started once per host
(or per GPU); `initialize` joins the processes through JAX's multi-controller runtime:

* explicitly (``--coordinator_address=host:port --num_processes=N --process_id=i``, or the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or
* automatically where JAX detects the cluster and it has more than one process: a TPU VM
  slice of several workers, a Slurm step of several tasks (``srun``), an Open MPI job.

A single process (none of the above, or ``--num_processes=1``) is left exactly as it was:
nothing is initialised, nothing is started.

Once joined, every process runs the same program on its share of the data (`mmvae_jax.data`)
over one global mesh (`mmvae_jax.parallel.data_mesh`). Process 0 is the only writer
(`is_primary`). Decisions that a single process could take differently (bad data on one host,
the workdir lock, an unreadable checkpoint) go through `agree`, so that every process raises
the same one-line error. A watchdog thread publishes a heartbeat through the coordination
service's key-value store and ends this process with one line when another one stopped
(killed, crashed, or failed with an error) instead of waiting in a collective for ever;
``MMVAE_JAX_PEER_TIMEOUT`` (seconds, default 60) is how long a silent process is waited for.
Process 0 hosts JAX's coordination service: when it dies, JAX itself ends the other processes
at once (its own "Terminating process because the JAX distributed service detected fatal
errors" message, exit status 134).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import re
import sys
import threading
import time
from typing import NoReturn

import jax

from mmvae_jax.errors import first_line as _first_line

PEER_TIMEOUT_ENV = "MMVAE_JAX_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 60.0
HEARTBEAT_SECONDS = 1.0
GRACE_SECONDS = 2.0          # how long a peer's end is given to end this process by itself
LINGER_SECONDS = 4.0         # how long process 0, ending alone, waits for the others to end
SHUTDOWN_SECONDS = 60        # how long an exit of all processes together waits for them
_PREFIX = "mmvae_jax"
_FOREVER_MS = 7 * 24 * 3600 * 1000


class DistributedError(RuntimeError):
  """The processes cannot be joined (one-line message)."""


class PeerStopped(RuntimeError):
  """Another process of the run ended (one-line message, its exit status in `code`)."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass
class _State:
  active: bool = False        # this process joined several through `initialize`
  index: int = 0
  count: int = 1
  prog: str = ""
  hint: str = ""
  watchdog: "_Watchdog | None" = None
  agreements: int = 0
  detected: tuple | None = None  # (detect_cluster(),) once `initialize` asked


_state = _State()
_exit_lock = threading.Lock()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def _tpu_process_count() -> int:
  """Workers of this Cloud TPU slice (times its slices), 1 off a TPU VM."""
  try:
    from jax._src import cloud_tpu_init
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return 1
    from jax._src.clusters import cloud_tpu_cluster as tpu
    for cls in (tpu.GkeTpuCluster, tpu.GceTpuCluster):
      if cls.is_env_present():
        return int(cls.get_process_count())
  except Exception:  # pylint: disable=broad-except  (metadata server unreachable, ...)
    return 1
  return 1


def detect_cluster() -> tuple[str, int] | None:
  """(cluster name, number of processes) when this process is one of several that JAX's
  cluster detection joins (Slurm step, Open MPI job, TPU slice of several workers); None for
  a single process."""
  env = os.environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(k in env for k in slurm):
    n = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS") or 1
    if n > 1:
      return "Slurm", n
  if "OMPI_MCA_orte_hnp_uri" in env:
    n = _env_int("OMPI_COMM_WORLD_SIZE") or 1
    if n > 1:
      return "Open MPI", n
  n = _tpu_process_count()
  if n > 1:
    return "TPU slice", n
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, prog: str | None = None,
               initialization_timeout: int = 300) -> bool:
  """Joins this process to the others of a multi-process run (`jax.distributed.initialize`)
  and starts the watchdog; returns whether this process is one of several.

  Arguments left None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID; when none is set, JAX's cluster detection decides (`detect_cluster`).
  ``num_processes=1`` forces a single process. Must run before any JAX computation or device
  query. A second call does nothing.

  Raises:
    DistributedError: incomplete or inconsistent arguments, JAX already started, or process 0
      not reachable within `initialization_timeout` seconds (one line). (Process 0 itself, when
      a process never comes, is ended by JAX after that time with JAX's own message.)
  """
  if prog:
    _state.prog = prog
  if _state.active:
    return True
  if jax.distributed.is_initialized():  # joined by the caller itself
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  if num_processes == 1:
    return False
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if not explicit and _state.detected is None:  # detected once (a TPU VM asks its metadata)
    _state.detected = (detect_cluster(),)
  detected = None if explicit else _state.detected[0]
  if explicit:
    missing = [name for name, value in (("--coordinator_address", coordinator_address),
                                        ("--num_processes", num_processes),
                                        ("--process_id", process_id)) if value is None]
    if missing and detect_cluster() is None:
      raise DistributedError(f"{' and '.join(missing)} missing: a run of several processes "
                             f"needs --coordinator_address, --num_processes and --process_id "
                             f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if num_processes is not None and num_processes < 1:
      raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id={process_id} is not in [0, {num_processes})")
  elif detected is None:
    return False
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise DistributedError("JAX was started before the processes were joined: call "
                           "mmvae_jax.parallel.initialize_distributed() before any JAX "
                           "computation or device query")
  # Signals are the training loop's (see mmvae_jax.train): JAX's preemption service would take
  # SIGTERM away from Python for the whole life of the process.
  jax.config.update("jax_enable_preemption_service", False)
  where = coordinator_address or (f"{detected[0]} auto-detection" if detected else "auto-detection")
  if coordinator_address and process_id:  # JAX would abort this process, not raise
    _wait_for_coordinator(coordinator_address, initialization_timeout)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout,
                               shutdown_timeout_seconds=SHUTDOWN_SECONDS)
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, ValueError, ...)
    text = str(e).strip().splitlines()
    n = num_processes or (detected[1] if detected else "the")
    raise DistributedError(f"cannot join {n} processes through {where} "
                           f"({text[0][:300] if text else type(e).__name__}): start the same "
                           f"command once per process, each with its own --process_id") from None
  _state.active = True
  _state.index, _state.count = jax.process_index(), jax.process_count()
  if _state.count > 1:
    _state.watchdog = _Watchdog(_client(), _state.index, _state.count, _peer_timeout())
    _state.watchdog.start()
    atexit.register(_at_exit)
  return _state.count > 1


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Waits until process 0 accepts connections at `address` (host:port)."""
  import socket
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  try:
    port_number = int(port)
  except ValueError:
    raise DistributedError(f"--coordinator_address={address} is not host:port") from None
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host, port_number), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"process 0 cannot be reached at {address} after {timeout:.0f} s ({e.strerror or e}): "
            f"start it (--process_id=0) on that host, with the same --coordinator_address") from None
      time.sleep(0.5)


def _peer_timeout() -> float:
  value = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
  try:
    return max(float(value), 2 * HEARTBEAT_SECONDS) if value else DEFAULT_PEER_TIMEOUT
  except ValueError:
    return DEFAULT_PEER_TIMEOUT


def set_program(prog: str, hint: str = "") -> None:
  """Names the program in the lines this module prints and what they advise (e.g. how to
  resume)."""
  _state.prog, _state.hint = prog, hint


def active() -> bool:
  """Whether `initialize` joined this process to others (never initialises JAX)."""
  return _state.active and _state.count > 1


def process_index() -> int:
  return _state.index if _state.active else jax.process_index()


def process_count() -> int:
  return _state.count if _state.active else jax.process_count()


def is_multiprocess() -> bool:
  return process_count() > 1


def is_primary() -> bool:
  """Whether this process writes (process 0; the only process of a single-process run)."""
  return process_index() == 0


def _client():
  from jax._src import distributed
  return distributed.global_state.client


def _key(*parts) -> str:
  return "/".join((_PREFIX,) + tuple(str(p) for p in parts))


# ---------------------------------------------------------------------------------------------
# Agreement.


def agree(error: str | None) -> str | None:
  """Every process calls this at the same point with its own error (None: none); all get the
  same answer: the error of the lowest-numbered process that has one, prefixed by that
  process's number when it is not the caller's own, or None. A single process gets its own."""
  if not is_multiprocess():
    return error
  _state.agreements += 1
  n, me, count = _state.agreements, process_index(), process_count()
  client = _client()
  if client is None:  # several processes joined without jax.distributed (an older TPU runtime)
    values = _allgather_text(error or "")
  else:
    try:
      client.key_value_set(_key("agree", n, me), error or "")
      values = [client.blocking_key_value_get(_key("agree", n, p), _FOREVER_MS)
                for p in range(count)]
    except Exception as e:  # pylint: disable=broad-except
      raise PeerStopped(f"lost contact with the other processes ({_first_line(e)})") from None
  for p, value in enumerate(values):
    if value:
      return value if p == me or value == error else f"process {p} of {count}: {value}"
  return None


def _allgather_text(text: str, size: int = 2048) -> list[str]:
  import numpy as np
  from jax.experimental import multihost_utils
  data = text.encode()[:size]
  buf = np.zeros((size + 4,), np.uint8)
  buf[:4] = np.frombuffer(np.int32(len(data)).tobytes(), np.uint8)
  buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.process_allgather(buf))
  return [bytes(row[4:4 + int(np.frombuffer(row[:4].tobytes(), np.int32)[0])]).decode(errors="replace")
          for row in out]



# ---------------------------------------------------------------------------------------------
# Work done by process 0 alone while the others wait.


def primary_done(tag: str) -> None:
  """Process 0 tells the processes waiting in `wait_for_primary(tag)` that it is done."""
  if active() and is_primary():
    _client().key_value_set(_key("done", tag), "1", allow_overwrite=True)


def wait_for_primary(tag: str) -> None:
  """Waits (as long as it takes) until process 0 calls `primary_done(tag)`.

  Raises:
    PeerStopped: process 0 ended first (its exit status and message), or cannot be reached.
  """
  if not active() or is_primary():
    return
  client = _client()
  while True:
    try:
      client.blocking_key_value_get(_key("done", tag), 1000)
      return
    except Exception as e:  # pylint: disable=broad-except  (DEADLINE_EXCEEDED every second)
      if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
        raise PeerStopped(f"lost contact with process 0 ({_first_line(e)})") from None
    ended = _exit_marker(client, 0)
    if ended is not None:
      code, message = ended
      if code == 0:  # it ended normally
        return
      raise PeerStopped(f"process 0 stopped: {message}" if message else "process 0 stopped",
                        code)


def _exit_marker(client, p: int) -> tuple[int, str] | None:
  try:
    value = client.key_value_try_get(_key("exit", p))
  except Exception:  # pylint: disable=broad-except  (NOT_FOUND)
    return None
  return _parse_marker(value)[1:]


def _parse_marker(value: str) -> tuple[bool, int, str]:
  """(together, exit status, message) of an exit marker "<T|A> <status> <message>"."""
  kind, _, rest = value.partition(" ")
  code, _, message = rest.partition(" ")
  try:
    return kind == "T", int(code), message
  except ValueError:
    return False, 1, value


# ---------------------------------------------------------------------------------------------
# Ending a process of a multi-process run.


def exit_process(code: int, line: str | None, *, wait_for_others: bool) -> NoReturn:
  """Prints `line` (if any) on stderr and ends this process with `code`; the other processes
  learn why through the coordination service.

  `wait_for_others`: an outcome every process reaches at the same point (an agreed error, a
  coordinated stop): all of them leave JAX's distributed runtime together
  (`jax.distributed.shutdown`, at most SHUTDOWN_SECONDS), each with its own line. Otherwise
  this process ends at once, except process 0, whose end takes the coordination service with
  it: it first gives the others a few seconds to end by themselves, each with its own line.
  """
  with _exit_lock:  # held until the end: the watchdog never prints a second line
    if line:
      print(line, file=sys.stderr, flush=True)
    client = _client()
    if client is not None:
      message = line.split(": error: ", 1)[-1] if line else ""
      try:
        client.key_value_set(_key("exit", process_index()),
                             f"{'T' if wait_for_others else 'A'} {code} {message}",
                             allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except  (the coordinator already gone)
        pass
      if wait_for_others:
        if _state.watchdog is not None:
          _state.watchdog.stop()
        try:
          jax.distributed.shutdown()
        except Exception:  # pylint: disable=broad-except  (a process that never came)
          pass
      elif process_index() == 0:
        _linger(client)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _linger(client) -> None:
  """Process 0: waits (at most LINGER_SECONDS) until every other process has ended."""
  deadline = time.monotonic() + LINGER_SECONDS
  while time.monotonic() < deadline:
    try:
      ended = dict(client.key_value_dir_get(_key("exit") + "/"))
    except Exception:  # pylint: disable=broad-except
      return
    if all(_key("exit", p) in ended for p in range(1, process_count())):
      time.sleep(0.2)  # they are between their marker and their end
      return
    time.sleep(0.1)


def _at_exit() -> None:
  """A normal end: the watchdog stops and the others are told this process is done."""
  wd = _state.watchdog
  if wd is None:
    return
  wd.stop()
  try:
    _client().key_value_set(_key("exit", _state.index), "T 0 done", allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass


# How a collective reports a peer that is gone, where it fails instead of waiting: jax 0.12's
# CPU collectives (gloo) fail at once ("Connection closed by peer"), jax 0.10's wait until the
# watchdog ends the process.
_PEER_LOST = re.compile(r"closed by peer|connection reset|broken pipe|connection refused",
                        re.IGNORECASE)


def await_watchdog(error: BaseException) -> None:
  """After `error` in a run of several processes: if it is a collective that lost a peer, waits
  for the watchdog to find which process stopped (at most the peer timeout and a few
  heartbeats); the watchdog then ends this process with its one line, as where the collective
  waits. Returns at once for any other error, or when the watchdog finds nothing."""
  watchdog = _state.watchdog
  if watchdog is None or not watchdog.is_alive() or not _PEER_LOST.search(str(error)):
    return
  watchdog.join(_peer_timeout() + 5 * HEARTBEAT_SECONDS + GRACE_SECONDS)


class _Watchdog(threading.Thread):
  """Publishes this process's heartbeat every second and reads the others'; ends this process
  with one line when another process stopped (no heartbeat for `timeout` seconds, an exit
  with an error, or the coordinator gone) and this one has not ended by itself within a grace
  period (it would otherwise wait in a collective until JAX aborts it)."""

  def __init__(self, client, index: int, count: int, timeout: float):
    super().__init__(name="mmvae-peer-watchdog", daemon=True)
    self._client, self._index, self._count, self._timeout = client, index, count, timeout
    self._stopped = threading.Event()

  def stop(self) -> None:
    self._stopped.set()

  def run(self) -> None:
    beats = 0
    seen = {p: (None, time.monotonic()) for p in range(self._count) if p != self._index}
    while not self._stopped.wait(HEARTBEAT_SECONDS):
      beats += 1
      try:
        self._client.key_value_set(_key("alive", self._index), str(beats), allow_overwrite=True)
        alive = dict(self._client.key_value_dir_get(_key("alive") + "/"))
        ended = dict(self._client.key_value_dir_get(_key("exit") + "/"))
      except Exception:  # pylint: disable=broad-except
        if self._stopped.is_set():
          return
        self._end("lost contact with process 0, which coordinates the run", grace=True)
        return
      now = time.monotonic()
      for p in seen:
        marker = ended.get(_key("exit", p))
        if marker is not None:
          together, code, message = _parse_marker(marker)
          if together:  # it waits for this process to end the same way (or is done)
            continue
          self._end(f"process {p} of {self._count} stopped" + (f" ({message})" if message
                                                                else ""), grace=True)
          return
        beat = alive.get(_key("alive", p))
        if beat != seen[p][0]:
          seen[p] = (beat, now)
        elif now - seen[p][1] > self._timeout:
          self._end(f"process {p} of {self._count} stopped responding (no heartbeat for "
                    f"{self._timeout:.0f} s)", grace=False)
          return

  def _end(self, reason: str, grace: bool) -> None:
    if grace and self._stopped.wait(GRACE_SECONDS):
      return
    if not _exit_lock.acquire(blocking=False):
      return  # the main thread is ending this process itself
    prog = _state.prog or os.path.basename(sys.argv[0] or "python")
    hint = f"; {_state.hint}" if _state.hint else ""
    print(f"{prog}: error: {reason}: stopping this process too{hint}", file=sys.stderr, flush=True)
    try:
      self._client.key_value_set(_key("exit", self._index), f"A 1 {reason}", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass
    if self._index == 0:
      _linger(self._client)
    sys.stdout.flush()
    os._exit(1)
