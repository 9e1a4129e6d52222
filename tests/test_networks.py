"""Tests of mmvae_jax.networks and mmvae_jax.layers (fast: tiny batches)."""
import collections
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae_jax import layers as L
from mmvae_jax import networks as N

D = 20
KEY = jax.random.PRNGKey(0)
TOL = dict(rtol=1e-5, atol=1e-5)


def _init(module, x):
  return module.init(KEY, x)["params"]


def _param_shapes(module, x):
  """Parameter ShapeDtypeStructs, without running the initialisers (fast)."""
  return jax.eval_shape(module.init, KEY, x)["params"]


# Test data comes from NumPy: every new shape drawn with jax.random costs an XLA compile.
def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rand(seed, shape, low=0.0, high=1.0):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


def _uniform_params(seed, params):
  """Same tree, fresh U(-0.5, 0.5) values (biases included), for equivalence tests."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  return jax.tree_util.tree_unflatten(
      tree, [_rand(seed + i, l.shape, -0.5, 0.5) for i, l in enumerate(leaves)])


def _assert_close_scaled(got, want):
  """|got − want| ≤ 1e-5 · max(1, max|want|) (+ 1e-5 relative): float32 sums of many terms."""
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, **TOL)


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------

def _expected_counts(d, hidden_layers=1):
  extra = (hidden_layers - 1) * (400 * 400 + 400)
  return {
      "mnist_enc": 784 * 400 + 400 + extra + 2 * (400 * d + d),
      "mnist_dec": d * 400 + 400 + extra + 400 * 784 + 784,
      "svhn_enc": 1568 + 32832 + 131200 + 2 * (128 * 16 * d + d),
      "svhn_dec": 16 * d * 128 + 128 + 131136 + 32800 + 1539,
  }


def _counts(d, hidden_layers=1):
  return {
      "mnist_enc": N.count_params(_param_shapes(N.MnistEncoder(d, hidden_layers),
                                                jnp.zeros((1, 28, 28, 1)))),
      "mnist_dec": N.count_params(_param_shapes(N.MnistDecoder(d, hidden_layers),
                                                jnp.zeros((1, d)))),
      "svhn_enc": N.count_params(_param_shapes(N.SvhnEncoder(d), jnp.zeros((1, 32, 32, 3)))),
      "svhn_dec": N.count_params(_param_shapes(N.SvhnDecoder(d), jnp.zeros((1, d)))),
  }


def test_param_counts_match_official_models():
  assert _counts(D) == {"mnist_enc": 330_040, "mnist_dec": 322_784,
                        "svhn_enc": 247_560, "svhn_dec": 206_563}
  assert _expected_counts(D) == _counts(D)


def test_param_counts_scale_with_latent_dim_and_depth():
  assert _counts(7, hidden_layers=2) == _expected_counts(7, hidden_layers=2)


def test_count_params_counts_every_leaf():
  tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), {"c": jnp.zeros((2, 2, 2))}]}
  assert N.count_params(tree) == 12 + 5 + 8


def test_decoder_param_tree_is_shared_by_impls():
  z = jnp.zeros((1, D))
  trees = [jax.tree_util.tree_map(jnp.shape, _param_shapes(N.SvhnDecoder(D, impl=impl), z))
           for impl in ("conv", "matmul", "window", "col2im", "auto")]
  assert all(t == trees[0] for t in trees)
  assert trees[0]["deconv1"] == {"kernel": (4, 4, D, 128), "bias": (128,)}
  assert trees[0]["deconv4"] == {"kernel": (4, 4, 32, 3), "bias": (3,)}


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("enc,shape", [(N.MnistEncoder, (28, 28, 1)), (N.SvhnEncoder, (32, 32, 3))])
def test_encoder_shapes_keep_batch_axis(enc, shape, batch):
  module = enc(D)
  x = _rand(0, (batch,) + shape)
  loc, scale_logits = jax.jit(module.apply)({"params": _init(module, x[:1])}, x)
  assert loc.shape == (batch, D) and scale_logits.shape == (batch, D)
  assert np.all(np.isfinite(loc)) and np.all(np.isfinite(scale_logits))


@pytest.mark.parametrize("enc,shape", [(N.MnistEncoder, (28, 28, 1)), (N.SvhnEncoder, (32, 32, 3))])
def test_encoder_leading_axes(enc, shape):
  module = enc(D)
  x = _rand(0, (2, 3) + shape)
  params = _init(module, x[0])
  apply = jax.jit(module.apply)
  loc, _ = apply({"params": params}, x)
  assert loc.shape == (2, 3, D)
  np.testing.assert_allclose(loc[1], apply({"params": params}, x[1])[0], **TOL)


@pytest.mark.parametrize("dec,shape", [(N.MnistDecoder, (28, 28, 1)), (N.SvhnDecoder, (32, 32, 3))])
def test_decoder_shapes(dec, shape):
  module = dec(D)
  params = _init(module, jnp.zeros((1, D)))
  for lead in [(1,), (128,), (30, 128), (3, 1, 2)]:  # shapes only: traced, not run
    z = jax.ShapeDtypeStruct(lead + (D,), jnp.float32)
    out = jax.eval_shape(module.apply, {"params": params}, z)
    assert out.shape == lead + shape
  mean = jax.jit(module.apply)({"params": params}, _randn(1, (2, 3, D)))
  assert mean.shape == (2, 3) + shape
  assert np.all((mean > 0) & (mean < 1))


def test_mnist_decoder_clamps_mean():
  module = N.MnistDecoder(D)
  params = _init(module, jnp.zeros((1, D)))
  params["fc3"]["bias"] = jnp.where(jnp.arange(784) % 2 == 0, 100.0, -100.0)
  mean = module.apply({"params": params}, jnp.zeros((4, D))).reshape(4, -1)
  np.testing.assert_array_equal(mean[:, 0::2], np.float32(1 - 1e-6))
  np.testing.assert_array_equal(mean[:, 1::2], np.float32(1e-6))


def test_resolve_impl_and_bad_options():
  assert L.resolve_impl("auto") == ("matmul" if jax.default_backend() == "cpu" else "conv")
  assert L.resolve_impl("window") == "window"
  with pytest.raises(ValueError):
    L.resolve_impl("fft")
  with pytest.raises(ValueError):
    N.SvhnDecoder(D, remat="everything").init(KEY, jnp.zeros((1, D)))


# ------------------------------------------------------------------------------------------------
# Transposed convolutions: matmul forms == XLA convolution (forward and gradients)
# ------------------------------------------------------------------------------------------------

def _flax_conv_transpose(kernel, bias, x, stride, padding):
  """The reference: flax's own ConvTranspose with PyTorch padding k − 1 − p per side."""
  k = kernel.shape[0]
  pad = k - 1 - padding
  module = nn.ConvTranspose(kernel.shape[-1], (k, k), (stride, stride), padding=((pad, pad),) * 2)
  return module.apply({"params": {"kernel": kernel, "bias": bias}}, x)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, x, kernel, bias, cotangent):
  loss = lambda x, k, b: jnp.sum(fn(x, k, b) * cotangent)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, kernel, bias), fn(x, kernel, bias)


