"""Encoders and decoders of the MNIST-SVHN MMVAE (flax.linen), PyTorch layer semantics.

Layer tables: official-code spec §6.1 (MNIST MLP) and §6.2 (SVHN CNN); initialisation: §7.1
(PyTorch defaults, see ``mmvae_jax.layers``). Images are NHWC float32 in [0, 1].

Encoders return ``(loc, scale_logits)``: the raw outputs of the two heads. The scale
constraint (softmax(v)·D + 1e-6 in the official code) is applied by the model, not here.
Decoders return the likelihood's mean (MNIST: clamped to [1e-6, 1 − 1e-6]; SVHN: sigmoid).

Every module accepts any leading batch shape: encoders (..., H, W, C) → (..., D), decoders
(..., D) → (..., H, W, C). Leading axes are flattened to one batch axis internally (in
row-major order) and restored afterwards; nothing is squeezed, so a batch of one keeps its axis.

Parameter counts at D = 20 (spec §6): MNIST encoder 330,040, decoder 322,784; SVHN encoder
247,560, decoder 206,563.

The SVHN decoder is the hot path of training (it decodes M·K·B latents per step). Its
transposed convolutions have two formulations sharing one parameter tree (``impl``): XLA
convolutions ("conv", for GPU/TPU) and matmul forms ("matmul", for XLA:CPU, several times
faster there); "auto" picks by backend. See ``mmvae_jax.layers``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mmvae_jax.layers import Conv2d, ConvTransposeParams, Dense, conv_transpose, resolve_impl

Array = jax.Array

MNIST_SHAPE = (28, 28, 1)
SVHN_SHAPE = (32, 32, 3)
ETA = 1e-6  # clamp of the MNIST decoder's mean (official Constants.eta)

# Latents per lax.map chunk of the SVHN decoder in its matmul form (chunk_size=-1); 256-512
# measured fastest on the 2-core CPU at N = 7680 (1024: +10% time, +115 MB).
DEFAULT_CHUNK_SIZE = 512
# Remat policies of the matmul SVHN decoder: names of the activations kept for the backward pass.
_ACT = "svhn_decoder_act{}"
REMAT_SAVED = {
    "activations": (_ACT.format(2), _ACT.format(3), _ACT.format(4)),
    "minimal": (_ACT.format(2), _ACT.format(4)),
}


def count_params(params: Any) -> int:
  """Total number of array entries in a pytree (e.g. ``variables["params"]``)."""
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def _flatten_leading(x: Array, trailing: int) -> tuple[Array, tuple[int, ...]]:
  """(..., *t) → ((N, *t), leading shape), with t the last `trailing` dims."""
  lead = x.shape[:x.ndim - trailing]
  return x.reshape((math.prod(lead),) + x.shape[x.ndim - trailing:]), lead


# ------------------------------------------------------------------------------------------------
# MNIST (spec §6.1)
# ------------------------------------------------------------------------------------------------

class MnistEncoder(nn.Module):
  """MLP encoder: (..., 28, 28, 1) → (loc, scale_logits), each (..., latent_dim).

  784 → Dense 400 + ReLU → (num_hidden_layers − 1) × [Dense 400 + ReLU] → two Dense heads.
  Parameters: ``fc1``, ``hidden_{i}`` (i ≥ 1), ``fc21`` (loc), ``fc22`` (scale logits).
  """
  latent_dim: int = 20
  num_hidden_layers: int = 1
  hidden_dim: int = 400

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x, lead = _flatten_leading(x, 3)
    chex.assert_shape(x, (None,) + MNIST_SHAPE)
    h = x.reshape(x.shape[0], -1)
    h = nn.relu(Dense(self.hidden_dim, name="fc1")(h))
    for i in range(1, self.num_hidden_layers):
      h = nn.relu(Dense(self.hidden_dim, name=f"hidden_{i}")(h))
    loc = Dense(self.latent_dim, name="fc21")(h)
    scale_logits = Dense(self.latent_dim, name="fc22")(h)
    chex.assert_shape([loc, scale_logits], (x.shape[0], self.latent_dim))
    return loc.reshape(lead + (self.latent_dim,)), scale_logits.reshape(lead + (self.latent_dim,))


class MnistDecoder(nn.Module):
  """MLP decoder: z (..., latent_dim) → mean (..., 28, 28, 1) in [1e-6, 1 − 1e-6].

  D → Dense 400 + ReLU → (num_hidden_layers − 1) × [Dense 400 + ReLU] → Dense 784 → sigmoid →
  reshape → clamp. Parameters: ``fc1``, ``hidden_{i}`` (i ≥ 1), ``fc3``.
  """
  latent_dim: int = 20
  num_hidden_layers: int = 1
  hidden_dim: int = 400

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chex.assert_axis_dimension(z, -1, self.latent_dim)
    lead = z.shape[:-1]
    h = nn.relu(Dense(self.hidden_dim, name="fc1")(z))
    for i in range(1, self.num_hidden_layers):
      h = nn.relu(Dense(self.hidden_dim, name=f"hidden_{i}")(h))
    h = nn.sigmoid(Dense(math.prod(MNIST_SHAPE), name="fc3")(h))
    mean = jnp.clip(h.reshape(lead + MNIST_SHAPE), ETA, 1.0 - ETA)
    chex.assert_shape(mean, lead + MNIST_SHAPE)
    return mean


# ------------------------------------------------------------------------------------------------
# SVHN (spec §6.2)
# ------------------------------------------------------------------------------------------------

class SvhnEncoder(nn.Module):
  """CNN encoder: (..., 32, 32, 3) → (loc, scale_logits), each (..., latent_dim).

  Conv 3→32 (4,2,1) + ReLU → 32→64 (4,2,1) + ReLU → 64→128 (4,2,1) + ReLU (4×4×128) → two heads
  Conv 128→D (4,1,0) (a 4×4 valid convolution to 1×1). Parameters: ``conv1``..``conv3``,
  ``c1`` (loc), ``c2`` (scale logits); kernels (k, k, C_in, C_out). Unlike the official code
  the batch axis is never squeezed (a batch of one stays (1, D)).
  """
  latent_dim: int = 20
  width: int = 32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x, lead = _flatten_leading(x, 3)
    chex.assert_shape(x, (None,) + SVHN_SHAPE)
    h = x
    for i, mult in enumerate((1, 2, 4)):
      h = nn.relu(Conv2d(self.width * mult, 4, stride=2, padding=1, name=f"conv{i + 1}")(h))
    chex.assert_shape(h, (x.shape[0], 4, 4, 4 * self.width))
    loc = Conv2d(self.latent_dim, 4, name="c1")(h)
    scale_logits = Conv2d(self.latent_dim, 4, name="c2")(h)
    chex.assert_shape([loc, scale_logits], (x.shape[0], 1, 1, self.latent_dim))
    out_shape = lead + (self.latent_dim,)
    return loc.reshape(out_shape), scale_logits.reshape(out_shape)


@jax.custom_vjp
def relu_output_vjp(x: Array) -> Array:
  """ReLU whose backward pass reads only its output (residual: y, not x).

  Lets a remat policy keep post-activations alone: the next layer's weight gradient needs the
  output anyway, and the ReLU mask is (y > 0) == (x > 0).
  """
  return jnp.maximum(x, 0.0)


def _relu_fwd(x):
  y = jnp.maximum(x, 0.0)
  return y, y


def _relu_bwd(y, g):
  return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu_output_vjp.defvjp(_relu_fwd, _relu_bwd)


def _svhn_decode(params: Sequence[tuple[Array, Array]], z: Array, impl: str) -> Array:
  """The SVHN decoder as a pure function: z (N, D) → mean (N, 32, 32, 3).

  With a matmul impl the output of layer i is tagged ``checkpoint_name(_, "svhn_decoder_act{i}")``
  so that the remat policy of `SvhnDecoder` (``REMAT_SAVED``) keeps some of them, and never
  im2col buffers, for the backward pass.
  """
  chex.assert_rank(z, 2)
  matmul = impl != "conv"
  h = z.reshape(z.shape[0], 1, 1, z.shape[1])
  last = len(params) - 1
  for i, (kernel, bias) in enumerate(params):
    stride, padding = (1, 0) if i == 0 else (2, 1)
    h = conv_transpose(h, kernel, bias, stride=stride, padding=padding, impl=impl)
    if i == last:
      h = nn.sigmoid(h)  # its backward reads the output only
    else:
      h = relu_output_vjp(h) if matmul else nn.relu(h)
    if matmul:
      h = checkpoint_name(h, _ACT.format(i + 1))
  chex.assert_shape(h, (z.shape[0],) + SVHN_SHAPE)
  return h


def _map_in_chunks(fn: Callable[[Array], Array], x: Array, chunk_size: int) -> Array:
  """fn over x (N, ...) in ≈equal chunks of at most `chunk_size` rows (``lax.map``).

  N is zero-padded up to a multiple of the chunk length; the padding rows are dropped.
  """
  n = x.shape[0]
  num_chunks = -(-n // chunk_size)
  if num_chunks <= 1:
    return fn(x)
  length = -(-n // num_chunks)
  pad = num_chunks * length - n
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
  out = lax.map(fn, x.reshape((num_chunks, length) + x.shape[1:]))
  out = out.reshape((num_chunks * length,) + out.shape[2:])
  return out[:n] if pad else out


class SvhnDecoder(nn.Module):
  """CNN decoder: z (..., latent_dim) → mean (..., 32, 32, 3) in (0, 1).

  ConvT D→128 (4,1,0) + ReLU (1×1 → 4×4) → ConvT 128→64 (4,2,1) + ReLU (8×8) →
  ConvT 64→32 (4,2,1) + ReLU (16×16) → ConvT 32→3 (4,2,1) + Sigmoid (32×32).
  Parameters ``deconv1``..``deconv4``, each ``{"kernel": (4, 4, C_in, C_out), "bias": (C_out,)}``:
  the ``flax.linen.ConvTranspose`` tree (padding k−1−p per side), for every ``impl``.

  Attributes:
    impl: "conv" (XLA convolutions), "matmul" (matmul forms, several times faster on XLA:CPU),
      "window" or "col2im" (force one matmul form), "auto" (matmul on CPU, conv elsewhere).
      The matmul forms have hand-written backward passes (``jax.custom_vjp``): reverse-mode
      only; use "conv" for forward-mode differentiation (jvp, jacfwd).
    chunk_size: latents are decoded in ``lax.map`` chunks of at most this many (N is padded to
      a multiple of the chunk length). With a matmul impl the decoder is also rematerialised
      with a policy that keeps only the activations of layers 2-4 for the backward pass, so
      the backward's temporaries are per chunk: at N = 7680 (K=30, B=128, two modalities) the
      decoder's fwd+bwd needs ≈390 MB of XLA temporaries (remat="minimal"; ≈630 MB with
      "activations") instead of ≈2.4 GB unchunked, and runs ≈10% faster.
      -1 (default): ``DEFAULT_CHUNK_SIZE`` with a matmul impl, no chunking with "conv";
      0: never chunk.
    remat: which activations a matmul impl keeps for the backward pass (layer 1's output, one
      small matmul away, is always recomputed). "minimal" (default): the outputs of layers 2
      and 4; layer 3's (N·32 KiB, 240 MiB at N = 7680) is recomputed from layer 2's in the
      backward pass: +17% decoder FLOPs but measured no slower (less memory traffic), and the
      K=30, B=128 DReG training step (benchmarks/train_step.py) peaks at ≈1.3 GB RSS instead
      of ≈1.6 GB.
      "activations": keep the outputs of layers 2, 3 and 4.
  """
  latent_dim: int = 20
  width: int = 32
  impl: str = "auto"
  chunk_size: int = -1
  remat: str = "minimal"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chex.assert_axis_dimension(z, -1, self.latent_dim)
    chans = (self.latent_dim, 4 * self.width, 2 * self.width, self.width, SVHN_SHAPE[-1])
    params = [ConvTransposeParams(chans[i], chans[i + 1], 4, name=f"deconv{i + 1}")()
              for i in range(4)]
    impl = resolve_impl(self.impl)
    if self.remat not in REMAT_SAVED:
      raise ValueError(f"remat={self.remat!r}; expected one of {tuple(REMAT_SAVED)}")
    zf, lead = _flatten_leading(z, 1)
    chunk_size = self.chunk_size
    if chunk_size < 0:
      chunk_size = 0 if impl == "conv" else DEFAULT_CHUNK_SIZE
    mean = _svhn_decoder_apply(params, zf, impl=impl, chunk_size=chunk_size, remat=self.remat)
    mean = mean.reshape(lead + SVHN_SHAPE)
    chex.assert_shape(mean, lead + SVHN_SHAPE)
    return mean


# jit: inlined under an outer jit; outside one (e.g. `init`, eager `apply`) it compiles the
# decoder once per shape instead of dispatching (and compiling) it op by op (≈2 s → 0.6 s).
@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "remat"))
def _svhn_decoder_apply(params: Sequence[tuple[Array, Array]], z: Array, *, impl: str,
                        chunk_size: int, remat: str) -> Array:
  """`_svhn_decode` (z (N, D) → mean (N, 32, 32, 3)) with its remat policy and chunking."""
  fn = functools.partial(_svhn_decode, params, impl=impl)
  if impl != "conv":
    policy = jax.checkpoint_policies.save_only_these_names(*REMAT_SAVED[remat])
    fn = jax.checkpoint(fn, policy=policy)
  return _map_in_chunks(fn, z, chunk_size) if chunk_size else fn(z)
