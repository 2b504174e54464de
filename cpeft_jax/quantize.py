"""A quantized frozen base (QLoRA-style): frozen projections stored as qwix QArrays.

`QuantConfig` names a format (int8, int4 or NF4), per-channel or per-block scales and which
frozen leaves to quantize; `quantize_params` turns a 'params' tree into one whose selected
leaves are quantized, and `leaf_quantizer` does the same one leaf at a time while a checkpoint
loads (`checkpoints.load_decoder_params(..., leaf_fn=leaf_quantizer(qcfg))` for the decoder,
`checkpoints.load_vision(..., leaf_fn=leaf_quantizer(qcfg, 'encoder/'))` for the vision
tower), so no full-precision copy of the whole model is ever held. Quantization,
dequantization and the matmul are qwix's. On a mesh, a quantized leaf's values and scales
follow its kernel's partition rule (train/sharding.py).

The model code does not change: a quantized leaf sits where the array was and behaves like it.
  QuantizedKernel   a ContextDense kernel. `x @ kernel.astype(dtype)` runs qwix.dot_general
                    under jax.checkpoint, so the backward pass keeps the 4/8-bit values and
                    recomputes the dequantized kernel instead of storing it per layer.
  QuantizedArray    any other array (nn.Dense, nn.Embed): reading it (jnp.asarray, astype)
                    dequantizes it; used for the LM head, the embeddings and the vision encoder.
Both are pytrees whose first leaf is the quantized value with the original shape, so Flax's
shape check and nn.scan's slicing over the leading layer axis see them as the array they stand
for. The adaptor tables ('adaptors'), norms, biases and the connector are never quantized.

Kernels [..., d_in, d_out] get a scale per output channel (and per layer); 'block'
granularity also splits d_in into blocks of `block_size` with a scale each (QLoRA uses 64).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import qwix

from cpeft_jax import sharding, trees

FORMATS = {'int8': jnp.int8, 'int4': jnp.int4, 'nf4': 'nf4'}
GRANULARITIES = ('channel', 'block')
# decoder: the decoder blocks' projections; lm_head: the untied output projection; embed: the
# input embedding table; vision: the vision encoder's dense kernels (its patch convolution and
# Swin's tiny position-bias MLP, whose 2 inputs no block divides, stay in full precision).
TARGETS = ('decoder', 'lm_head', 'embed', 'vision')
SCALE_DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How the frozen base is stored. format '' (the default) leaves it in full precision."""
  format: str = ''
  granularity: str = 'block'
  block_size: int = 64
  targets: str = 'decoder'  # comma-separated names of TARGETS
  scale_dtype: str = 'float32'

  def __post_init__(self):
    if self.format not in ('', *FORMATS):
      raise ValueError(f"quantize.format={self.format!r}; expected one of {list(FORMATS)} or '' "
                       '(no quantization).')
    if self.granularity not in GRANULARITIES:
      raise ValueError(f'quantize.granularity={self.granularity!r}; expected one of '
                       f'{GRANULARITIES}.')
    if (not isinstance(self.block_size, int) or isinstance(self.block_size, bool)
        or self.block_size < 1):
      raise ValueError(f'quantize.block_size must be a positive integer, got '
                       f'{self.block_size!r}.')
    unknown = [t for t in self.target_set if t not in TARGETS]
    if unknown or not self.target_set:
      raise ValueError(f'quantize.targets={self.targets!r}; expected comma-separated names '
                       f'of {TARGETS}.')
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f'quantize.scale_dtype={self.scale_dtype!r}; expected one of '
                       f'{SCALE_DTYPES}.')

  @property
  def enabled(self) -> bool:
    return bool(self.format)

  @property
  def target_set(self) -> frozenset[str]:
    return frozenset(t.strip() for t in self.targets.split(',') if t.strip())

  @classmethod
  def from_dict(cls, d) -> QuantConfig:
    """From a config's `quantize` field: a dict/ConfigDict, a format string, or None/''."""
    if isinstance(d, cls):
      return d
    if d is None or isinstance(d, str):
      return cls(format=d or '')
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'Unknown key(s) {unknown} in quantize; expected some of {sorted(names)}.')
    return cls(**d)


def check_peft(qcfg: QuantConfig, peft, train_mode: str = 'peft') -> None:
  """Refuses what needs the full-precision base: DoRA (its column norms of W) and training the
  base itself (train.mode='full')."""
  if not qcfg.enabled:
    return
  if peft is not None and 'dora' in peft.methods:
    raise ValueError(f'quantize.format={qcfg.format!r} with DoRA: DoRA reads ||W|| of the '
                     'full-precision kernels, which a quantized base does not keep; use LoRA, '
                     "IA3 or BitFit, or quantize.format=''.")
  if train_mode == 'full':
    raise ValueError(f"quantize.format={qcfg.format!r} with train.mode='full': a quantized "
                     "base is frozen; train with mode 'peft' or 'connector', or "
                     "quantize.format=''.")


