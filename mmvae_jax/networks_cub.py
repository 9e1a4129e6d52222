"""CUB networks: the sentence CNN, the ResNet-feature MLP and the modalities of the cubISft model.

Sentence CNN (``SentenceEncoder`` / ``SentenceDecoder``). Tokens (B, 32) are embedded into a
1-channel "image" (B, 32 positions, 128 embedding dims, 1) and convolved down to 1×1; the decoder
mirrors it and ends in a ReLU, a reshape to (…, 32, 128) and the output layer tied to the
embedding: logits = h·Eᵀ + c, E the encoder's (V, 128) embedding matrix, c the decoder's own bias.
``variant="ft"`` is the network of cubISft (convolutions with bias, channels
32-64-128-256-512), ``variant="cubS"`` the raw-image model's (no bias, 32-64-128-128-128).
Parameter counts at D = 64, V = 1590: ft encoder 2,074,912 and decoder 1,348,567 (1,552,087
counting the tied matrix); cubS encoder 762,048 and decoder 429,046 (632,566).

Padding index (docs/official-code.md#padding-index-of-the-caption-embedding): the embedding row `padding_idx` is zero at initialisation and
its lookups pass no gradient to the matrix (the output layer still uses and trains that row).
The official code uses index 0, which is ``<exc>`` (OOV), not ``<pad>``; see
`mmvae_jax.data.captions.padding_index`.

BatchNorm (docs/official-code.md#batchnorm-statistics). Every `BatchNorm` here normalises with the statistics of the
batch it sees (PyTorch's train mode) unless population statistics are passed in the
``batch_stats`` collection (eval mode). The MMVAE's parameter tree holds no running statistics, so
training is unchanged (`mmvae_jax.train` is a pure step over ``params``). Evaluation uses
*population* statistics computed by `population_batch_stats` ("precise BN": batch means and
unbiased batch variances averaged over training batches at the evaluated parameters) and stored
beside the parameters as ``params["batch_stats"]``. Differences from the official code: it keeps
exponential running averages (momentum 0.1) updated during training, and its decoders see one
expert's K·B samples per call, where `MMVAE.decode` decodes all M experts' samples at once, so the
training-mode decoder statistics are over M·K·B rows.

Image-feature MLP (``FeatureEncoder`` / ``FeatureDecoder``): 2048 → 1024 → 512 → 256 with
ELU, two heads; the decoder mirrors it with a linear 2048-d output (the Laplace mean).
Encoder 2,787,200 and decoder 2,772,736 parameters at D = 64.

`cub_modalities` / `cub_model` build the official cubISft: both experts Normal with softplus + 1e-6
scales, a Normal(0, softplus(ℓ) + 1e-6) prior with learned ℓ, a Laplace(·, 0.01) feature
likelihood with λ_image = 32/2048 (0.002 in the README run) and the token Categorical likelihood
with λ = 1. Its networks total 8,983,415 parameters; with the 64 prior logits 8,983,479 (the
official 8,983,543 also counts the frozen 64-entry prior mean).

Initialisation is PyTorch's default: Linear/Conv U(±1/sqrt(fan_in)), ConvTranspose
U(±1/sqrt(C_out·kh·kw)), Embedding N(0, 1), BatchNorm γ = 1, β = 0.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mmvae_jax import distributions as dists
from mmvae_jax.layers import (Dense, count_params, flatten_leading,  # noqa: F401
                               conv_bound, conv_transpose, conv_transpose_bound,
                              torch_uniform)
from mmvae_jax.models.base import Modality

Array = jax.Array

FEATURE_DIM = 2048
SENTENCE_LENGTH = 32
EMBEDDING_DIM = 128
VOCAB_SIZE = 1590
BN_EPS = 1e-5
FEATURE_LLIK_SCALE = 0.01
VARIANTS = {"ft": ((32, 64, 128, 256, 512), True), "cubS": ((32, 64, 128, 128, 128), False)}

# (kernel, stride, padding) of the five encoder convolutions (the decoder runs them backwards).
_SQUARE = ((4, 4), (2, 2), (1, 1))
_WIDE = ((1, 4), (1, 2), (0, 1))
_LAYERS = (_SQUARE, _SQUARE, _SQUARE, _WIDE, _WIDE)


# ---------------------------------------------------------------------------------------------
# Layers.


class Conv(nn.Module):
  """``torch.nn.Conv2d`` with rectangular kernel/stride/padding, NHWC, optional bias."""
  features: int
  kernel_size: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chex.assert_rank(x, 4)
    bound = conv_bound(x.shape[-1], self.kernel_size)
    kernel = self.param("kernel", torch_uniform(bound),
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    y = lax.conv_general_dilated(x, kernel, window_strides=self.stride,
                                 padding=tuple((p, p) for p in self.padding),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", torch_uniform(bound), (self.features,))
    return y


class ConvTranspose(nn.Module):
  """``torch.nn.ConvTranspose2d`` (rectangular), NHWC, kernel (kh, kw, C_in, C_out) in the
  flax/lax ``conv_transpose`` convention (`mmvae_jax.layers`), optional bias.

  (4, 2, 1) layers use `mmvae_jax.layers.conv_transpose` (matmul forms on CPU when `impl` is
  "auto"); other shapes use ``lax.conv_transpose`` with padding k − 1 − p per side.
  """
  features: int
  kernel_size: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  use_bias: bool = True
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chex.assert_rank(x, 4)
    bound = conv_transpose_bound(self.features, self.kernel_size)
    kernel = self.param("kernel", torch_uniform(bound),
                        tuple(self.kernel_size) + (x.shape[-1], self.features))
    bias = (self.param("bias", torch_uniform(bound), (self.features,)) if self.use_bias
            else jnp.zeros((self.features,), x.dtype))
    if (tuple(self.kernel_size), tuple(self.stride), tuple(self.padding)) == _SQUARE or (
        tuple(self.kernel_size) == (4, 4) and tuple(self.stride) == (1, 1)
        and tuple(self.padding) == (0, 0) and x.shape[1:3] == (1, 1)):
      return conv_transpose(x, kernel, bias, stride=self.stride[0], padding=self.padding[0],
                            impl=self.impl)
    pads = tuple((k - 1 - p, k - 1 - p) for k, p in zip(self.kernel_size, self.padding))
    y = lax.conv_transpose(x, kernel, strides=self.stride, padding=pads,
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d``/``1d`` over the last (channel) axis, γ = 1, β = 0, eps 1e-5.

  Train mode (no ``batch_stats`` collection given): normalises with the biased statistics of the
  batch over every axis but the last, and sows (``"bn_moments"``, mutable on request) the batch
  mean and the *unbiased* variance for `population_batch_stats`. Eval mode (``batch_stats`` with
  ``mean`` and ``var`` given): normalises with those.
  """
  epsilon: float = BN_EPS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    if self.has_variable("batch_stats", "mean"):
      mean = self.get_variable("batch_stats", "mean")
      var = self.get_variable("batch_stats", "var")
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      n = math.prod(x.shape[:-1])
      self.sow("bn_moments", "mean", mean)
      self.sow("bn_moments", "var", var * (n / max(n - 1, 1)))
    return (x - mean) * lax.rsqrt(var + self.epsilon) * scale + bias


