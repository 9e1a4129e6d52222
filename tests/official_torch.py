"""An independent PyTorch implementation of the official MNIST-SVHN MMVAE and its objectives.

Written from a description of the official code's behaviour (its objectives, distributions and
scale constraints, networks and forward pass; docs/official-code.md lists where it departs from
the paper), not copied from any repository. It is a *reference* for tests and experiments, used to
check that the JAX port computes the same losses and gradients as the released code:

* `MnistEnc`, `MnistDec`, `SvhnEnc`, `SvhnDec`: the networks, NCHW, official layer order;
* `MMVAE`: encoders, Laplace experts ``Laplace(μ, softmax(v)·D + 1e-6)``, the learned prior
  ``Laplace(0, softmax(ℓ)·D)``, Laplace(·, 0.75) likelihoods, λ_MNIST = 3072/784, and the
  forward pass that decodes the M×M matrix of (encoder, decoder) pairs;
* `m_iwae_looser`, `m_iwae` and `m_dreg_looser` (the paper/README training objective as
  released: the DReG gradient hook is registered on a stacked *copy* of the samples that is not
  on the backward path, so it never fires; docs/official-code.md#the-dreg-hook-that-never-fires),
  and ``m_dreg_looser(..., hook_live=True)``, the hook on the live samples (true DReG, as
  intended);
* `state_dict_from_flax`: the parameters of `mmvae_jax.model.mnist_svhn()` (a flax tree, NHWC
  kernels) as this module's ``state_dict`` (PyTorch layouts); `flax_layout_to_torch` maps any
  tree of the same structure (e.g. gradients) the same way.

Every objective returns the value to *maximise*, summed over the batch (the training loss is its
negative). Noise can be injected: ``noise[m]`` of shape (K, B, D) is a standard-Laplace draw and
z_m = μ_m + s_m · noise[m] (the reparameterisation torch's ``Laplace.rsample`` uses, with its
own uniform draw, when ``noise`` is None).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Laplace

ETA = 1e-6
LIK_SCALE = 0.75


# ---------------------------------------------------------------------------------------------
# Networks (the official MNIST MLP and SVHN CNN). Inputs NCHW in [0, 1].


class MnistEnc(nn.Module):
  """784 → Linear 400 + ReLU → fc21 (μ), fc22 (scale pre-activation v)."""

  def __init__(self, latent_dim: int = 20, hidden: int = 400):
    super().__init__()
    self.fc1 = nn.Linear(784, hidden)
    self.fc21 = nn.Linear(hidden, latent_dim)
    self.fc22 = nn.Linear(hidden, latent_dim)

  def forward(self, x):
    h = F.relu(self.fc1(x.reshape(*x.shape[:-3], -1)))
    return self.fc21(h), self.fc22(h)


class MnistDec(nn.Module):
  """D → Linear 400 + ReLU → Linear 784 → sigmoid → (1, 28, 28) → clamp [1e-6, 1 − 1e-6]."""

  def __init__(self, latent_dim: int = 20, hidden: int = 400):
    super().__init__()
    self.fc1 = nn.Linear(latent_dim, hidden)
    self.fc3 = nn.Linear(hidden, 784)

  def forward(self, z):
    h = torch.sigmoid(self.fc3(F.relu(self.fc1(z))))
    return h.reshape(*z.shape[:-1], 1, 28, 28).clamp(ETA, 1 - ETA)


class SvhnEnc(nn.Module):
  """Conv 3→32→64→128 (4, 2, 1) + ReLU, then two Conv 128→D (4, 1, 0) heads."""

  def __init__(self, latent_dim: int = 20, width: int = 32):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 4, 2, 1)
    self.conv2 = nn.Conv2d(width, 2 * width, 4, 2, 1)
    self.conv3 = nn.Conv2d(2 * width, 4 * width, 4, 2, 1)
    self.c1 = nn.Conv2d(4 * width, latent_dim, 4, 1, 0)
    self.c2 = nn.Conv2d(4 * width, latent_dim, 4, 1, 0)

  def forward(self, x):
    h = F.relu(self.conv1(x))
    h = F.relu(self.conv2(h))
    h = F.relu(self.conv3(h))
    # The official code squeezes every axis (also a batch of one); only the 1×1 grid here.
    return self.c1(h).flatten(1), self.c2(h).flatten(1)


class SvhnDec(nn.Module):
  """z → (D, 1, 1) → ConvT D→128 (4,1,0) → 128→64 → 64→32 → 32→3 (4,2,1); ReLUs, sigmoid."""

  def __init__(self, latent_dim: int = 20, width: int = 32):
    super().__init__()
    self.deconv1 = nn.ConvTranspose2d(latent_dim, 4 * width, 4, 1, 0)
    self.deconv2 = nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1)
    self.deconv3 = nn.ConvTranspose2d(2 * width, width, 4, 2, 1)
    self.deconv4 = nn.ConvTranspose2d(width, 3, 4, 2, 1)

  def forward(self, z):
    lead = z.shape[:-1]
    h = z.reshape(-1, z.shape[-1], 1, 1)
    h = F.relu(self.deconv1(h))
    h = F.relu(self.deconv2(h))
    h = F.relu(self.deconv3(h))
    h = torch.sigmoid(self.deconv4(h))
    return h.reshape(*lead, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# The MMVAE: distributions, scale constraints, λ and the forward pass.


class MMVAE(nn.Module):
  """MNIST-SVHN MMVAE. Modality 0 is MNIST (λ = 3072/784), modality 1 SVHN (λ = 1)."""

  def __init__(self, latent_dim: int = 20):
    super().__init__()
    self.latent_dim = latent_dim
    self.enc = nn.ModuleList([MnistEnc(latent_dim), SvhnEnc(latent_dim)])
    self.dec = nn.ModuleList([MnistDec(latent_dim), SvhnDec(latent_dim)])
    self.prior_loc = nn.Parameter(torch.zeros(1, latent_dim), requires_grad=False)
    self.prior_logits = nn.Parameter(torch.zeros(1, latent_dim))  # --learn-prior
    self.llik_scaling = (3 * 32 * 32 / (1 * 28 * 28), 1.0)

  def prior(self):
    return Laplace(self.prior_loc, F.softmax(self.prior_logits, dim=-1) * self.latent_dim)

  def posterior(self, m: int, x):
    loc, v = self.enc[m](x)
    return Laplace(loc, F.softmax(v, dim=-1) * loc.shape[-1] + ETA)

  def forward(self, xs: Sequence[torch.Tensor], K: int, noise=None):
    """Returns (experts q_m, samples z_m (K, B, D), px_z[e][d] likelihood distributions)."""
    M = len(xs)
    qz_xs, zss = [], []
    px_zs = [[None] * M for _ in range(M)]
    for m, x in enumerate(xs):
      q = self.posterior(m, x)
      if noise is None:
        z = q.rsample(torch.Size([K]))
      else:
        z = q.loc + q.scale * noise[m]
      qz_xs.append(q)
      zss.append(z)
      px_zs[m][m] = Laplace(self.dec[m](z), LIK_SCALE)
    for e, z in enumerate(zss):
      for d in range(M):
        if e != d:
          px_zs[e][d] = Laplace(self.dec[d](z), LIK_SCALE)
    return qz_xs, zss, px_zs


# ---------------------------------------------------------------------------------------------
# Objectives (log weights, m_elbo, the IWAE and DReG bounds). Values to maximise, summed over
# the batch.


def log_mean_exp(value, dim=0):
  return torch.logsumexp(value, dim) - math.log(value.shape[dim])


def _log_weights(model: MMVAE, xs, qz_xs_density, zss, px_zs):
  """lw[m] = log p(z_m) + Σ_d λ_d log p(x_d | z_m) − log q_Φ(z_m), each (K, B)."""
  prior = model.prior()
  lws = []
  for r, z in enumerate(zss):
    lpz = prior.log_prob(z).sum(-1)
    lqz_x = log_mean_exp(torch.stack([q.log_prob(z).sum(-1) for q in qz_xs_density]))
    lpx_z = [px_z.log_prob(xs[d]).reshape(*px_z.batch_shape[:2], -1)
             .mul(model.llik_scaling[d]).sum(-1) for d, px_z in enumerate(px_zs[r])]
    lws.append(lpz + torch.stack(lpx_z).sum(0) - lqz_x)
  return lws


def m_iwae_looser(model: MMVAE, xs, K: int, noise=None):
  """Σ_b (1/M) Σ_m LME_k lw[m, k, b] (paper eq. (3)); no stop-gradients."""
  qz_xs, zss, px_zs = model(xs, K, noise)
  lws = _log_weights(model, xs, qz_xs, zss, px_zs)
  return torch.stack([log_mean_exp(lw, 0) for lw in lws]).mean(0).sum()


def m_iwae(model: MMVAE, xs, K: int, noise=None):
  """Tight: Σ_b LME over all M·K samples (the official test objective)."""
  qz_xs, zss, px_zs = model(xs, K, noise)
  lws = _log_weights(model, xs, qz_xs, zss, px_zs)
  return log_mean_exp(torch.cat(lws, 0), 0).sum()


def m_dreg_looser(model: MMVAE, xs, K: int, noise=None, hook_live: bool = False):
  """Σ_b (1/M) Σ_m Σ_k sg(softmax_k lw[m]) · lw[m], every expert's loc/scale detached in log q_Φ.

  As released (hook_live=False) the gradient hook that should multiply the z cotangent by w̃ is
  registered on a stacked copy of the samples that the loss does not depend on, so it never
  fires. hook_live=True registers it on the live per-expert samples (true DReG, the w̃²
  weighting). `m_dreg_looser.hook_calls` counts the hook's calls of the last backward pass.
  """
  qz_xs, zss, px_zs = model(xs, K, noise)
  qz_xs_ = [Laplace(q.loc.detach(), q.scale.detach()) for q in qz_xs]
  lws = _log_weights(model, xs, qz_xs_, zss, px_zs)
  m_dreg_looser.hook_calls = 0
  if hook_live:
    for z, lw in zip(zss, lws):
      if z.requires_grad:
        w = F.softmax(lw, 0).detach().unsqueeze(-1)
        z.register_hook(_counting_hook(w))
  else:
    stacked = torch.stack(zss, 0)  # a new tensor, not on the loss's backward path
    w_all = torch.stack([F.softmax(lw, 0) for lw in lws]).detach().unsqueeze(-1)
    if stacked.requires_grad:
      stacked.register_hook(_counting_hook(w_all))
  with torch.no_grad():
    grad_wts = [F.softmax(lw, 0) for lw in lws]
  return torch.stack([(w * lw).sum(0) for w, lw in zip(grad_wts, lws)]).mean(0).sum()


def _counting_hook(weight):
  def hook(grad):
    m_dreg_looser.hook_calls += 1
    return grad * weight
  return hook


m_dreg_looser.hook_calls = 0


# ---------------------------------------------------------------------------------------------
# Parameter layout conversion: flax tree of `mmvae_jax.model.mnist_svhn()` ↔ this module.


_LINEAR = {("mnist", "fc1"), ("mnist", "fc21"), ("mnist", "fc22"), ("mnist", "fc3")}


def _kernel_to_torch(kind: str, kernel: np.ndarray) -> np.ndarray:
  """flax kernel → PyTorch weight.

  Linear: (in, out) → (out, in). Conv2d: (kh, kw, in, out) → (out, in, kh, kw).
  ConvTranspose2d: the flax ConvTranspose kernel is the spatial flip of PyTorch's weight
  (mmvae_jax/layers.py: kernel[a, b, i, o] = w[i, o, kh−1−a, kw−1−b]), so
  (kh, kw, in, out) → flip → (in, out, kh, kw).
  """
  if kind == "linear":
    return kernel.T
  if kind == "conv":
    return kernel.transpose(3, 2, 0, 1)
  if kind == "convT":
    return kernel[::-1, ::-1].transpose(2, 3, 0, 1)
  raise ValueError(kind)


def _kind(name: str, layer: str) -> str:
  if layer.startswith("deconv"):
    return "convT"
  if layer.startswith("conv") or layer in ("c1", "c2"):
    return "conv"
  return "linear"


def flax_layout_to_torch(tree: Mapping) -> dict[str, np.ndarray]:
  """A tree shaped like the flax params (params or gradients) → {torch state_dict key: array}.

  Every array is converted with the same layout map; the prior logits (D,) become (1, D).
  """
  out = {}
  index = {"mnist": 0, "svhn": 1}
  for part, prefix in (("encoders", "enc"), ("decoders", "dec")):
    for name, layers in tree[part].items():
      for layer, leaves in layers.items():
        key = f"{prefix}.{index[name]}.{layer}"
        out[f"{key}.weight"] = np.ascontiguousarray(
            _kernel_to_torch(_kind(name, layer), np.asarray(leaves["kernel"])))
        out[f"{key}.bias"] = np.asarray(leaves["bias"])
  out["prior_logits"] = np.asarray(tree["prior"]["scale_logits"]).reshape(1, -1)
  return out


def state_dict_from_flax(params: Mapping, dtype=torch.float64) -> dict[str, torch.Tensor]:
  """`mmvae_jax` MNIST-SVHN params → a `load_state_dict` argument for `MMVAE`."""
  sd = {k: torch.tensor(np.array(v), dtype=dtype) for k, v in flax_layout_to_torch(params).items()}
  latent = sd["prior_logits"].shape[-1]
  sd["prior_loc"] = torch.zeros(1, latent, dtype=dtype)
  return sd


def model_from_flax(params: Mapping, dtype=torch.float64) -> MMVAE:
  latent = int(np.asarray(params["prior"]["scale_logits"]).shape[-1])
  model = MMVAE(latent).to(dtype)
  model.load_state_dict(state_dict_from_flax(params, dtype))
  return model


def nhwc_to_nchw(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))