LAYER_CASES = [  # (N, H, W, C_in, C_out, stride, padding)
    (3, 1, 1, D, 128, 1, 0),  # SVHN deconv1: 1×1 → 4×4
    (2, 4, 4, 128, 64, 2, 1),  # deconv2
    (2, 8, 8, 64, 32, 2, 1),  # deconv3
    (2, 16, 16, 32, 3, 2, 1),  # deconv4
    (2, 3, 5, 6, 7, 2, 1),  # non-square, odd sizes
]


@functools.lru_cache(maxsize=None)
def _layer_case(case):
  """Random (x, kernel, bias, cotangent) for a LAYER_CASES entry and the flax reference."""
  n, h, w, c_in, c_out, stride, padding = case
  seed = h * 100 + c_in
  x = _randn(seed, (n, h, w, c_in))
  kernel = _rand(seed + 1, (4, 4, c_in, c_out), -0.3, 0.3)
  bias = _rand(seed + 2, (c_out,), -0.3, 0.3)
  h_out = L.conv_transpose_out_size(h, 4, stride, padding)
  w_out = L.conv_transpose_out_size(w, 4, stride, padding)
  cot = _randn(seed + 3, (n, h_out, w_out, c_out))
  ref = lambda x, k, b: _flax_conv_transpose(k, b, x, stride, padding)
  return (x, kernel, bias, cot), _value_and_grads(ref, x, kernel, bias, cot)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("impl", ["matmul", "window", "col2im", "conv"])