# ---------------------------------------------------------------------------------------------
# Sentence CNN.


def embedding_init(padding_idx: int):
  """N(0, 1) with row `padding_idx` zeroed (``torch.nn.Embedding(padding_idx=…)``)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype).at[padding_idx].set(0.0)
  return init


def embed(tokens: Array, embedding: Array, padding_idx: int) -> Array:
  """Lookup with PyTorch's padding-index semantics: the current row, no gradient to it."""
  tok = tokens.astype(jnp.int32)
  out = jnp.take(embedding, tok, axis=0)
  return jnp.where((tok == padding_idx)[..., None], lax.stop_gradient(out), out)


class SentenceEncoder(nn.Module):
  """Tokens (B, 32) (int or float ids) → (loc, scale pre-activation), each (B, D).

  Parameters: ``embedding`` (V, 128), ``conv{1..5}``, ``bn{1..5}``, ``c1`` (loc), ``c2`` (scale).
  """
  latent_dim: int = 64
  vocab_size: int = VOCAB_SIZE
  padding_idx: int = 0
  variant: str = "ft"

  @nn.compact
  def __call__(self, tokens: Array) -> tuple[Array, Array]:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown sentence-CNN variant {self.variant!r}: choose {sorted(VARIANTS)}")
    chex.assert_shape(tokens, (None, SENTENCE_LENGTH))
    channels, bias = VARIANTS[self.variant]
    emb = self.param("embedding", embedding_init(self.padding_idx),
                     (self.vocab_size, EMBEDDING_DIM))
    h = embed(tokens, emb, self.padding_idx)[..., None]  # (B, 32, 128, 1)
    for i, (c, (k, s, p)) in enumerate(zip(channels, _LAYERS)):
      h = Conv(c, k, s, p, use_bias=bias, name=f"conv{i + 1}")(h)
      h = nn.relu(BatchNorm(name=f"bn{i + 1}")(h))
    chex.assert_shape(h, (tokens.shape[0], 4, 4, channels[-1]))
    loc = Conv(self.latent_dim, (4, 4), use_bias=bias, name="c1")(h)
    pre = Conv(self.latent_dim, (4, 4), use_bias=bias, name="c2")(h)
    chex.assert_shape([loc, pre], (tokens.shape[0], 1, 1, self.latent_dim))
    return loc.reshape(-1, self.latent_dim), pre.reshape(-1, self.latent_dim)


