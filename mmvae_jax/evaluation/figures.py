"""Figures of the paper's qualitative evaluation (Figs 4-5), written as PNG files.

* `generation_grid`: decoder means of prior samples in every modality, side by side (Fig. 4
  top; the official code shows means, the paper R = 64 samples × N = 9 likelihood samples).
* `reconstruction_grid`: test data, reconstructions and cross generations (Fig. 4 rows).
* `latent_traversals`: for a test datum x_m, the posterior mean μ_m of q_m(z | x_m) is moved
  along each latent dimension d over μ_m^d ± 5 σ_0^d, where σ_0^d is the *learned* prior's
  standard deviation (Laplace: √2·scale), and decoded in every modality (Fig. 5; the official
  script differs, see docs/official-code.md, "Latent traversals").
* `kl_statistics` / `kl_boxplot`: per-dimension KL(q_m(z | x_m) || p(z)) over test data for
  every modality, and the symmetric KL 0.5 (KL(q_a || q_b) + KL(q_b || q_a)) between every pair of
  posteriors (Fig. 5 right).

"q_m(z | x_m)" is the model's posterior of modality m alone, ``model.posterior(params, {m: x_m})``:
expert m itself for the MMVAE, the product of the prior expert and expert m for the MVAE.
"""
from __future__ import annotations

import itertools
import os
from typing import Sequence

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax import distributions as dists
from mmvae_jax import visualize
from mmvae_jax.models import components


def _matplotlib():
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt
  return plt


def generation_grid(model, params, key: jax.Array, path: str, num: int = 64, ncol: int = 8
                    ) -> np.ndarray:
  """Decoder means of `num` prior samples in every modality; writes `path`, returns the image."""
  samples = jax.jit(model.generate, static_argnums=2)(params, key, num)
  image = visualize.generation_figure([np.asarray(s) for s in samples], ncol=ncol)
  visualize.save_png(path, image)
  return image


def reconstruction_grid(model, params, xs: Sequence[np.ndarray], key: jax.Array, path: str
                        ) -> np.ndarray:
  """Rows: the data of every modality, then recon[e][d] (encoder e, decoder d) for all e, d.

  Args:
    xs: M arrays (N, *data_shape_m), e.g. N = 8 test pairs.
  """
  recon = jax.jit(model.reconstruct)(params, tuple(jnp.asarray(x) for x in xs), key)
  image = visualize.reconstruction_figure([np.asarray(x) for x in xs],
                                          [[np.asarray(r) for r in row] for row in recon])
  visualize.save_png(path, image)
  return image


def prior_stddev(model, params) -> jax.Array:
  """(D,) standard deviation of the learned prior (Laplace: √2·scale; Normal: scale)."""
  return model.prior(params).stddev()


def traversal_latents(mean: jax.Array, std: jax.Array, steps: int = 11, span: float = 5.0
                      ) -> jax.Array:
  """(D, steps, D) latents: row d moves dimension d of `mean` (D,) over ±span·std[d]."""
  d = mean.shape[-1]
  t = jnp.linspace(-span, span, steps)
  offsets = jnp.eye(d)[:, None, :] * (t[None, :, None] * std[None, None, :])
  return mean[None, None, :] + offsets


def posterior_mean(posterior) -> jax.Array:
  """(B, D) mean of a posterior (of a mixture: the average of its components' means)."""
  return jnp.mean(jnp.stack([q.mean() for q in components(posterior)]), axis=0)


def single_posterior(model, params, name: str, x: jax.Array):
  """q(z | x_name) as one distribution with batch shape (B, D) (ValueError for a mixture)."""
  comps = components(model.posterior(params, {name: x}))
  if len(comps) != 1:
    raise ValueError(f"{type(model).__name__}: the posterior of {name!r} alone is a mixture of "
                     f"{len(comps)} components; per-dimension KLs need a single distribution")
  return comps[0]


def latent_traversals(model, params, x: Sequence[np.ndarray], path: str | None = None, *,
                      steps: int = 11, span: float = 5.0) -> dict:
  """Per-dimension traversals around each modality's posterior mean, decoded in all modalities.

  Args:
    x: M arrays (1, *data_shape_m), one test pair.
    path: PNG to write (one panel per (encoded modality, decoded modality)); None: no file.
  Returns:
    {"images": {(enc, dec): (D, steps, *data_shape_dec) means}, "prior_std": (D,),
     "means": {enc: (D,) posterior mean}}.
  """
  names = model.names
  std = prior_stddev(model, params)
  decode = jax.jit(model.decode)
  images, means = {}, {}
  for name, xm in zip(names, x):
    mu = posterior_mean(model.posterior(params, {name: jnp.asarray(xm[:1])}))[0]
    means[name] = np.asarray(mu)
    out = decode(params, traversal_latents(mu, std, steps, span))
    for dec, img in zip(names, out):
      images[(name, dec)] = np.asarray(img)
  if path is not None:
    _traversal_png(images, names, np.asarray(std), span, path)
  return {"images": images, "prior_std": np.asarray(std), "means": means}