def test_conv_transpose_impls_match_flax(case, impl):
  _, _, _, _, _, stride, padding = case
  (x, kernel, bias, cot), ((_, g_ref), y_ref) = _layer_case(case)
  got = lambda x, k, b: L.conv_transpose(x, k, b, stride=stride, padding=padding, impl=impl)
  (_, g_got), y_got = _value_and_grads(got, x, kernel, bias, cot)
  assert y_got.shape == y_ref.shape
  np.testing.assert_allclose(y_got, y_ref, **TOL)
  for a, b in zip(g_got, g_ref):  # grads w.r.t. input, kernel, bias
    _assert_close_scaled(a, b)


def test_conv_transpose_module_matches_flax_module():
  x = _randn(3, (2, 4, 4, 16))
  for impl in ("conv", "matmul"):
    mine = L.ConvTranspose2d(8, 4, stride=2, padding=1, impl=impl)
    params = _init(mine, x)
    ref = nn.ConvTranspose(8, (4, 4), (2, 2), padding=((2, 2), (2, 2)))
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
        jnp.shape, _param_shapes(ref, x))
    np.testing.assert_allclose(jax.jit(mine.apply)({"params": params}, x),
                               jax.jit(ref.apply)({"params": params}, x), **TOL)


# ------------------------------------------------------------------------------------------------
# Whole SVHN decoder: every impl (chunked or not) == a decoder built from flax ConvTranspose
# ------------------------------------------------------------------------------------------------

def _reference_svhn_decoder(params, z):
  h = z.reshape(-1, 1, 1, D)
  for i in range(4):
    p = params[f"deconv{i + 1}"]
    stride, padding = (1, 0) if i == 0 else (2, 1)
    h = _flax_conv_transpose(p["kernel"], p["bias"], h, stride, padding)
    h = jax.nn.sigmoid(h) if i == 3 else jax.nn.relu(h)
  return h.reshape(z.shape[:-1] + (32, 32, 3))


def _decoder_loss(fn, target, params, z):
  mean = fn(params, z)
  return jnp.sum(jnp.abs(target - mean)) + jnp.sum(mean ** 2), mean


def _decoder_grads(fn, target, params, z):
  grad = jax.value_and_grad(functools.partial(_decoder_loss, fn, target), argnums=(0, 1),
                            has_aux=True)
  (_, mean), grads = jax.jit(grad)(params, z)
  return mean, grads


@functools.lru_cache(maxsize=None)
def _decoder_case():
  """(params, z, target) and the flax-ConvTranspose reference's mean and gradients."""
  params = _uniform_params(1, _init(N.SvhnDecoder(D), jnp.zeros((1, D))))
  params = jax.tree_util.tree_map(lambda p: p * 0.3, params)
  z = _randn(2, (3, 5, D))  # 15 latents: chunk 4 → 4 chunks of 4 (1 padding row); 5 → 3 of 5
  target = _rand(4, (3, 5, 32, 32, 3))
  return (params, z, target), _decoder_grads(_reference_svhn_decoder, target, params, z)


@pytest.mark.parametrize("impl,chunk_size,remat", [
    ("matmul", -1, "minimal"), ("matmul", 5, "activations"), ("matmul", 4, "auto"),
    ("window", 0, "minimal"), ("col2im", 4, "activations"), ("conv", -1, "minimal"),
    ("conv", 8, "minimal")])
def test_svhn_decoder_impls_match_reference(impl, chunk_size, remat):
  (params, z, target), (m_ref, g_ref) = _decoder_case()
  module = N.SvhnDecoder(D, impl=impl, chunk_size=chunk_size, remat=remat)
  apply = lambda p, z: module.apply({"params": p}, z)
  m_got, g_got = _decoder_grads(apply, target, params, z)
  np.testing.assert_allclose(m_got, m_ref, **TOL)
  jax.tree_util.tree_map(_assert_close_scaled, g_got, g_ref)