class SentenceDecoder(nn.Module):
  """(z (..., D), embedding (V, 128)) → token logits (..., 32, V).

  Parameters: ``deconv{1..6}``, ``bn{1..5}``, ``out_bias`` (V,) U(±1/sqrt(128)); the output
  weight is the encoder's embedding, passed in (tied).
  """
  latent_dim: int = 64
  variant: str = "ft"
  impl: str = "auto"

  @nn.compact
  def __call__(self, z: Array, embedding: Array) -> Array:
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown sentence-CNN variant {self.variant!r}: choose {sorted(VARIANTS)}")
    chex.assert_axis_dimension(z, -1, self.latent_dim)
    chex.assert_shape(embedding, (None, EMBEDDING_DIM))
    channels, bias = VARIANTS[self.variant]
    zf, lead = flatten_leading(z, 1)
    h = zf.reshape(zf.shape[0], 1, 1, self.latent_dim)
    outs = tuple(reversed(channels)) + (1,)
    layers = ((((4, 4), (1, 1), (0, 0))),) + tuple(reversed(_LAYERS))
    for i, (c, (k, s, p)) in enumerate(zip(outs, layers)):
      h = ConvTranspose(c, k, s, p, use_bias=bias, impl=self.impl, name=f"deconv{i + 1}")(h)
      if i < len(outs) - 1:
        h = BatchNorm(name=f"bn{i + 1}")(h)
      h = nn.relu(h)
    chex.assert_shape(h, (zf.shape[0], SENTENCE_LENGTH, EMBEDDING_DIM, 1))
    out_bias = self.param("out_bias", torch_uniform(1.0 / math.sqrt(EMBEDDING_DIM)),
                          (embedding.shape[0],))
    logits = jnp.einsum("nte,ve->ntv", h[..., 0], embedding) + out_bias
    return logits.reshape(lead + (SENTENCE_LENGTH, embedding.shape[0]))


# ---------------------------------------------------------------------------------------------
# Image-feature MLP.


