"""mmvae_jax: multimodal VAEs with a mixture-of-experts posterior (Shi et al., NeurIPS 2019).

    import mmvae_jax
    run = mmvae_jax.load_run("runs/mnist_svhn")     # model, params, config of a trained run

Importing the package imports no JAX (the experiment scripts set host-memory options first);
`load_run`, `Run` and `RunConfig` are loaded on first use.
"""
__version__ = "0.1.0"

from mmvae_jax import _no_tf_for_tfp

_no_tf_for_tfp.install()  # distrax's tfp would import TensorFlow, when installed, for nothing

_LAZY = {"load_run": "mmvae_jax.runs", "Run": "mmvae_jax.runs", "RunError": "mmvae_jax.runs",
         "train_run": "mmvae_jax.runs", "RunConfig": "mmvae_jax.config"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'mmvae_jax' has no attribute {name!r}")