def _dot_output_shapes(hlo_text):
  return collections.Counter(re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} dot\(", hlo_text))


@pytest.mark.parametrize("remat,layer3_forwards", [("activations", 1), ("minimal", 2)])
def test_svhn_decoder_backward_recomputes_only_what_remat_says(remat, layer3_forwards):
  """Each layer's forward matmul runs once per chunk in fwd+bwd, except layer 3's under
  "minimal" (recomputed from layer 2's output). A ``jax.checkpoint`` policy on named
  activations recomputed all of them: the layers' custom VJPs keep unnamed residuals."""
  if jax.default_backend() != "cpu":
    pytest.skip("the matmul forms are the CPU path")
  n = 6  # latents per chunk (no shape collides with a weight gradient); two chunks, so that XLA cannot merge forward and recomputation
  module = N.SvhnDecoder(D, impl="matmul", chunk_size=n, remat=remat)
  params = _init(module, jnp.zeros((1, D)))
  loss = lambda p, z: jnp.sum(module.apply({"params": p}, z) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, _randn(5, (2 * n, D))).compile()
  dots = _dot_output_shapes(hlo.as_text())
  # Forward outputs (col2im, C_in → 16·C_out): layer 2 (N·4·4, 16·64), layer 3 (N·8·8, 16·32),
  # layer 4 (N·16·16, 16·3).
  assert dots[f"f32[{n * 16},1024]"] == 1, dots
  assert dots[f"f32[{n * 64},512]"] == layer3_forwards, dots
  assert dots[f"f32[{n * 256},48]"] == 1, dots


@pytest.mark.parametrize("spare_bytes,layer3_forwards", [(0, 1), (-1, 2)])
def test_svhn_decoder_auto_remat_follows_the_layer3_budget(monkeypatch, spare_bytes,
                                                           layer3_forwards):
  """remat="auto" keeps layer 3's output (N·16·16·32 float32) while it fits in
  KEEP_ACT3_MAX_BYTES, and recomputes it one byte past that; the default keeps N ≤ 4,096."""
  assert N.KEEP_ACT3_MAX_BYTES // (16 * 16 * 32 * 4) == 4096
  if jax.default_backend() != "cpu":
    pytest.skip("the matmul forms are the CPU path")
  n = 6
  monkeypatch.setattr(N, "KEEP_ACT3_MAX_BYTES", 2 * n * 16 * 16 * 32 * 4 + spare_bytes)
  jax.clear_caches()  # the decoder's jit reads the budget when it traces
  module = N.SvhnDecoder(D, impl="matmul", chunk_size=n, remat="auto")
  params = _init(module, jnp.zeros((1, D)))
  loss = lambda p, z: jnp.sum(module.apply({"params": p}, z) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, _randn(5, (2 * n, D))).compile()
  assert _dot_output_shapes(hlo.as_text())[f"f32[{n * 64},512]"] == layer3_forwards
  jax.clear_caches()


def test_svhn_decoder_under_jit_and_sharding():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several (fake) devices")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(devices), ("data",))
  module = N.SvhnDecoder(D, chunk_size=8)
  params = _init(module, jnp.zeros((1, D)))
  z = _randn(3, (2, 4 * len(devices), D))
  z_sharded = jax.device_put(z, NamedSharding(mesh, P(None, "data")))
  f = jax.jit(lambda p, z: module.apply({"params": p}, z))
  np.testing.assert_allclose(f(params, z_sharded), f(params, z), **TOL)


# ------------------------------------------------------------------------------------------------
# Independent check of PyTorch semantics with float64 NumPy (scatter / correlation definitions)
# ------------------------------------------------------------------------------------------------

def _np_conv_transpose2d(x, w, b, stride, padding):
  """PyTorch ConvTranspose2d by its scatter definition: out[s·i + k − p] += in[i] · w[:, :, k].

  x: (N, H, W, C_in); w: PyTorch layout (C_in, C_out, kh, kw); float64.
  """
  n, h, wd, _ = x.shape
  _, c_out, kh, kw = w.shape
  full = np.zeros((n, stride * (h - 1) + kh, stride * (wd - 1) + kw, c_out))
  for i in range(h):
    for j in range(wd):
      for a in range(kh):
        for c in range(kw):
          full[:, stride * i + a, stride * j + c, :] += x[:, i, j, :] @ w[:, :, a, c]
  h_out = stride * (h - 1) + kh - 2 * padding
  w_out = stride * (wd - 1) + kw - 2 * padding
  return full[:, padding:padding + h_out, padding:padding + w_out, :] + b


def _np_conv2d(x, w, b, stride, padding):
  """PyTorch Conv2d: out[o] = Σ_k in_padded[s·o + k] · w[:, :, k]; w (C_out, C_in, kh, kw)."""
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  c_out, _, kh, kw = w.shape
  h_out = (xp.shape[1] - kh) // stride + 1
  w_out = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], h_out, w_out, c_out))
  for o in range(h_out):
    for q in range(w_out):
      patch = xp[:, stride * o:stride * o + kh, stride * q:stride * q + kw, :]  # (N, kh, kw, C_in)
      out[:, o, q, :] = np.einsum("nabi,oiab->no", patch, w)
  return out + b