class FeatureEncoder(nn.Module):
  """ResNet features (B, 2048) → (loc, scale pre-activation), each (B, D)."""
  latent_dim: int = 64
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    chex.assert_shape(x, (None, self.feature_dim))
    h = x
    for i, width in enumerate((1024, 512, 256)):
      h = nn.elu(Dense(width, name=f"fc{i + 1}")(h))
    loc, pre = Dense(self.latent_dim, name="fc21")(h), Dense(self.latent_dim, name="fc22")(h)
    chex.assert_shape([loc, pre], (x.shape[0], self.latent_dim))
    return loc, pre


class FeatureDecoder(nn.Module):
  """z (..., D) → feature means (..., 2048), a linear output (no activation)."""
  latent_dim: int = 64
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chex.assert_axis_dimension(z, -1, self.latent_dim)
    h = z
    for i, width in enumerate((256, 512, 1024)):
      h = nn.elu(Dense(width, name=f"fc{i + 1}")(h))
    return Dense(self.feature_dim, name="fc31")(h)


# ---------------------------------------------------------------------------------------------
# The model.


def is_tied(modality: Modality) -> bool:
  """Whether the modality's decoder takes its encoder's embedding (a sentence modality)."""
  return isinstance(modality, SentenceModality)


@dataclasses.dataclass(frozen=True)
class SentenceModality(Modality):
  """The caption modality: its decoder's output layer is its encoder's embedding (tied).

  Its BatchNorm layers read population statistics from ``params["batch_stats"]`` when present
  (`population_batch_stats`); absent (training), every BatchNorm uses its batch's statistics.
  """
  init_batch = 2  # BatchNorm needs more than one row to initialise

  def init(self, k_enc, k_dec, latent_dim):
    x = jnp.zeros((self.init_batch,) + tuple(self.data_shape), jnp.float32)
    enc = self.encoder.init(k_enc, x)["params"]
    dec = self.decoder.init(k_dec, jnp.zeros((1, latent_dim)), enc["embedding"])["params"]
    return enc, dec

  def decoder_inputs(self, params) -> tuple:
    return (params["encoders"][self.name]["embedding"],)


def population_batch_stats(model, params: dict, batches: Iterable[Sequence[Array]],
                           key: jax.Array, num_samples: int = 1) -> dict:
  """Population BatchNorm statistics at `params` ("precise BN"), for evaluation.

  Each batch (M arrays (B, *data_shape_m), the model's modalities in order) is encoded in train
  mode; every decoder is applied, once per expert, to `num_samples` posterior samples of that
  expert (as the official decoder calls). The batch means and unbiased variances of every
  BatchNorm are averaged over the batches.

  Returns:
    {"encoders"|"decoders": {name: statistics tree}} for the modules that have BatchNorm; put it
    at ``params["batch_stats"]`` to evaluate in eval mode.
  """
  train_params = {k: v for k, v in params.items() if k != "batch_stats"}

  def moments(module, variables, *args):
    _, state = module.apply(variables, *args, mutable=["bn_moments"])
    return jax.tree.map(lambda t: t[0], state.get("bn_moments", {}),
                        is_leaf=lambda t: isinstance(t, tuple))

  @jax.jit
  def one(p, xs, k):
    out = {"encoders": {}, "decoders": {}}
    posteriors = []
    for m, x in zip(model.modalities, xs):
      out["encoders"][m.name] = moments(m.encoder, {"params": p["encoders"][m.name]}, x)
      posteriors.append(model.expert(p, m.name, x))
    keys = jax.random.split(k, len(posteriors))
    zs = [q.sample(seed=kk, sample_shape=(num_samples,)) for q, kk in zip(posteriors, keys)]
    for m in model.modalities:
      extra = m.decoder_inputs(p)
      per_expert = [moments(m.decoder, {"params": p["decoders"][m.name]}, z, *extra) for z in zs]
      out["decoders"][m.name] = jax.tree.map(lambda *a: sum(a) / len(a), *per_expert)
    return out

  total, count = None, 0
  for i, xs in enumerate(batches):
    stats = one(train_params, tuple(jnp.asarray(x) for x in xs), jax.random.fold_in(key, i))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    count += 1
  if not count:
    raise ValueError("population_batch_stats needs at least one batch")
  mean = jax.tree.map(lambda t: t / count, total)
  return {side: {n: s for n, s in mean[side].items() if s} for side in mean}


