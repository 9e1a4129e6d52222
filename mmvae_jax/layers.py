"""Layers with PyTorch semantics: default initialisers and transposed convolutions.

Transposed convolutions
-----------------------
PyTorch's ``ConvTranspose2d(k, s, p)`` maps an input of size H to ``s·(H − 1) + k − 2p`` by the
scatter rule ``out[s·i + t − p] += in[i] · w[t]`` (t the kernel tap). Equivalently it is a stride-1
correlation over the input dilated by s and padded by ``k − 1 − p`` per side, with the kernel
flipped spatially.

Kernel convention. Every kernel here has shape ``(kh, kw, C_in, C_out)`` and is the kernel that
``flax.linen.ConvTranspose`` (``transpose_kernel=False``) and ``lax.conv_transpose`` correlate with,
so a parameter subtree ``{"kernel", "bias"}`` can be applied by ``nn.ConvTranspose`` unchanged
(with ``padding=((k-1-p, k-1-p),) * 2``). It is the spatial flip of PyTorch's weight:
``kernel[a, b, i, o] == w_torch[i, o, kh-1-a, kw-1-b]``; to load a PyTorch weight ``w`` of shape
``(C_in, C_out, kh, kw)`` use ``w.transpose(2, 3, 0, 1)[::-1, ::-1]``.

Formulations (all give the same numbers up to float rounding, and share one parameter tree):

* ``"conv"``: ``lax.conv_transpose`` (an XLA convolution). The fast path on GPU/TPU; on XLA:CPU
  strided transposed convolutions are slow (5-15x slower than the matmul forms, see
  benchmarks/decoder.py).
* ``"window"`` (sub-pixel / phase form, k=4, s=2, p=1 only): every 2×2 block of output pixels
  depends on one 2×2 window of the input padded by 1. Windows are built by concatenating four
  shifted slices (features 4·C_in, grid (H+1)×(W+1)), multiplied by a (4·C_in, 4·C_out) matrix
  assembled from the 16 taps, then depth-to-space and a one-pixel crop.
* ``"col2im"`` (k=4, s=2, p=1 only): one matmul C_in → 16·C_out (every tap of every input pixel),
  then an overlap-add of four shifted slices, depth-to-space and crop. Exact FLOPs and a small
  input expansion; good when C_out is small or the input grid is small.
* A stride-1, padding-0 transposed convolution of a 1×1 input is a plain matmul
  (``conv_transpose_from_1x1``); it is used for every matmul variant.

The window and col2im forms are adjoints of each other, and each one's backward pass is written
by hand (``jax.custom_vjp``) in terms of the other: XLA:CPU's automatic transposes of the slices
and concatenations materialise zero-padded partial sums (several full-size buffers per layer,
≈2x slower). Consequence: the matmul forms support reverse-mode differentiation (grad, vjp,
vmap of either) but not forward mode (jvp, jacfwd); use ``"conv"`` for those.

``"matmul"`` is ``"col2im"`` for every (4, 2, 1) layer: exact FLOPs beat the window form's
wider matmul at every SVHN decoder layer once the decoder runs in cache-sized chunks (layer 3,
8×8, 64→32, where the window form does 1.27x the FLOPs: the K = 1 training step took 102.8 ms
with col2im vs 106.2 ms with the window form, interleaved A/B on the 2-core CPU; equal within
noise at K = 10). ``"auto"`` resolves to ``"matmul"`` on the CPU backend and ``"conv"``
elsewhere. Other layer configurations (other k, s, p) always use ``lax.conv_transpose``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Initializer = Callable[..., Array]

IMPLS = ("auto", "conv", "matmul", "window", "col2im")


# ------------------------------------------------------------------------------------------------
# PyTorch default initialisation
# ------------------------------------------------------------------------------------------------

def count_params(params: Any) -> int:
  """Total number of array entries in a pytree (e.g. ``variables["params"]``)."""
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)))


def flatten_leading(x: Array, trailing: int) -> tuple[Array, tuple[int, ...]]:
  """(..., *t) → ((N, *t), leading shape), with t the last `trailing` dims."""
  lead = x.shape[:x.ndim - trailing]
  return x.reshape((math.prod(lead),) + x.shape[x.ndim - trailing:]), lead


def torch_uniform(bound: float) -> Initializer:
  """Initialiser drawing U(−bound, +bound) (PyTorch's default for weights and biases)."""
  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


def linear_bound(in_features: int) -> float:
  """Bound 1/sqrt(fan_in) of ``nn.Linear`` weight and bias, fan_in = in_features."""
  return 1.0 / math.sqrt(in_features)


def conv_bound(in_channels: int, kernel_size: Sequence[int]) -> float:
  """Bound of ``nn.Conv2d`` weight and bias: fan_in = C_in·kh·kw."""
  return 1.0 / math.sqrt(in_channels * math.prod(kernel_size))


def conv_transpose_bound(out_channels: int, kernel_size: Sequence[int]) -> float:
  """Bound of ``nn.ConvTranspose2d`` weight and bias: PyTorch's fan_in is C_out·kh·kw."""
  return 1.0 / math.sqrt(out_channels * math.prod(kernel_size))


class Dense(nn.Module):
  """``torch.nn.Linear``: (..., C_in) → (..., features), PyTorch default initialisation.

  Parameters (same tree as ``flax.linen.Dense``): ``kernel`` (C_in, features) and ``bias``
  (features,), both U(±1/sqrt(C_in)).
  """
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bound = linear_bound(x.shape[-1])
    kernel = self.param("kernel", torch_uniform(bound), (x.shape[-1], self.features))
    bias = self.param("bias", torch_uniform(bound), (self.features,))
    return jnp.dot(x, kernel) + bias


# ------------------------------------------------------------------------------------------------
# Convolutions (PyTorch Conv2d semantics, NHWC)
# ------------------------------------------------------------------------------------------------

CONV_IMPLS = ("auto", "conv", "im2col", "s2d", "conv_s2d")
# "auto" uses a matmul form on XLA:CPU when a patch has at most this many features (kh·kw·C_in).
IM2COL_MAX_PATCH = 64
# ... and, for 4×4 stride-2 layers, XLA's forward convolution with space-to-depth gradients
# ("conv_s2d") up to this many (the SVHN encoder's conv2, 4×4×32; conv3, 4×4×64, stays "conv").
CONV_S2D_MAX_PATCH = 512
# Space-to-depth patches of inputs with at least this many channels are built window by window
# (see `_s2d_patches`).
S2D_WINDOW_MIN_CHANNELS = 4


def _xla_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv2d_lax(x: Array, kernel: Array, bias: Array, *, stride: int, padding: int) -> Array:
  """``torch.nn.Conv2d(k, stride, padding)`` as an XLA convolution (see `conv2d`)."""
  return _xla_conv(x, kernel, stride, padding) + bias


def conv2d_im2col(x: Array, kernel: Array, bias: Array, *, stride: int, padding: int) -> Array:
  """``torch.nn.Conv2d(k, stride, padding)`` as one matmul over im2col patches (see `conv2d`).

  Patches are the kh·kw strided slices of the padded input concatenated along features in
  (i, j, c) order, which is the row order of ``kernel.reshape(kh·kw·C_in, C_out)``. When the
  kernel covers the whole padded input (a 4×4 head on a 4×4 map) the patch is the flattened
  input, and the layer is a dense layer.
  """
  kh, kw, c_in, c_out = kernel.shape
  n, h, w, _ = x.shape
  ho = (h + 2 * padding - kh) // stride + 1
  wo = (w + 2 * padding - kw) // stride + 1
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  if (ho, wo) == (1, 1) and x.shape[1:3] == (kh, kw):
    patches = x.reshape(n, 1, 1, kh * kw * c_in)
  else:
    patches = jnp.concatenate(
        [x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
         for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out)) + bias


def _check_s2d_input(x: Array) -> None:
  chex.assert_rank(x, 4)
  if x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"the space-to-depth convolution needs an even height and width, "
                     f"got {x.shape[1:3]}")