def _traversal_png(images, names, std, span, path) -> None:
  plt = _matplotlib()
  m = len(names)
  fig, axes = plt.subplots(m, m, figsize=(4.2 * m, 0.32 * next(iter(images.values())).shape[0] + 1.5),
                           squeeze=False)
  for i, enc in enumerate(names):
    for j, dec in enumerate(names):
      img = images[(enc, dec)]  # (D, S, H, W, C)
      dims, steps = img.shape[:2]
      size = max(img.shape[2:4])
      flat = visualize.to_display(img.reshape((-1,) + img.shape[2:]), size)
      canvas = visualize.grid(flat, ncol=steps, pad=1)
      ax = axes[i, j]
      ax.imshow(canvas, interpolation="nearest")
      cell = size + 1
      ax.set_yticks([1 + cell * r + size / 2 for r in range(dims)])
      ax.set_yticklabels([f"{r} (σ₀={std[r]:.2f})" for r in range(dims)], fontsize=5)
      ax.set_xticks([1 + cell * 0 + size / 2, 1 + cell * (steps - 1) + size / 2])
      ax.set_xticklabels([f"−{span:g}σ₀", f"+{span:g}σ₀"], fontsize=6)
      ax.set_title(f"encode {enc} → decode {dec}", fontsize=8)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  plt = _matplotlib()
  tmp = f"{os.fspath(path)}.tmp.png"
  fig.savefig(tmp, dpi=130)
  plt.close(fig)
  os.replace(tmp, path)


def _base(dist):
  return _base(dist.distribution) if isinstance(dist, distrax.Independent) else dist


_PER_DIM_KL = {
    (distrax.Laplace, distrax.Laplace): dists.kl_laplace,
    (distrax.Normal, distrax.Normal): dists.kl_normal,
    (distrax.Normal, distrax.Laplace): dists.kl_normal_laplace,
}


def per_dim_kl(q, p, key: jax.Array | None = None, num_samples: int = 100) -> jax.Array:
  """Elementwise KL(q || p) of factorised distributions, (..., D): closed form where one exists,
  else the Monte-Carlo estimate with `num_samples` samples of q (needs `key`)."""
  q, p = _base(q), _base(p)
  fn = _PER_DIM_KL.get((type(q), type(p)))
  if fn is not None:
    return fn(q.loc, q.scale, p.loc, p.scale)
  if key is None:
    raise ValueError(f"no closed-form KL for {type(q).__name__} || {type(p).__name__}: pass key")
  z = q.sample(seed=key, sample_shape=(num_samples,))
  return jnp.mean(q.log_prob(z) - p.log_prob(z), axis=0)


def kl_statistics(model, params, xs: Sequence[np.ndarray], key: jax.Array | None = None) -> dict:
  """Per-datum, per-dimension KL divergences for test pairs xs (M arrays (N, ...)).

  Returns:
    {"prior": {name: (N, D) KL(q_name || p)}, "symmetric": {"a|b": (N, D) 0.5 (KL(q_a || q_b)
     + KL(q_b || q_a))} for every pair a < b}.
  """
  @jax.jit
  def fn(params, xs):
    qs = [single_posterior(model, params, n, x) for n, x in zip(model.names, xs)]
    p = model.prior(params)
    prior = {n: per_dim_kl(q, p, key) for n, q in zip(model.names, qs)}
    sym = {}
    for a, b in itertools.combinations(range(len(qs)), 2):
      sym[f"{model.names[a]}|{model.names[b]}"] = 0.5 * (per_dim_kl(qs[a], qs[b], key)
                                                         + per_dim_kl(qs[b], qs[a], key))
    return prior, sym
  prior, sym = jax.device_get(fn(params, tuple(jnp.asarray(x) for x in xs)))
  return {"prior": {k: np.asarray(v) for k, v in prior.items()},
          "symmetric": {k: np.asarray(v) for k, v in sym.items()}}


def kl_boxplot(stats: dict, path: str) -> None:
  """Grouped box plot: for every latent dimension, KL(q_m || p) for every m and the symmetric KLs."""
  plt = _matplotlib()
  series = [(f"KL(q_{n} ‖ p)", v) for n, v in stats["prior"].items()]
  series += [(f"sym. KL(q_{k.split('|')[0]}, q_{k.split('|')[1]})", v)
             for k, v in stats["symmetric"].items()]
  d = series[0][1].shape[1]
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * d * len(series) / 2 + 2), 4))
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  handles = []
  for s, (label, values) in enumerate(series):
    pos = np.arange(d) + (s - (len(series) - 1) / 2) * width
    bp = ax.boxplot([values[:, j] for j in range(d)], positions=pos, widths=width * 0.9,
                    patch_artist=True, showfliers=False, manage_ticks=False)
    for box in bp["boxes"]:
      box.set_facecolor(colours[s % len(colours)])
      box.set_alpha(0.7)
    handles.append(bp["boxes"][0])
  ax.set_xticks(np.arange(d))
  ax.set_xticklabels([str(j) for j in range(d)], fontsize=7)
  ax.set_xlabel("latent dimension")
  ax.set_ylabel("KL (nats)")
  ax.set_yscale("symlog", linthresh=1e-2)
  ax.set_ylim(bottom=0)
  ax.legend(handles, [s[0] for s in series], fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def kl_summary(stats: dict) -> dict:
  """Per-dimension means of `kl_statistics` as lists (for results.json)."""
  return {"prior": {k: np.mean(v, axis=0).round(5).tolist() for k, v in stats["prior"].items()},
          "symmetric": {k: np.mean(v, axis=0).round(5).tolist()
                        for k, v in stats["symmetric"].items()}}