def _sentence_modality(latent_dim, vocab_size, padding_quirk, variant, impl, llik_scale=1.0):
  from mmvae_jax.data.captions import padding_index
  pad = padding_index(padding_quirk)
  return SentenceModality(
      name="sentence",
      encoder=SentenceEncoder(latent_dim=latent_dim, vocab_size=vocab_size, padding_idx=pad,
                              variant=variant),
      decoder=SentenceDecoder(latent_dim=latent_dim, variant=variant, impl=impl),
      data_shape=(SENTENCE_LENGTH,), llik_scale=llik_scale,
      log_likelihood=functools.partial(dists.categorical_log_likelihood, ignore_index=pad),
      posterior_family="normal", posterior_scale=dists.softplus_scale)


def _image_modality(latent_dim, llik_scale):
  return Modality(
      name="image", encoder=FeatureEncoder(latent_dim=latent_dim),
      decoder=FeatureDecoder(latent_dim=latent_dim), data_shape=(FEATURE_DIM,),
      llik_scale=llik_scale,
      log_likelihood=functools.partial(dists.laplace_log_likelihood, scale=FEATURE_LLIK_SCALE,
                                       event_ndim=1),
      posterior_family="normal", posterior_scale=dists.softplus_scale)


def default_image_llik_scale() -> float:
  """λ_image of cubISft when --llik_scaling is 0: 32/2048 (sentence length / feature size)."""
  return SENTENCE_LENGTH / FEATURE_DIM


def cub_modalities(latent_dim: int = 64, *, llik_scaling: float = 0.0,
                   vocab_size: int = VOCAB_SIZE, padding_quirk: bool = True, variant: str = "ft",
                   decoder_impl: str = "auto") -> tuple[Modality, Modality]:
  """The modalities ("image", "sentence") of the CUB image-feature + caption model.

  Args:
    llik_scaling: λ_image; 0 means 32/2048 (the README run of the official code uses 0.002).
      Sentence λ = 1.
    vocab_size: V (the official vocabulary has 1590 words).
    padding_quirk: index 0 (``<exc>``, as the official code) or 1 (``<pad>``) is the padding
      token the likelihood ignores (docs/official-code.md#padding-index-of-the-caption-embedding).
    variant: sentence CNN "ft" (cubISft) or "cubS".
  """
  lam = llik_scaling if llik_scaling else default_image_llik_scale()
  return (_image_modality(latent_dim, lam),
          _sentence_modality(latent_dim, vocab_size, padding_quirk, variant, decoder_impl))


def cub_model(kind: str = "mmvae", latent_dim: int = 64, *, llik_scaling: float = 0.0,
              vocab_size: int = VOCAB_SIZE, learn_prior: bool = True, padding_quirk: bool = True,
              variant: str = "ft", decoder_impl: str = "auto"):
  """The cubISft model `kind` of the registry of `mmvae_jax.models` ("mmvae"; "vae_sentence",
  "vae_image": the single-modality VAEs, λ = 1; any other registered model over the same
  modalities) with a Normal(0, softplus(ℓ) + 1e-6) learned prior where the model has one."""
  from mmvae_jax import models
  mods = cub_modalities(latent_dim, llik_scaling=llik_scaling, vocab_size=vocab_size,
                        padding_quirk=padding_quirk, variant=variant, decoder_impl=decoder_impl)
  options = models.ModelOptions(latent_dim=latent_dim, learn_prior=learn_prior,
                                prior_family="normal", prior_scale=dists.softplus_scale)
  return models.build(kind, mods, options)