def s2d_weight(kernel: Array) -> Array:
  """The (16·C_in, C_out) matrix of `conv2d_s2d`: rows (dy, dx, r, q, c) hold tap
  (2·dy + r, 2·dx + q), matching the features of ``_windows_2x2(_pad_space_to_depth(x))``."""
  kh, kw, c_in, c_out = kernel.shape
  assert (kh, kw) == (4, 4), kernel.shape
  w = kernel.reshape(2, 2, 2, 2, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)  # (dy, dx, r, q, c, o)
  return w.reshape(16 * c_in, c_out)


def _s2d_patches(x: Array) -> Array:
  """(N, H, W, C) → (N, H/2, W/2, 16·C): pad by 1, space-to-depth by 2, 2×2 windows.

  Features (dy, dx, r, q, c): padded pixel (2·(t + dy) + r, 2·(u + dx) + q) for output (t, u).
  With C ≥ `S2D_WINDOW_MIN_CHANNELS` each window is sliced from the padded input viewed as
  (N, H/2+1, 2, W/2+1, 2, C) and transposed into place in one copy; for thinner inputs the
  blocks are transposed once and then sliced (``_windows_2x2(_pad_space_to_depth(x))``). XLA:CPU
  fused the first form into a single copy but duplicated the block transpose into each of
  four slices in the second: patches plus the matmul that reads them, per 32 images of
  32×32×C, 0.86 → 0.67 ms (C = 8), 6.7 → 4.3 ms (C = 32); at C = 3, 0.46 vs 0.49 ms. In the
  SVHN decoder's backward pass (the output-gradient patches of layers 2 and 3) it cut the
  work by about 3% (fwd+bwd of 256 latents on one core: 112.9 → 109.7 ms); on two cores the
  step time did not change measurably, as these copies run beside the weight-gradient matmuls.
  """
  n, h, w, c = x.shape
  if c < S2D_WINDOW_MIN_CHANNELS:
    return _windows_2x2(_pad_space_to_depth(x))
  h2, w2 = h // 2, w // 2
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n, h2 + 1, 2, w2 + 1, 2, c)
  windows = [xp[:, dy:dy + h2, :, dx:dx + w2].transpose(0, 1, 3, 2, 4, 5)
             for dy in (0, 1) for dx in (0, 1)]  # each (N, H/2, W/2, r, q, C)
  return jnp.stack(windows, axis=3).reshape(n, h2, w2, 16 * c)