@pytest.mark.parametrize("h,w,stride,padding", [(1, 1, 1, 0), (3, 2, 1, 0), (4, 4, 2, 1),
                                                (5, 3, 2, 1), (2, 3, 2, 0)])
@pytest.mark.parametrize("impl", ["conv", "matmul"])
def test_conv_transpose_matches_pytorch_definition(h, w, stride, padding, impl):
  rng = np.random.default_rng(h * 10 + w)
  c_in, c_out = 5, 4
  x = rng.standard_normal((2, h, w, c_in))
  w_torch = rng.uniform(-0.5, 0.5, (c_in, c_out, 4, 4))
  b = rng.uniform(-0.5, 0.5, c_out)
  want = _np_conv_transpose2d(x, w_torch, b, stride, padding)
  # The documented conversion from a PyTorch weight to our (flax) kernel.
  kernel = w_torch.transpose(2, 3, 0, 1)[::-1, ::-1]
  module = L.ConvTranspose2d(c_out, 4, stride=stride, padding=padding, impl=impl)
  params = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
  got = module.apply({"params": params}, jnp.asarray(x, jnp.float32))
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


# (4, 4, 1, 0): a 4×4 kernel covering the whole map, like the SVHN encoder's heads.
@pytest.mark.parametrize("h,w,stride,padding", [(8, 9, 2, 1), (4, 5, 1, 0), (5, 6, 1, 2),
                                                (4, 4, 1, 0)])
@pytest.mark.parametrize("impl", ["conv", "im2col", "s2d", "conv_s2d"])
def test_conv2d_matches_pytorch_definition(h, w, stride, padding, impl):
  rng = np.random.default_rng(h + w)
  c_in, c_out = 3, 6
  x = rng.standard_normal((2, h, w, c_in))
  w_torch = rng.uniform(-0.5, 0.5, (c_out, c_in, 4, 4))
  b = rng.uniform(-0.5, 0.5, c_out)
  want = _np_conv2d(x, w_torch, b, stride, padding)
  module = L.Conv2d(c_out, 4, stride=stride, padding=padding, impl=impl)
  params = {"kernel": jnp.asarray(w_torch.transpose(2, 3, 1, 0), jnp.float32),
            "bias": jnp.asarray(b, jnp.float32)}
  got = module.apply({"params": params}, jnp.asarray(x, jnp.float32))
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [3, 8])  # both constructions (thin inputs and window-wise)
def test_s2d_patches_match_numpy(channels):
  assert 3 < L.S2D_WINDOW_MIN_CHANNELS <= 8
  x = np.random.default_rng(channels).standard_normal((2, 6, 8, channels)).astype(np.float32)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.empty((2, 3, 4, 2, 2, 2, 2, channels), np.float32)  # (n, t, u, dy, dx, r, q, c)
  for t, u, dy, dx, r, q in np.ndindex(3, 4, 2, 2, 2, 2):
    want[:, t, u, dy, dx, r, q] = xp[:, 2 * (t + dy) + r, 2 * (u + dx) + q]
  got = np.asarray(L._s2d_patches(jnp.asarray(x)))
  np.testing.assert_array_equal(got, want.reshape(2, 3, 4, 16 * channels))


