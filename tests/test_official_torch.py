"""The JAX MNIST-SVHN MMVAE against an independent PyTorch implementation of the official code.

`tests/official_torch.py` implements the official model and its released objectives in PyTorch
from a description of its behaviour (networks in NCHW with PyTorch's own layers,
`torch.distributions.Laplace`, the inert DReG hook). Here both sides run in float64 on the same
random parameters (ours, converted to PyTorch layouts), the same random data and the same
standard-Laplace noise ε (drawn exactly as `mmvae_jax.loss.sample_experts` draws it, then fed to
PyTorch as z = μ + s·ε), and we check:

* the log weights lw[m, k, b] and the bound values agree;
* ``estimator="legacy"`` has exactly the gradient of the released ``m_dreg_looser`` (every
  parameter, including the prior logits), and the released hook is called 0 times;
* ``estimator="iwae"`` has the gradient of ``m_iwae_looser`` (and of the tight ``m_iwae`` with
  ``looser=False``);
* ``estimator="dreg"`` equals the hook placed on the live samples (true DReG), differs from
  ``legacy`` on every encoder parameter and equals it on the decoders and the prior.

Skipped where PyTorch is not installed (CI).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the comparison with the "
                            "official implementation needs it (pip install torch)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from mmvae_jax import loss as losses  # noqa: E402
from mmvae_jax import model as model_lib  # noqa: E402
from tests import official_torch as ot  # noqa: E402

B, K, D = 3, 4, 20
RTOL = 1e-6  # float64 on both sides: observed differences are ~1e-12 relative


def _random_problem(seed: int = 0):
  """Our model, float64 params (PyTorch init + random prior logits), data in [0, 1], key."""
  model = model_lib.mnist_svhn(D)
  params = model.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  params["prior"]["scale_logits"] = jnp.asarray(rng.normal(0, 0.5, D))
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = (rng.uniform(size=(B, 28, 28, 1)), rng.uniform(size=(B, 32, 32, 3)))
  return model, params, xs, jax.random.key(seed + 1)


def _max_rel(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def results():
  """Everything computed once: JAX values, log weights, noise and gradients; PyTorch twins."""
  model, params, xs, key = _random_problem()
  with jax.enable_x64(True):
    p64 = jax.tree.map(jnp.asarray, params)
    x64 = tuple(jnp.asarray(x) for x in xs)

    def loss_fn(p, estimator, looser):
      obj = model.objective(p, x64, key, K, looser=looser, estimator=estimator)
      return -jnp.sum(obj)

    @jax.jit
    def compute(p):
      out = {}
      for name, est, looser in (("legacy", "legacy", True), ("dreg", "dreg", True),
                                ("iwae", "iwae", True), ("iwae_tight", "iwae", False)):
        out[name] = jax.value_and_grad(loss_fn)(p, est, looser)
      posteriors = model.encode(p, x64)
      z = losses.sample_experts(key, posteriors, K)
      lw = losses.log_weights(z, posteriors, model.log_likelihood_fn(p, x64), model.prior(p))
      # The noise, drawn as distrax.Laplace draws it inside sample_experts.
      keys = jax.random.split(key, len(posteriors))
      eps = [jax.random.laplace(k, (K,) + q.batch_shape, jnp.float64)
             for k, q in zip(keys, posteriors)]
      z_rebuilt = jnp.stack([q.loc + q.scale * e for q, e in zip(posteriors, eps)])
      return out, lw, jnp.stack(eps), z, z_rebuilt

    out, lw, eps, z, z_rebuilt = jax.device_get(compute(p64))
  assert lw.dtype == np.float64 and eps.dtype == np.float64
  np.testing.assert_allclose(z_rebuilt, z, rtol=1e-14, atol=1e-14)

  xt = [torch.tensor(ot.nhwc_to_nchw(x)) for x in xs]
  noise = [torch.tensor(e) for e in eps]
  jax_grads = {name: ot.flax_layout_to_torch(g) for name, (_, g) in out.items()}
  jax_values = {name: float(v) for name, (v, _) in out.items()}

  def torch_run(fn, **kw):
    tmodel = ot.model_from_flax(params)
    value = fn(tmodel, xt, K, noise=noise, **kw)
    (-value).backward()
    grads = {n: p.grad.numpy().copy() for n, p in tmodel.named_parameters() if p.requires_grad}
    return float(value.detach()), grads, ot.m_dreg_looser.hook_calls

  torch_out = {
      "m_dreg_looser": torch_run(ot.m_dreg_looser),
      "m_dreg_looser_live_hook": torch_run(ot.m_dreg_looser, hook_live=True),
      "m_iwae_looser": torch_run(ot.m_iwae_looser),
      "m_iwae": torch_run(ot.m_iwae),
  }
  tmodel = ot.model_from_flax(params)
  with torch.no_grad():
    qz_xs, zss, px_zs = tmodel(xt, K, noise)
    torch_lw = torch.stack(ot._log_weights(tmodel, xt, qz_xs, zss, px_zs)).numpy()
  return dict(jax_values=jax_values, jax_grads=jax_grads, lw=lw, torch_lw=torch_lw,
              torch=torch_out)


def _assert_same_grads(got: dict, want: dict, only=None):
  assert set(got) == set(want), (sorted(got), sorted(want))
  for name in sorted(want):
    if only is not None and not only(name):
      continue
    g, w = got[name], want[name]
    assert g.shape == w.shape, name
    assert _max_rel(g, w) < RTOL, f"{name}: max |diff| / max |grad| = {_max_rel(g, w):.3e}"


def test_parameter_trees_match():
  model, params, _, _ = _random_problem()
  tmodel = ot.model_from_flax(params)
  n_torch = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
  n_jax = sum(np.size(a) for a in jax.tree.leaves(params))
  assert n_torch == n_jax == 1_106_947 + D  # networks + learned prior logits


def test_log_weights_and_values(results):
  np.testing.assert_allclose(results["torch_lw"], results["lw"], rtol=1e-10)
  lw = results["lw"]  # (M, K, B)
  lme = logsumexp(lw, axis=1) - np.log(K)
  looser = float(np.sum(np.mean(lme, axis=0)))
  tight = float(np.sum(logsumexp(lw.reshape(-1, B), axis=0) - np.log(2 * K)))
  w = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
  released_dreg_value = float(np.sum(np.mean(np.sum(w * lw, axis=1), axis=0)))
  t, j = results["torch"], results["jax_values"]
  # Our value is the bound (for every estimator); the released DReG logs Σ w̃·lw instead.
  for name in ("legacy", "dreg", "iwae"):
    np.testing.assert_allclose(-j[name], t["m_iwae_looser"][0], rtol=1e-12)
  np.testing.assert_allclose(t["m_iwae_looser"][0], looser, rtol=1e-12)
  np.testing.assert_allclose(-j["iwae_tight"], t["m_iwae"][0], rtol=1e-12)
  np.testing.assert_allclose(t["m_iwae"][0], tight, rtol=1e-12)
  np.testing.assert_allclose(t["m_dreg_looser"][0], released_dreg_value, rtol=1e-12)


def test_legacy_equals_released_m_dreg_looser(results):
  value, grads, hook_calls = results["torch"]["m_dreg_looser"]
  assert hook_calls == 0  # the released hook never fires
  _assert_same_grads(results["jax_grads"]["legacy"], grads)


def test_iwae_equals_m_iwae_looser_and_tight(results):
  _assert_same_grads(results["jax_grads"]["iwae"], results["torch"]["m_iwae_looser"][1])
  _assert_same_grads(results["jax_grads"]["iwae_tight"], results["torch"]["m_iwae"][1])


def test_dreg_is_the_live_hook(results):
  _, grads, hook_calls = results["torch"]["m_dreg_looser_live_hook"]
  assert hook_calls == 2  # once per expert's samples
  _assert_same_grads(results["jax_grads"]["dreg"], grads)
  legacy, dreg = results["jax_grads"]["legacy"], results["jax_grads"]["dreg"]
  for name in legacy:
    if name.startswith("enc."):
      assert _max_rel(dreg[name], legacy[name]) > 1e-3, name
    else:
      assert _max_rel(dreg[name], legacy[name]) < 1e-12, name
