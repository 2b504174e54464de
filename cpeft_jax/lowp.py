"""Low-precision matmuls that every backend computes alike, and the XLA:CPU workarounds they need.

bf16 operands accumulate in float32 and round once, forward and backward; on XLA:CPU the
backward's transposed operands are laid out row-major first (see `bench/` for the timings). Kept
apart from the adaptors so that the Context-PEFT math reads without backend detail.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np


def matmul(x, w):
  """x [..., D] @ w [D, E] in x's dtype.

  Low-precision operands (bf16) accumulate in float32 and round once at the end, forward and
  backward: that is what every backend's bf16 kernels compute, and on XLA:CPU it is also the
  fast path (a bf16 x bf16 -> bf16 dot, or the float32 dot that autodiff's transpose of a
  mixed-precision dot becomes, runs about 2x slower there; see bench/). `w` may be a quantized
  kernel (quantize.QuantizedKernel), which multiplies through `@`.
  """
  if x.dtype == jnp.float32 or not isinstance(w, jax.Array | np.ndarray):
    return x @ w
  return _lowp_matmul(x, w.astype(x.dtype), x.dtype)


def matmul_f32(x, w):
  """x @ w with a float32 result straight from the accumulator (e.g. the LM head's logits)."""
  if x.dtype == jnp.float32:
    return x @ w.astype(jnp.float32)
  if isinstance(w, OutputMajorKernel):  # a prepared head of bf16 weights (generation)
    return w.matmul(x, jnp.float32)
  return _lowp_matmul(x, w.astype(x.dtype), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lowp_matmul(x, w, out_dtype):
  return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _lowp_matmul_fwd(x, w, out_dtype):
  return _lowp_matmul(x, w, out_dtype), (x, w)


def _lowp_matmul_bwd(out_dtype, res, g):
  x, w = res
  g = g.astype(x.dtype)  # cotangents in the compute dtype, as autocast's backward has them
  dx = jnp.matmul(g, transposed(w), preferred_element_type=jnp.float32).astype(x.dtype)
  x_TD, g_TE = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = jnp.matmul(transposed(x_TD), g_TE, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw  # dw of a frozen kernel is never used, and XLA drops its dot


def transposed(a_MN):
  """a.T (the last two axes swapped), laid out row-major on XLA:CPU. There a bf16 dot with a
  transposed operand (which XLA folds a plain `.T` into) runs as a float32 dot at half the
  speed of a row-major one, more than the transpose costs (bench/); elsewhere it is free."""
  t = jnp.swapaxes(a_MN, -1, -2)
  if jax.default_backend() != 'cpu':
    return t
  return jax.lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


# At most this many rows, `OutputMajorKernel`'s product keeps the weights as the dot's left side.
FEW_ROWS = 128


@flax.struct.dataclass
class OutputMajorKernel:
  """A [..., D, E] kernel stored output-major: `data` holds the bytes of its transpose [..., E, D]
  reshaped (a free bitcast) to [..., D, E], so it keeps the kernel's shape for Flax's parameter
  checks, stacks and slices along leading axes like the kernel. `x @ kernel` reads each output's
  weights contiguously, which a memory-bound one-token decoding step on XLA:CPU multiplies faster
  than a row-major [D, E] kernel (generate_text at bench/cases.py's paper shape, float32, 8 rows,
  a 2-core Xeon: 41 to 49 ms a step against 53 to 58; a 2-core EPYC, with the few-row product
  of `__rmatmul__`: 33 ms against 57 before it). No __jax_array__, so nothing reads `data` as the
  kernel by mistake."""
  data: jax.Array

  shape = property(lambda self: self.data.shape)
  ndim = property(lambda self: self.data.ndim)
  dtype = property(lambda self: self.data.dtype)

  @classmethod
  def of(cls, kernel_DE) -> 'OutputMajorKernel':
    # Laid out for real (`transposed`): inside a jitted generation, XLA would otherwise fold the
    # transpose into the dots, some of which XLA:CPU then cannot run in bf16.
    return cls(transposed(kernel_DE).reshape(kernel_DE.shape))

  def transposed(self) -> jax.Array:
    """The [..., E, D] array the bytes hold."""
    *lead, D, E = self.data.shape
    return self.data.reshape(*lead, E, D)

  def astype(self, dtype):
    return self.replace(data=self.data.astype(dtype))

  def __rmatmul__(self, x):
    """x [..., D] @ kernel in x's dtype, accumulated in float32 and rounded once (as `matmul`)."""
    return self.matmul(x, x.dtype)

  def matmul(self, x, out_dtype):
    """x [..., D] @ kernel, accumulated in float32, in `out_dtype`.

    For a few rows (a decoding step's) on XLA:CPU, the product is taken as kernel^T @ x^T,
    [E, D] @ [D, T], and only then transposed: XLA would otherwise fold the transpose into the
    dot and multiply x @ kernel^T, which streams the weights at about half the speed (bench/:
    paper shape, float32, 8 rows, generate_text's one-token step 57 -> 33 ms, 2-core EPYC).
    Many rows (a prompt's) multiply faster as the folded dot."""
    w_ED = self.transposed()
    E, D = w_ED.shape[-2:]
    y_ET = jnp.einsum('ed,td->et', w_ED, x.reshape(-1, D), preferred_element_type=jnp.float32)
    if y_ET.shape[1] <= FEW_ROWS and jax.default_backend() == 'cpu':
      y_ET = jax.lax.optimization_barrier(y_ET)
    return y_ET.T.astype(out_dtype).reshape(*x.shape[:-1], E)