@pytest.mark.parametrize("c_in,c_out,size", [(3, 32, 32), (32, 64, 16), (64, 128, 8)])
def test_conv2d_matmul_forms_gradients_match_conv(c_in, c_out, size):
  """The SVHN encoder's (4, 2, 1) layers: im2col, s2d, conv_s2d and the XLA convolution agree
  in value and in the gradients for the kernel, the bias and the input (both layouts of the
  s2d weight gradient: row-major at C_in = 3, channel-major at 32 and 64)."""
  rng = np.random.default_rng(c_in)
  x = jnp.asarray(rng.uniform(size=(3, size, size, c_in)), jnp.float32)
  kernel = jnp.asarray(rng.uniform(-0.2, 0.2, (4, 4, c_in, c_out)), jnp.float32)
  bias = jnp.asarray(rng.uniform(-0.2, 0.2, (c_out,)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((3, size // 2, size // 2, c_out)), jnp.float32)

  def grads(impl):
    f = lambda x, k, b: jnp.sum(cot * L.conv2d(x, k, b, stride=2, padding=1, impl=impl))
    return jax.grad(f, argnums=(0, 1, 2))(x, kernel, bias)

  want = grads("conv")
  for impl in ("im2col", "s2d", "conv_s2d"):
    for got, ref in zip(grads(impl), want):
      _assert_close_scaled(got, ref)


def test_resolve_conv_impl():
  cpu = jax.default_backend() == "cpu"
  first = L.resolve_conv_impl("auto", (4, 4, 3, 32), stride=2, padding=1, input_hw=(32, 32))
  assert first == ("s2d" if cpu else "conv")  # 48-feature patches
  assert L.resolve_conv_impl("auto", (4, 4, 3, 32), stride=2, padding=1,
                             input_hw=(31, 32)) == ("im2col" if cpu else "conv")  # odd map
  assert L.resolve_conv_impl("auto", (4, 4, 32, 64), stride=2, padding=1,
                             input_hw=(16, 16)) == ("conv_s2d" if cpu else "conv")
  assert L.resolve_conv_impl("auto", (4, 4, 64, 128), stride=2, padding=1,
                             input_hw=(8, 8)) == "conv"
  assert L.resolve_conv_impl("conv_s2d", (4, 4, 8, 8), stride=2, padding=1,
                             input_hw=(7, 8)) == "conv"  # odd map
  head = L.resolve_conv_impl("auto", (4, 4, 128, 20), input_hw=(4, 4))  # whole-map head
  assert head == ("im2col" if cpu else "conv")
  assert L.resolve_conv_impl("s2d", (3, 3, 8, 8), stride=1, padding=1) == "conv"
  x, kernel, bias = jnp.zeros((1, 8, 8, 3)), jnp.zeros((4, 4, 3, 32)), jnp.zeros((32,))
  with pytest.raises(ValueError, match="even height and width"):
    L.conv2d_s2d(x[:, :7], kernel, bias)
  with pytest.raises(ValueError, match="unknown convolution impl"):
    L.conv2d(x, kernel, bias, stride=2, padding=1, impl="fft")


# ------------------------------------------------------------------------------------------------
# PyTorch default initialisation
# ------------------------------------------------------------------------------------------------

def _fan_in(path, shape):
  """PyTorch fan_in from our layout: Dense (in, out); Conv (k, k, in, out); ConvT: out·k·k."""
  if len(shape) == 2:
    return shape[0]
  kh, kw, c_in, c_out = shape
  return c_out * kh * kw if "deconv" in path else c_in * kh * kw


@pytest.mark.parametrize("module,x", [
    (N.MnistEncoder(D, 2), jnp.zeros((1, 28, 28, 1))),
    (N.MnistDecoder(D), jnp.zeros((1, D))),
    (N.SvhnEncoder(D), jnp.zeros((1, 32, 32, 3))),
    (N.SvhnDecoder(D), jnp.zeros((1, D))),
], ids=["mnist_enc", "mnist_dec", "svhn_enc", "svhn_dec"])
def test_pytorch_default_init(module, x):
  params = _init(module, x)
  for layer, p in params.items():
    kernel, bias = np.asarray(p["kernel"]), np.asarray(p["bias"])
    bound = 1.0 / math.sqrt(_fan_in(layer, kernel.shape))
    assert np.all(np.abs(kernel) <= bound), layer
    assert np.all(np.abs(bias) <= bound), layer
    assert np.all(bias != 0), layer  # flax's default would be zeros
    # The bound is used in full (a wrong fan_in, e.g. C_in·k·k for a ConvTranspose, fails here).
    assert np.max(np.abs(kernel)) > 0.95 * bound, layer
    if kernel.size >= 1000:  # U(±a) has std a/√3
      np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.1, err_msg=layer)
    if bias.size >= 100:
      assert np.max(np.abs(bias)) > 0.8 * bound, layer


def test_convtranspose_fan_in_is_out_channels():
  # deconv4 is 32 → 3: PyTorch's bound is 1/sqrt(3·16), not 1/sqrt(32·16).
  params = _init(N.SvhnDecoder(D), jnp.zeros((1, D)))
  assert np.max(np.abs(params["deconv4"]["kernel"])) > 1.0 / math.sqrt(32 * 16)
  assert np.max(np.abs(params["deconv4"]["kernel"])) <= 1.0 / math.sqrt(3 * 16)