# ----------------------------------------------------------------------------- quantized leaves


@flax.struct.dataclass
class QuantizedArray:
  """A frozen array stored as a qwix QArray; reading it (jnp.asarray, astype) dequantizes it."""
  qarray: qwix.QArray

  shape = property(lambda self: self.qarray.qvalue.shape)
  ndim = property(lambda self: self.qarray.qvalue.ndim)
  dtype = property(lambda self: self.qarray.scale.dtype)

  def dequantize(self, dtype=None) -> jax.Array:
    x = qwix.dequantize(self.qarray)
    return x if dtype is None else x.astype(dtype)

  def __jax_array__(self):
    return self.dequantize()

  def astype(self, dtype):
    return self.dequantize(dtype)

  @property
  def T(self):  # noqa: N802  (tied embeddings read embedding.T)
    return self.dequantize().T


@flax.struct.dataclass
class QuantizedKernel:
  """A frozen [..., d_in, d_out] kernel as a qwix QArray, for `x @ kernel.astype(dtype)`.

  No __jax_array__: `x @ kernel` then falls to __rmatmul__, which multiplies through qwix.
  """
  qarray: qwix.QArray
  compute_dtype: Any = flax.struct.field(pytree_node=False, default=None)

  shape = property(lambda self: self.qarray.qvalue.shape)
  ndim = property(lambda self: self.qarray.qvalue.ndim)
  dtype = property(lambda self: jnp.dtype(self.compute_dtype or self.qarray.scale.dtype))

  def dequantize(self, dtype=None) -> jax.Array:
    return qwix.dequantize(self.qarray).astype(dtype or self.dtype)

  def astype(self, dtype):
    return self.replace(compute_dtype=jnp.dtype(dtype))

  def __rmatmul__(self, x):
    return _qmatmul(x, self.qarray, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _qmatmul(x, qarray, dtype):
  """x [..., d_in] @ kernel [d_in, d_out] in `dtype`; the backward recomputes the dequantization."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  # Accumulated in float32 and rounded once, as lowp.matmul (XLA:CPU's fast bf16 path).
  return qwix.dot_general(x.astype(dtype), qarray.astype(dtype), dims,
                          preferred_element_type=jnp.float32).astype(dtype)


QUANTIZED = (QuantizedArray, QuantizedKernel)


def is_quantized(x) -> bool:
  return isinstance(x, QUANTIZED)


# ----------------------------------------------------------------------------- selection


def leaf_kind(path: str, ndim: int, qcfg: QuantConfig) -> str | None:
  """'kernel' (a ContextDense kernel), 'array', 'embedding' or None (kept) for a 'params' path.

  Paths are '/'-joined inside the VLM's 'params' (decoder/..., encoder/..., connector/...).
  """
  if not qcfg.enabled:
    return None
  t = qcfg.target_set
  if 'decoder' in t and re.fullmatch(r'decoder/layers/.+/kernel', path) and ndim == 3:
    return 'kernel'
  if 'lm_head' in t and path == 'decoder/lm_head/kernel':
    return 'array'
  if 'embed' in t and path == 'decoder/embed_tokens/embedding':
    return 'embedding'
  if ('vision' in t and re.fullmatch(r'encoder/.+/kernel', path) and ndim in (2, 3)
      and '/cpb_mlp_' not in path):
    return 'array'
  return None


def _axes(shape, kind: str, qcfg: QuantConfig, path: str):
  """(channelwise_axes, tiled_axes): one scale per output channel (per layer), and per block
  of the contracted axis with 'block' granularity. An embedding's rows play the channels."""
  ndim = len(shape)
  inner = ndim - 1 if kind == 'embedding' else ndim - 2  # the axis a scale's block runs along
  channels = tuple(a for a in range(ndim) if a != inner)
  if qcfg.granularity == 'channel':
    return channels, {}
  if shape[inner] % qcfg.block_size:
    raise ValueError(f'{path} has shape {tuple(shape)}: its axis {inner} ({shape[inner]}) is not '
                     f'a multiple of quantize.block_size={qcfg.block_size}; choose a block size '
                     "that divides it or quantize.granularity='channel'.")
  return channels, {inner: qcfg.block_size}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(x, qtype, channels, tiled, scale_dtype):
  q = qwix.quantize(x, qtype, channelwise_axes=channels, tiled_axes=dict(tiled))
  return dataclasses.replace(q, scale=q.scale.astype(scale_dtype))


def quantize_leaf(x, path: str, qcfg: QuantConfig):
  """The quantized form of one leaf, or the leaf itself where `qcfg` keeps it.

  A host (numpy) leaf stacked over layers [L, ...] is quantized one layer at a time (its scales
  are per layer anyway, so the result is the same): while a checkpoint loads, only one layer's
  full-precision copy exists beside the loader's buffer, not a second copy of the whole leaf.
  """
  kind = leaf_kind(path, np.ndim(x), qcfg)
  if kind is None or is_quantized(x):
    return x
  channels, tiled = _axes(np.shape(x), kind, qcfg, path)
  if isinstance(x, np.ndarray) and x.ndim >= 3 and 0 in channels:
    inner = ({a - 1: b for a, b in tiled.items()}, tuple(c - 1 for c in channels if c))
    layers = [_quantize_array(x[i], *inner[::-1], qcfg) for i in range(x.shape[0])]
    q = jax.tree.map(lambda *parts: jnp.stack(parts), *layers)
  else:
    q = _quantize_array(x, channels, tiled, qcfg)
  return QuantizedKernel(q) if kind == 'kernel' else QuantizedArray(q)


def _quantize_array(x, channels, tiled, qcfg: QuantConfig) -> qwix.QArray:
  # qwix takes the scale's dtype from the array: quantize in float32 at least, then store.
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return _quantize(x, FORMATS[qcfg.format], channels, tuple(sorted(tiled.items())),
                   jnp.dtype(qcfg.scale_dtype))


def quantize_placed(x: jax.Array, path: str, qcfg: QuantConfig, placement: sharding.Placement,
                    at: str):
  """`quantize_leaf` of a sharded leaf by a jit whose outputs (values and scales) are created in
  their shardings (`placement` at path `at`; see sharding.py): each device quantizes its block,
  reductions of a scale over a split axis run as collectives, no device sees the whole leaf."""
  if leaf_kind(path, np.ndim(x), qcfg) is None or is_quantized(x):
    return x
  fn = lambda a: quantize_leaf(a, path, qcfg)
  return jax.jit(fn, out_shardings=placement.tree(jax.eval_shape(fn, x), at))(x)


def quantize_params(params: Mapping[str, Any], qcfg: QuantConfig,
                    placement: sharding.Placement | None = None) -> dict:
  """A 'params' tree with the leaves `qcfg` selects quantized (already quantized ones kept).

  `placement` (prefix 'params/'): each quantized leaf is created in the rules' shardings.
  """
  flat = trees.flatten(params)
  out = {}
  for path in list(flat):
    x = flat.pop(path)
    out[path] = (quantize_leaf(x, path, qcfg) if placement is None
                 else quantize_placed(x, path, qcfg, placement, path))
  return trees.unflatten(out)


def leaf_quantizer(qcfg: QuantConfig, prefix: str = 'decoder/',
                   placement: sharding.Placement | None = None) -> Callable[[str, Any], Any]:
  """`leaf_fn(path, array)` for checkpoints.load_decoder_params: quantizes each leaf as it is read.

  `prefix` places the checkpoint's paths inside the VLM's 'params' ('decoder/' for a decoder).
  Each leaf is ready before the next is read: an asynchronous quantization would hold the
  loader's full-precision tensor alive until it ran, so two could be alive at once. With
  `placement` (the loader's, e.g. prefix 'params/decoder/'), the loader's leaves are sharded
  and so is each quantized leaf (`quantize_placed`).
  """
  def leaf_fn(path, x):
    if placement is not None:
      return jax.block_until_ready(quantize_placed(x, prefix + path, qcfg, placement, path))
    q = quantize_leaf(x, prefix + path, qcfg)
    return jax.block_until_ready(jnp.asarray(x) if q is x else q)
  return leaf_fn


def dequantize_params(params: Mapping[str, Any], dtype=None) -> dict:
  """The full-precision tree that a quantized one stands for (a reference for tests)."""
  return jax.tree.map(lambda x: x.dequantize(dtype or x.qarray.scale.dtype)
                      if is_quantized(x) else x, params, is_leaf=is_quantized)


def quantized_paths(params) -> list[str]:
  flat = trees.flatten(params)
  return sorted(p for p, x in flat.items() if is_quantized(x))


# ----------------------------------------------------------------------------- accounting


def _bits(dtype) -> int:
  for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
    try:
      return info(dtype).bits
    except (ValueError, TypeError):
      pass
  return np.dtype(dtype).itemsize * 8


def param_bytes(tree) -> int:
  """Bytes of a tree's leaves (arrays or jax.ShapeDtypeStructs) from their shapes and dtypes.

  4-bit values count as half a byte each, as packed storage (and accelerators) hold them.
  """
  return sum(int(np.prod(x.shape)) * _bits(x.dtype) // 8 for x in jax.tree.leaves(tree))
