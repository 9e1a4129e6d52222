"""Keeps TensorFlow out of processes that do not use it.

tfp's JAX substrate, which distrax is built on, imports TensorFlow whenever it is installed
(``pip install -e ".[data]"`` installs it to prepare tfds datasets), only to copy TensorFlow's
docstrings onto its own functions. That costs every process that imports distrax about 0.57 GB
of host memory and 18 s of start-up on the 2-core CI machine (measured: ``import distrax``
0.22 GB and 9-11 s without TensorFlow installed, 0.78 GB and 27-30 s with it). `install()`
adds an import hook that answers "not installed" to that one import only, which tfp handles
(it skips the docstrings); any other import of TensorFlow (tfds preparing a dataset, the
tf.data fallback, user code) is untouched.
"""
import sys

_TFP_BACKEND = "tensorflow_probability.python.internal.backend."


class _Finder:
  """A meta-path finder refusing ``tensorflow`` to tfp's backend modules, and only to them."""

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if name != "tensorflow" and not name.startswith("tensorflow."):
      return None
    frame = sys._getframe(1)  # pylint: disable=protected-access
    for _ in range(64):
      if frame is None:
        break
      module = frame.f_globals.get("__name__", "")
      if module.startswith(_TFP_BACKEND):
        raise ModuleNotFoundError(f"No module named {name!r} (not imported for tfp's JAX "
                                  f"substrate: see mmvae_jax._no_tf_for_tfp)", name=name)
      if not module.startswith(("importlib", "_frozen_importlib")) and module != __name__:
        break  # the importing module is someone else's
      frame = frame.f_back
    return None


def install() -> None:
  """Adds the hook once (idempotent)."""
  if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