def _s2d_input_grad(g: Array, wm: Array, c_in: int) -> Array:
  """Input gradient of the space-to-depth conv: g (N, H/2, W/2, C_out) → (N, H, W, C_in).

  The adjoint of the forward's copies: a (C_out → 16·C_in) matmul, the overlap-add of 2×2
  windows, depth-to-space and the one-pixel crop (no zero-padded partial sums).
  """
  return _depth_to_space_crop(_overlap_add_2x2(jnp.dot(g, wm.T)), c_in)


def _s2d_weight_grad(x: Array, g: Array) -> Array:
  """Gradient of the (16·C_in, C_out) space-to-depth matrix: patchesᵀ · g.

  x: (N, H, W, C_in); g: (N, H/2, W/2, C_out). Thin patches (≤ `IM2COL_MAX_PATCH` features)
  are built as in the forward pass; wider ones channel-major ((16·C_in, N·H/2·W/2), from one
  transpose of the space-to-depth input and four slices), so that the product is a plain
  row-major matmul. XLA:CPU ran the product contracting over the long leading axis
  (patchesᵀ · g, 8,192 × 512 at the SVHN encoder's conv2) at 60 GFLOP/s: conv2's weight
  gradient took 23 ms row-major vs 5.6 ms channel-major at B = 128 (XLA's convolution: 8.1 ms);
  for 4×4×3 patches row-major stays faster (1.05 vs 1.6 ms).
  """
  c_in, c_out = x.shape[-1], g.shape[-1]
  if 16 * c_in <= IM2COL_MAX_PATCH:
    return _weight_grad(_s2d_patches(x), g)
  h2, w2 = x.shape[1] // 2, x.shape[2] // 2
  blocks = _pad_space_to_depth(x).transpose(3, 0, 1, 2)  # (4·C_in, N, H/2+1, W/2+1)
  patches_t = jnp.concatenate(
      [blocks[:, :, dy:dy + h2, dx:dx + w2] for dy in (0, 1) for dx in (0, 1)], axis=0)
  return jnp.dot(patches_t.reshape(16 * c_in, -1), g.reshape(-1, c_out))


@jax.custom_vjp
def _s2d_matmul(x: Array, wm: Array) -> Array:
  """x (N, H, W, C_in), wm = s2d_weight(kernel) → (N, H/2, W/2, C_out), no bias."""
  return jnp.dot(_s2d_patches(x), wm)


def _s2d_matmul_fwd(x, wm):
  return _s2d_matmul(x, wm), (x, wm)


def _s2d_matmul_bwd(res, g):
  # The patch matrix (4x the input) is rebuilt here rather than kept from the forward pass.
  x, wm = res
  return _s2d_input_grad(g, wm, x.shape[-1]), _s2d_weight_grad(x, g)


_s2d_matmul.defvjp(_s2d_matmul_fwd, _s2d_matmul_bwd)


def conv2d_s2d(x: Array, kernel: Array, bias: Array) -> Array:
  """``torch.nn.Conv2d(4, stride=2, padding=1)``, space-to-depth form: one matmul, exact FLOPs.

  Padded by 1 and regrouped into 2×2 pixel blocks (features (r, q, c)), output pixel (t, u)
  reads blocks (t + dy, u + dx), dy, dx ∈ {0, 1}, through tap (2·dy + r, 2·dx + q). So the
  layer is a (16·C_in → C_out) matmul over 2×2 windows of blocks, built from one transposing
  copy and four slices, with a hand-written backward pass (the adjoint copies, no zero-padded
  partial sums). Reverse-mode only (``jax.custom_vjp``).

  Args:
    x: (N, H, W, C_in), H and W even. kernel: (4, 4, C_in, C_out). bias: (C_out,).
  Returns:
    (N, H/2, W/2, C_out).
  """
  _check_s2d_input(x)
  return _s2d_matmul(x, s2d_weight(kernel)) + bias


