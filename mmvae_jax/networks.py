"""Encoders and decoders of the MNIST-SVHN MMVAE (flax.linen), PyTorch layer semantics.

Layers as the official code's MNIST MLP and SVHN CNN (tables in the class docstrings);
initialisation: PyTorch's defaults (see ``mmvae_jax.layers``). Images are NHWC float32 in [0, 1].

Encoders return ``(loc, scale_logits)``: the raw outputs of the two heads. The scale
constraint (softmax(v)·D + 1e-6 in the official code) is applied by the model, not here.
Decoders return the likelihood's mean (MNIST: clamped to [1e-6, 1 − 1e-6]; SVHN: sigmoid).

Every module accepts any leading batch shape: encoders (..., H, W, C) → (..., D), decoders
(..., D) → (..., H, W, C). Leading axes are flattened to one batch axis internally (in
row-major order) and restored afterwards; nothing is squeezed, so a batch of one keeps its axis.

Parameter counts at D = 20, as the official networks: MNIST encoder 330,040, decoder 322,784;
SVHN encoder 247,560, decoder 206,563.

The SVHN decoder is the hot path of training (it decodes M·K·B latents per step). Its
transposed convolutions have two formulations sharing one parameter tree (``impl``): XLA
convolutions ("conv", for GPU/TPU) and matmul forms ("matmul", for XLA:CPU, several times
faster there); "auto" picks by backend. See ``mmvae_jax.layers``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mmvae_jax.layers import (count_params, flatten_leading,  # noqa: F401
                              Conv2d, ConvTransposeParams, Dense, conv_transpose,
                              conv_transpose_out_size, matmul_forward, matmul_variant,
                              matmul_backward, matmul_weight, resolve_impl)

Array = jax.Array

MNIST_SHAPE = (28, 28, 1)
SVHN_SHAPE = (32, 32, 3)
ETA = 1e-6  # clamp of the MNIST decoder's mean (official Constants.eta)

# Latents per chunk of the SVHN decoder in its matmul form (chunk_size=-1): the fastest on the
# 2-core CPU at K = 1, 10 and 30 (see `SvhnDecoder.chunk_size`).
DEFAULT_CHUNK_SIZE = 32
# What the matmul SVHN decoder keeps for its backward pass (see `SvhnDecoder.remat`).
REMAT_MODES = ("auto", "minimal", "activations")
# remat="auto" keeps layer 3's output (N·16·16·32 float32) while it fits in this many bytes.
KEEP_ACT3_MAX_BYTES = 128 << 20


# ------------------------------------------------------------------------------------------------
# MNIST (the official MLP)
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
    x, lead = flatten_leading(x, 3)
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
# SVHN (the official CNN)
# ------------------------------------------------------------------------------------------------

class SvhnEncoder(nn.Module):
  """CNN encoder: (..., 32, 32, 3) → (loc, scale_logits), each (..., latent_dim).

  Conv 3→32 (4,2,1) + ReLU → 32→64 (4,2,1) + ReLU → 64→128 (4,2,1) + ReLU (4×4×128) → two heads
  Conv 128→D (4,1,0) (a 4×4 valid convolution to 1×1). Parameters: ``conv1``..``conv3``,
  ``c1`` (loc), ``c2`` (scale logits); kernels (k, k, C_in, C_out). Unlike the official code
  the batch axis is never squeezed (a batch of one stays (1, D); see
  docs/official-code.md#batch-of-one).
  """
  latent_dim: int = 20
  width: int = 32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    x, lead = flatten_leading(x, 3)
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


def _svhn_decode_conv(params: Sequence[tuple[Array, Array]], z: Array) -> Array:
  """The SVHN decoder with XLA transposed convolutions: z (N, D) → mean (N, 32, 32, 3)."""
  chex.assert_rank(z, 2)
  h = z.reshape(z.shape[0], 1, 1, z.shape[1])
  last = len(params) - 1
  for i, (kernel, bias) in enumerate(params):
    stride, padding = (1, 0) if i == 0 else (2, 1)
    h = conv_transpose(h, kernel, bias, stride=stride, padding=padding, impl="conv")
    h = nn.sigmoid(h) if i == last else nn.relu(h)
  chex.assert_shape(h, (z.shape[0],) + SVHN_SHAPE)
  return h


def _chain_forward(variants: tuple[str, ...], weights: Sequence[Array],
                   biases: Sequence[Array], z: Array) -> list[Array]:
  """Post-activations [a1, .., a4] of the matmul-form decoder (ReLU, ..., ReLU, sigmoid)."""
  h = z.reshape(z.shape[0], 1, 1, z.shape[1])
  acts = []
  for i, (variant, w, b) in enumerate(zip(variants, weights, biases)):
    y = matmul_forward(variant, h, w, b.shape[0]) + b
    h = jax.nn.sigmoid(y) if i == len(variants) - 1 else jnp.maximum(y, 0.0)
    acts.append(h)
  return acts


def _chain_backward(variants: tuple[str, ...], weights: Sequence[Array], biases: Sequence[Array],
                    z: Array, a2: Array, a3: Array | None, out: Array, g: Array):
  """VJP of the matmul-form decoder on one chunk from its kept activations: (gw, gb, gz)."""
  x0 = z.reshape(z.shape[0], 1, 1, z.shape[1])
  a1 = jnp.maximum(matmul_forward(variants[0], x0, weights[0], biases[0].shape[0]) + biases[0],
                   0.0)
  if a3 is None:
    a3 = jnp.maximum(matmul_forward(variants[2], a2, weights[2], biases[2].shape[0])
                     + biases[2], 0.0)
  inputs, outputs = (x0, a1, a2, a3), (a1, a2, a3, out)
  grad_w, grad_b = [None] * 4, [None] * 4
  gy = g * out * (1.0 - out)  # sigmoid'
  for i in reversed(range(4)):
    if i < 3:
      gy = jnp.where(outputs[i] > 0, gx, 0.0)  # ReLU' read from the output
    grad_b[i] = jnp.sum(gy, axis=(0, 1, 2))
    gx, grad_w[i] = matmul_backward(variants[i], inputs[i], weights[i], gy)
  return tuple(grad_w), tuple(grad_b), gx.reshape(z.shape)


def _chunk_layout(n: int, chunk_size: int) -> tuple[int, int]:
  """(number of chunks, chunk length): ≈equal chunks of at most `chunk_size` (0: one chunk)."""
  num_chunks = max(1, -(-n // chunk_size)) if chunk_size else 1
  return num_chunks, -(-n // num_chunks)


def _to_chunks(x: Array, num_chunks: int, length: int) -> Array:
  """(N, ...) → (num_chunks, length, ...), zero-padded at the end."""
  pad = num_chunks * length - x.shape[0]
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
  return x.reshape((num_chunks, length) + x.shape[1:])


def _from_chunks(x: Array, n: int) -> Array:
  x = x.reshape((-1,) + x.shape[2:])
  return x[:n] if x.shape[0] != n else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _decode_chain(variants: tuple[str, ...], keep_act3: bool, chunk_size: int,
                  weights: Sequence[Array], biases: Sequence[Array], z: Array) -> Array:
  """The matmul-form SVHN decoder with a hand-written backward pass: z (N, D) → (N, 32, 32, 3).

  ``weights[i]`` is ``matmul_weight(variants[i], kernel_i)``. Latents are decoded in chunks of
  at most ``chunk_size`` (0: one chunk) by a ``lax.map``; the backward pass is a ``lax.scan``
  over the same chunks that accumulates the weight gradients. Kept for the backward pass: the
  outputs of layers 2 and 4 (and layer 3's if ``keep_act3``); layer 1 (one small matmul) and,
  unless kept, layer 3 (one matmul from layer 2's output) are recomputed per chunk.

  One custom VJP for the whole decoder, because a ``jax.checkpoint`` policy cannot name the
  residuals of the layers' own custom VJPs (the ReLU/sigmoid backward passes read the output):
  under a policy XLA recomputed every layer's forward matmul, and scan's autodiff stacked the
  output twice (as output and as residual).
  """
  forward = lambda zi: _chain_forward(variants, weights, biases, zi)[-1]
  return _map_in_chunks(forward, z, chunk_size)


def _decode_chain_fwd(variants, keep_act3, chunk_size, weights, biases, z):
  n = z.shape[0]
  zc = _to_chunks(z, *_chunk_layout(n, chunk_size))

  def chunk(zi):
    _, a2, a3, out = _chain_forward(variants, weights, biases, zi)
    return a2, (a3 if keep_act3 else None), out

  a2, a3, out = lax.map(chunk, zc)
  return _from_chunks(out, n), (weights, biases, zc, a2, a3, out)


def _decode_chain_bwd(variants, keep_act3, chunk_size, res, g):
  weights, biases, zc, a2, a3, out = res
  gc = _to_chunks(g, zc.shape[0], zc.shape[1])  # padding rows get a zero cotangent

  def chunk(acc, xs):
    zi, a2i, a3i, outi, gi = xs
    gw, gb, gz = _chain_backward(variants, weights, biases, zi, a2i, a3i, outi, gi)
    return jax.tree_util.tree_map(jnp.add, acc, (gw, gb)), gz

  zeros = jax.tree_util.tree_map(jnp.zeros_like, (tuple(weights), tuple(biases)))
  (gw, gb), gz = lax.scan(chunk, zeros, (zc, a2, a3, out, gc))
  return type(weights)(gw), type(biases)(gb), _from_chunks(gz, g.shape[0])


_decode_chain.defvjp(_decode_chain_fwd, _decode_chain_bwd)


def _map_in_chunks(fn: Callable[[Array], Array], x: Array, chunk_size: int) -> Array:
  """fn over x (N, ...) in ≈equal chunks of at most `chunk_size` rows (``lax.map``; 0: one call).

  N is zero-padded up to a multiple of the chunk length; the padding rows are dropped.
  """
  num_chunks, length = _chunk_layout(x.shape[0], chunk_size)
  if num_chunks == 1:
    return fn(x)
  return _from_chunks(lax.map(fn, _to_chunks(x, num_chunks, length)), x.shape[0])


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
    chunk_size: latents are decoded in chunks of at most this many (N is padded to a
      multiple of the chunk length): a ``lax.map`` forward and, with a matmul impl, a
      ``lax.scan`` backward, so that temporaries are per chunk and only the activations
      named by ``remat`` are kept across chunks. -1 (default): ``DEFAULT_CHUNK_SIZE`` (32)
      with a matmul impl, no chunking with "conv"; 0: never chunk. Small chunks keep each
      layer's working set in cache: benchmarks/train_step.py at K = 10 (B = 128, DReG) took
      0.90 s/step with chunks of 512, 0.81 s with 128, 0.75 s with 64, 0.75-0.79 s with 32;
      at K = 1, 0.14-0.15 s (512) vs 0.115-0.12 s (64); larger chunks were slower still
      (1.02 s unchunked at K = 10). With every layer in col2im form and freed host memory
      retained (`mmvae_jax.hostmem`), interleaved in one process: K = 1, 102.6 ms (32) vs
      102.8 ms (64) vs 110.1 ms (128); K = 10, 736 ms (32) vs 749 ms (64).
    remat: which activations a matmul impl keeps for its hand-written backward pass (layer 1's
      output, one small matmul away, is always recomputed). "minimal": the outputs of layers
      2 and 4; layer 3's (N·32 KiB) is recomputed from layer 2's (one more matmul per chunk).
      "activations": the outputs of layers 2, 3 and 4. "auto" (default): "activations" while
      layer 3's output fits in ``KEEP_ACT3_MAX_BYTES`` (N ≤ 4,096: K ≤ 16 at B = 128 with two
      modalities), else "minimal". Measured with benchmarks/train_step.py (B = 128, DReG,
      chunks of 512): K = 10, "activations" 0.93-0.95 s/step vs "minimal" 0.95-0.97 s, +90 MB
      peak RSS; at K = 30 "minimal" keeps the peak under the official code's 1.5 GB.
  """
  latent_dim: int = 20
  width: int = 32
  impl: str = "auto"
  chunk_size: int = -1
  remat: str = "auto"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chex.assert_axis_dimension(z, -1, self.latent_dim)
    chans = (self.latent_dim, 4 * self.width, 2 * self.width, self.width, SVHN_SHAPE[-1])
    params = [ConvTransposeParams(chans[i], chans[i + 1], 4, name=f"deconv{i + 1}")()
              for i in range(4)]
    impl = resolve_impl(self.impl)
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_MODES}")
    zf, lead = flatten_leading(z, 1)
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
  """The SVHN decoder z (N, D) → mean (N, 32, 32, 3), in chunks of ``chunk_size`` latents."""
  if impl == "conv":
    fn = functools.partial(_svhn_decode_conv, params)
  else:
    size = 1
    variants, sizes = [], []
    for i, (kernel, _) in enumerate(params):
      stride, padding = (1, 0) if i == 0 else (2, 1)
      variant = matmul_variant(size, size, kernel.shape, stride, padding, impl)
      assert variant is not None, (i, kernel.shape, impl)
      variants.append(variant)
      size = conv_transpose_out_size(size, kernel.shape[0], stride, padding)
      sizes.append(size)
    weights = tuple(matmul_weight(v, k) for v, (k, _) in zip(variants, params))
    biases = tuple(b for _, b in params)
    act3_bytes = z.shape[0] * sizes[2] ** 2 * biases[2].shape[0] * z.dtype.itemsize
    keep_act3 = remat == "activations" or (remat == "auto" and act3_bytes <= KEEP_ACT3_MAX_BYTES)
    return _decode_chain(tuple(variants), keep_act3, chunk_size, weights, biases, z)
  return _map_in_chunks(fn, z, chunk_size)