@jax.custom_vjp
def _conv_s2d_grad(x: Array, kernel: Array) -> Array:
  """Conv2d(4, 2, 1) without bias: XLA's convolution forward, space-to-depth matmul backward."""
  return _xla_conv(x, kernel, 2, 1)


def _conv_s2d_grad_fwd(x, kernel):
  return _conv_s2d_grad(x, kernel), (x, kernel)


def _conv_s2d_grad_bwd(res, g):
  x, kernel = res
  wm, pull_back = jax.vjp(s2d_weight, kernel)  # s2d_weight is a permutation of the taps
  (grad_kernel,) = pull_back(_s2d_weight_grad(x, g))
  return _s2d_input_grad(g, wm, x.shape[-1]), grad_kernel


_conv_s2d_grad.defvjp(_conv_s2d_grad_fwd, _conv_s2d_grad_bwd)


def conv2d_conv_s2d(x: Array, kernel: Array, bias: Array) -> Array:
  """``torch.nn.Conv2d(4, stride=2, padding=1)``: XLA's convolution forward, the space-to-depth
  matmuls (`conv2d_s2d`'s backward pass) for both gradients.

  On XLA:CPU, at the SVHN encoder's conv2 (16×16×32 → 8×8×64), XLA's forward convolution beats
  the space-to-depth matmul (whose 4x-expanded patch matrix costs more than it saves), while
  its backward convolutions lose to the matmuls: at B = 128, input gradient 5.7 vs 3.5 ms,
  kernel gradient 8.1 vs 5.8 ms; the whole encoder's fwd+bwd 35.4 → 27.4 ms. Reverse-mode
  only.

  Args:
    x: (N, H, W, C_in), H and W even. kernel: (4, 4, C_in, C_out). bias: (C_out,).
  Returns:
    (N, H/2, W/2, C_out).
  """
  _check_s2d_input(x)
  return _conv_s2d_grad(x, kernel) + bias


def resolve_conv_impl(impl: str, kernel_shape: Sequence[int], *, stride: int = 1,
                      padding: int = 0, input_hw: Sequence[int] | None = None) -> str:
  """Which formulation `conv2d` uses.

  "auto" on the CPU backend, for a 4×4, stride-2, padding-1 layer on an even map: "s2d" for
  thin patches (≤ `IM2COL_MAX_PATCH` features, e.g. 4×4×3); "conv_s2d" up to
  `CONV_S2D_MAX_PATCH` features (4×4×32: XLA's forward convolution beats the 4x-expanded patch
  matmul, its backward convolutions lose to the matmuls); "conv" beyond (4×4×64: XLA's
  backward convolutions are as fast). Other layers: "im2col" for thin patches or a kernel
  covering the whole map (a dense layer), else "conv". "auto" elsewhere: "conv". Other values
  are returned unchanged, except that "s2d" and "conv_s2d" fall back to "conv" where they do
  not apply. Measured (SVHN encoder fwd+bwd, B = 128, freed host memory retained, interleaved):
  all-XLA 35.4 ms; conv2 as "conv_s2d" 27.4 ms; conv3's input gradient by the matmul as well
  27.1 ms (within noise, so conv3 stays "conv").
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown convolution impl {impl!r}; expected one of {CONV_IMPLS}")
  kh, kw, c_in = kernel_shape[:3]
  s2d_ok = ((kh, kw, stride, padding) == (4, 4, 2, 1)
            and (input_hw is None or (input_hw[0] % 2 == 0 and input_hw[1] % 2 == 0)))
  if impl in ("s2d", "conv_s2d"):
    return impl if s2d_ok else "conv"
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "conv"
  patch = kh * kw * c_in
  thin = patch <= IM2COL_MAX_PATCH
  if s2d_ok and patch <= CONV_S2D_MAX_PATCH:
    return "s2d" if thin else "conv_s2d"
  whole = input_hw is not None and padding == 0 and tuple(input_hw) == (kh, kw)
  return "im2col" if thin or whole else "conv"


def conv2d(x: Array, kernel: Array, bias: Array, *, stride: int, padding: int,
           impl: str = "conv") -> Array:
  """``torch.nn.Conv2d(k, stride, padding)`` on NHWC input.

  Args:
    x: (N, H, W, C_in).
    kernel: (kh, kw, C_in, C_out) (the flax ``nn.Conv`` layout, no flip).
    bias: (C_out,).
    impl: "conv" (XLA convolution), "im2col" (one matmul over patches), "s2d" (4×4, stride 2,
      padding 1 only: `conv2d_s2d`), "conv_s2d" (same layers: XLA forward, space-to-depth
      backward, `conv2d_conv_s2d`) or "auto" (`resolve_conv_impl`); all give the same numbers
      up to float rounding. "s2d" and "conv_s2d" are reverse-mode differentiable only.
  Returns:
    (N, (H + 2p − kh)//s + 1, (W + 2p − kw)//s + 1, C_out).
  """
  chex.assert_rank(x, 4)
  chex.assert_rank(kernel, 4)
  chex.assert_axis_dimension(x, 3, kernel.shape[2])
  impl = resolve_conv_impl(impl, kernel.shape, stride=stride, padding=padding,
                           input_hw=x.shape[1:3])
  if impl == "s2d":
    return conv2d_s2d(x, kernel, bias)
  if impl == "conv_s2d":
    return conv2d_conv_s2d(x, kernel, bias)
  if impl == "im2col":
    return conv2d_im2col(x, kernel, bias, stride=stride, padding=padding)
  return conv2d_lax(x, kernel, bias, stride=stride, padding=padding)


class Conv2d(nn.Module):
  """``torch.nn.Conv2d`` (NHWC, explicit symmetric padding, PyTorch default initialisation).

  Input (N, H, W, C_in) → (N, H_out, W_out, features). Parameters (same tree as ``nn.Conv``):
  ``kernel`` (k, k, C_in, features), ``bias`` (features,), both U(±1/sqrt(C_in·k·k)).
  ``impl``: see `conv2d` ("auto" on CPU: for 4×4 stride-2 layers the space-to-depth matmul
  when thin (the SVHN encoder's conv1) and XLA's forward convolution with space-to-depth
  matmul gradients up to 32 input channels (its conv2); a matmul for whole-map heads; an XLA
  convolution otherwise).
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    bound = conv_bound(x.shape[-1], (k, k))
    kernel = self.param("kernel", torch_uniform(bound), (k, k, x.shape[-1], self.features))
    bias = self.param("bias", torch_uniform(bound), (self.features,))
    return conv2d(x, kernel, bias, stride=self.stride, padding=self.padding, impl=self.impl)


# ------------------------------------------------------------------------------------------------
# Transposed convolutions (PyTorch ConvTranspose2d semantics, NHWC)
# ------------------------------------------------------------------------------------------------

def conv_transpose_out_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
  """Output length of ``ConvTranspose2d``: s·(H − 1) + k − 2p (no output_padding)."""
  return stride * (size - 1) + kernel_size - 2 * padding


def conv_transpose_lax(x: Array, kernel: Array, bias: Array, *, stride: int,
                       padding: int) -> Array:
  """``ConvTranspose2d(k, stride, padding)`` as an XLA convolution (``lax.conv_transpose``).

  Args:
    x: (N, H, W, C_in).
    kernel: (k, k, C_in, C_out), flax convention (see the module docstring).
    bias: (C_out,).
  Returns:
    (N, s(H−1)+k−2p, s(W−1)+k−2p, C_out).
  """
  chex.assert_rank(x, 4)
  k = kernel.shape[0]
  pad = k - 1 - padding
  y = lax.conv_transpose(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias


def conv_transpose_from_1x1(x: Array, kernel: Array, bias: Array) -> Array:
  """``ConvTranspose2d(k, stride=any, padding=0)`` of a 1×1 input: one matmul.

  out[y, x, o] = Σ_i in[i] · w_torch[i, o, y, x] = Σ_i in[i] · kernel[k−1−y, k−1−x, i, o].

  Args:
    x: (N, C_in) or (N, 1, 1, C_in).
    kernel: (k, k, C_in, C_out); bias: (C_out,).
  Returns:
    (N, k, k, C_out).
  """
  kh, kw, c_in, c_out = kernel.shape
  if x.ndim == 4:
    chex.assert_shape(x, (None, 1, 1, c_in))
    x = x.reshape(x.shape[0], c_in)
  chex.assert_shape(x, (None, c_in))
  y = jnp.dot(x, matmul_weight("1x1", kernel)).reshape(x.shape[0], kh, kw, c_out)
  return y + bias


def _depth_to_space_crop(y: Array, c_out: int) -> Array:
  """(N, H+1, W+1, 4·C) phase blocks → (N, 2H, 2W, C), dropping the outer pixel ring.

  Block (t, u), phase (r, q) (features ordered (r, q, c)) is the uncropped pixel
  (2t + r, 2u + q), i.e. output pixel (2t + r − 1, 2u + q − 1).
  """
  n, hp, wp = y.shape[:3]
  y = y.reshape(n, hp, wp, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  y = y.reshape(n, 2 * hp, 2 * wp, c_out)
  return y[:, 1:2 * hp - 1, 1:2 * wp - 1, :]


def _pad_space_to_depth(g: Array) -> Array:
  """Adjoint of `_depth_to_space_crop`: (N, 2H, 2W, C) → (N, H+1, W+1, 4·C), zero ring."""
  n, h2, w2, c = g.shape
  g = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g = g.reshape(n, h2 // 2 + 1, 2, w2 // 2 + 1, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return g.reshape(n, h2 // 2 + 1, w2 // 2 + 1, 4 * c)


def _windows_2x2(p: Array) -> Array:
  """im2col of 2×2 windows: (N, A+1, B+1, C) → (N, A, B, 4·C), features (dy, dx, c).

  Four shifted slices, concatenated; its adjoint is `_overlap_add_2x2`.
  """
  a, b = p.shape[1] - 1, p.shape[2] - 1
  return jnp.concatenate(
      [p[:, dy:dy + a, dx:dx + b, :] for dy in (0, 1) for dx in (0, 1)], axis=-1)


def _overlap_add_2x2(y: Array) -> Array:
  """col2im of 2×2 windows: (N, A, B, 4·F), features (dy, dx, f) → (N, A+1, B+1, F).

  out[t, u] = Σ_{dy,dx} y[t − dy, u − dx, (dy, dx)] (terms outside the grid are zero).
  """
  f = y.shape[-1] // 4
  return sum(jnp.pad(y[..., (2 * dy + dx) * f:(2 * dy + dx + 1) * f],
                     ((0, 0), (dy, 1 - dy), (dx, 1 - dx), (0, 0)))
             for dy in (0, 1) for dx in (0, 1))


def _weight_grad(a: Array, g: Array) -> Array:
  """Σ over all leading positions of a^T g: a (..., K), g (..., M) → (K, M)."""
  return jnp.dot(a.reshape(-1, a.shape[-1]).T, g.reshape(-1, g.shape[-1]))


def window_weight(kernel: Array) -> Array:
  """The (4·C_in, 4·C_out) matrix of the window form of ConvTranspose2d(4, 2, 1).

  Rows are (dy, dx, i): the input pixel at offset (dy, dx) of a 2×2 window of the input padded
  by 1. Columns are (r, q, o): the output phase. Window (t, u) covers padded pixels
  (t+dy, u+dx) = input pixels (t+dy−1, u+dx−1) and produces output pixels (2t+r−1, 2u+q−1),
  through PyTorch tap 2 + r − 2·dy, i.e. flax tap 2·dy + 1 − r.
  """
  kh, kw, c_in, c_out = kernel.shape
  assert (kh, kw) == (4, 4), kernel.shape
  # (4, 4) taps → (dy, 1−r, dx, 1−q); reverse the phase axes to index by (r, q).
  w = kernel.reshape(2, 2, 2, 2, c_in, c_out)[:, ::-1, :, ::-1]
  w = w.transpose(0, 2, 4, 1, 3, 5)  # (dy, dx, i, r, q, o)
  return w.reshape(4 * c_in, 4 * c_out)


@jax.custom_vjp
def _window_matmul(x: Array, wm: Array) -> Array:
  """x (N, H, W, C_in), wm = window_weight(kernel) → (N, 2H, 2W, C_out), no bias."""
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = jnp.dot(_windows_2x2(xp), wm)  # (N, H+1, W+1, 4·C_out)
  return _depth_to_space_crop(y, wm.shape[1] // 4)


def _window_matmul_fwd(x, wm):
  return _window_matmul(x, wm), (x, wm)


def _window_matmul_bwd(res, g):
  # Hand-written so that XLA sees: one pad+space-to-depth, two matmuls, one fused sum of four
  # slices (the adjoint of the window concat), and no zero-padded partial sums.
  x, wm = res
  _, h, w, c_in = x.shape
  gy = _pad_space_to_depth(g)  # (N, H+1, W+1, 4·C_out)
  gcols = jnp.dot(gy, wm.T)  # (N, H+1, W+1, 4·C_in)
  # Input pixel i is padded pixel i+1, covered by window i+1−dy at offset dy.
  gx = sum(gcols[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w,
                 (2 * dy + dx) * c_in:(2 * dy + dx + 1) * c_in]
           for dy in (0, 1) for dx in (0, 1))
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return gx, _weight_grad(_windows_2x2(xp), gy)


_window_matmul.defvjp(_window_matmul_fwd, _window_matmul_bwd)


def conv_transpose_window(x: Array, kernel: Array, bias: Array) -> Array:
  """ConvTranspose2d(4, 2, 1), window (sub-pixel) form: one (4·C_in → 4·C_out) matmul.

  Args:
    x: (N, H, W, C_in). kernel: (4, 4, C_in, C_out). bias: (C_out,).
  Returns:
    (N, 2H, 2W, C_out).
  """
  chex.assert_rank(x, 4)
  return _window_matmul(x, window_weight(kernel)) + bias


def col2im_weight(kernel: Array) -> Array:
  """The (C_in, 16·C_out) matrix of the col2im form of ConvTranspose2d(4, 2, 1).

  Columns are (a, b, r, q, o) for PyTorch tap (2a + r, 2b + q) (flax tap (3−2a−r, 3−2b−q)).
  """
  kh, kw, c_in, c_out = kernel.shape
  assert (kh, kw) == (4, 4), kernel.shape
  w = kernel[::-1, ::-1].reshape(2, 2, 2, 2, c_in, c_out)  # (a, r, b, q, i, o), PyTorch taps
  w = w.transpose(4, 0, 2, 1, 3, 5)  # (i, a, b, r, q, o)
  return w.reshape(c_in, 16 * c_out)


@jax.custom_vjp
def _col2im_matmul(x: Array, wc: Array) -> Array:
  """x (N, H, W, C_in), wc = col2im_weight(kernel) → (N, 2H, 2W, C_out), no bias."""
  z = _overlap_add_2x2(jnp.dot(x, wc))  # (N, H+1, W+1, 4·C_out)
  return _depth_to_space_crop(z, wc.shape[1] // 16)


def _col2im_matmul_fwd(x, wc):
  return _col2im_matmul(x, wc), (x, wc)


def _col2im_matmul_bwd(res, g):
  # The adjoint of the overlap-add is the 2×2 window im2col of the (padded) output gradient.
  x, wc = res
  gy = _s2d_patches(g)  # (N, H, W, 16·C_out), features (a, b, r, q, o) as in col2im_weight
  return jnp.dot(gy, wc.T), _weight_grad(x, gy)


_col2im_matmul.defvjp(_col2im_matmul_fwd, _col2im_matmul_bwd)


def conv_transpose_col2im(x: Array, kernel: Array, bias: Array) -> Array:
  """ConvTranspose2d(4, 2, 1), col2im form: a (C_in → 16·C_out) matmul then overlap-add.

  Input pixel (i, j) with PyTorch tap (2a + r, 2b + q) lands on output pixel
  (2(i+a) + r − 1, 2(j+b) + q − 1), i.e. phase block (i+a, j+b), phase (r, q).

  Args:
    x: (N, H, W, C_in). kernel: (4, 4, C_in, C_out). bias: (C_out,).
  Returns:
    (N, 2H, 2W, C_out).
  """
  chex.assert_rank(x, 4)
  return _col2im_matmul(x, col2im_weight(kernel)) + bias


def resolve_impl(impl: str) -> str:
  """"auto" → "matmul" on the CPU backend, else "conv"; other values are returned unchanged."""
  if impl not in IMPLS:
    raise ValueError(f"unknown transposed-convolution impl {impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "conv"
  return impl


def conv_transpose(x: Array, kernel: Array, bias: Array, *, stride: int, padding: int,
                   impl: str = "auto") -> Array:
  """``torch.nn.ConvTranspose2d(k, stride, padding)`` on NHWC input, any formulation.

  The matmul formulations cover a 1×1 input with padding 0 and k=4, s=2, p=1; other
  configurations use ``lax.conv_transpose`` whatever ``impl`` says.

  Args:
    x: (N, H, W, C_in).
    kernel: (k, k, C_in, C_out), flax convention (see the module docstring).
    bias: (C_out,).
    impl: one of ``IMPLS``.
  Returns:
    (N, s(H−1)+k−2p, s(W−1)+k−2p, C_out).
  """
  chex.assert_rank(x, 4)
  _, _, c_in, c_out = kernel.shape
  chex.assert_shape(x, (None, None, None, c_in))
  chex.assert_shape(bias, (c_out,))
  variant = matmul_variant(x.shape[1], x.shape[2], kernel.shape, stride, padding, impl)
  if variant == "1x1":
    return conv_transpose_from_1x1(x, kernel, bias)
  if variant == "window":
    return conv_transpose_window(x, kernel, bias)
  if variant == "col2im":
    return conv_transpose_col2im(x, kernel, bias)
  return conv_transpose_lax(x, kernel, bias, stride=stride, padding=padding)


# ------------------------------------------------------------------------------------------------
# Matmul layers as (weight transform, forward, backward) triples, for whole-network custom VJPs
# ------------------------------------------------------------------------------------------------

def matmul_variant(height: int, width: int, kernel_shape: Sequence[int], stride: int,
                   padding: int, impl: str) -> str | None:
  """The matmul form `conv_transpose` uses for this layer: "1x1", "window", "col2im" or None.

  None means ``lax.conv_transpose`` (``impl`` resolves to "conv", or no matmul form covers the
  configuration).
  """
  impl = resolve_impl(impl)
  if impl == "conv":
    return None
  kh, kw = kernel_shape[:2]
  if height == 1 and width == 1 and padding == 0:
    return "1x1"
  if (kh, kw, stride, padding) == (4, 4, 2, 1):
    return "col2im" if impl == "matmul" else impl
  return None


def matmul_weight(variant: str, kernel: Array) -> Array:
  """The matrix of a matmul form: "1x1" (C_in, k·k·C_out); "window" (4·C_in, 4·C_out);
  "col2im" (C_in, 16·C_out). Linear in ``kernel``, so autodiff maps its gradient back."""
  if variant == "1x1":
    kh, kw, c_in, c_out = kernel.shape
    return kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out)
  if variant == "window":
    return window_weight(kernel)
  if variant == "col2im":
    return col2im_weight(kernel)
  raise ValueError(f"unknown matmul variant {variant!r}")


def matmul_forward(variant: str, x: Array, w: Array, c_out: int) -> Array:
  """The layer without bias: x (N, H, W, C_in) → (N, H', W', C_out), w = matmul_weight(...)."""
  if variant == "1x1":
    n = x.shape[0]
    k = math.isqrt(w.shape[1] // c_out)
    return jnp.dot(x.reshape(n, -1), w).reshape(n, k, k, c_out)
  if variant == "window":
    return _window_matmul(x, w)
  if variant == "col2im":
    return _col2im_matmul(x, w)
  raise ValueError(f"unknown matmul variant {variant!r}")


def matmul_backward(variant: str, x: Array, w: Array, g: Array) -> tuple[Array, Array]:
  """VJP of `matmul_forward` at (x, w) for output cotangent g: returns (gx, gw)."""
  if variant == "1x1":
    n = x.shape[0]
    x2, g2 = x.reshape(n, -1), g.reshape(n, -1)
    return jnp.dot(g2, w.T).reshape(x.shape), jnp.dot(x2.T, g2)
  if variant == "window":
    return _window_matmul_bwd((x, w), g)
  if variant == "col2im":
    return _col2im_matmul_bwd((x, w), g)
  raise ValueError(f"unknown matmul variant {variant!r}")


def conv_transpose_params(module: nn.Module, in_features: int, features: int,
                          kernel_size: int) -> tuple[Array, Array]:
  """Declare ``kernel`` (k, k, C_in, C_out) and ``bias`` (C_out,) on ``module`` (compact).

  PyTorch default initialisation of ConvTranspose2d: U(±1/sqrt(C_out·k·k)) for both.
  """
  bound = conv_transpose_bound(features, (kernel_size, kernel_size))
  kernel = module.param("kernel", torch_uniform(bound),
                        (kernel_size, kernel_size, in_features, features))
  bias = module.param("bias", torch_uniform(bound), (features,))
  return kernel, bias


class ConvTranspose2d(nn.Module):
  """``torch.nn.ConvTranspose2d(C_in, features, k, stride, padding)`` on NHWC input.

  Input (N, H, W, C_in) → (N, s(H−1)+k−2p, s(W−1)+k−2p, features). Parameters ``kernel``
  (k, k, C_in, features) and ``bias`` (features,): the same tree as ``flax.linen.ConvTranspose``
  with ``padding=k−1−p`` per side, whichever ``impl`` computes it.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = conv_transpose_params(self, x.shape[-1], self.features, self.kernel_size)
    return conv_transpose(x, kernel, bias, stride=self.stride, padding=self.padding,
                          impl=self.impl)


class ConvTransposeParams(nn.Module):
  """Holds the parameters of a ConvTranspose2d without applying it.

  ``__call__()`` returns ``(kernel, bias)``; used by modules that apply the layer inside a
  ``lax.map`` (linen submodules cannot be called inside raw JAX transforms). Same tree and
  initialisation as ``ConvTranspose2d``.
  """
  in_features: int
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    return conv_transpose_params(self, self.in_features, self.features, self.kernel_size)
