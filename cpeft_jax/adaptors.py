"""Context-indexed adaptors: a dense layer with a frozen base and per-context tables.

Every token carries an integer context id. Each adapted projection owns one group of adaptor
parameters per context, stored as tables with a leading context ("row") axis:

  LoRA    lora_a [R, d_in, r], lora_b [R, r, d_out]   (B is zero at init)
  IA3     ia3    [R, d_out] (keys/values) or [R, d_in] (feed-forward input), ones at init
  BitFit  bitfit [R, d_out], zeros at init
  DoRA    lora_a, lora_b as LoRA, plus dora_m [R, d_out], the magnitude (||W||_col at init)

R is the number of *adapted* contexts: a context left out of `PeftConfig.adapted_contexts` has
no row and its tokens see the frozen base only. A layer computes, per token t of context c,

  y_t = ((x_t * ia3_in[c]) @ W + b) * ia3_out[c] + bitfit[c] + scale * dropout(x_t) @ A_c @ B_c

and for a DoRA context (PyTorch PEFT's DoRA, with g_c = m_c / ||W + s_c A_c B_c||_col held
constant in the gradient) y_t = g_c * (x_t @ W + s_c x_t @ A_c @ B_c) + b + bitfit[c].

Each context may have its own methods, rank, alpha, scaling rule, init and dropout
(`PeftConfig.contexts`). The tables are then padded to the largest rank and a static per-row
mask makes the padding inert: it contributes nothing, receives exactly zero gradient, and, being
zero at init, stays zero under Adam. A row whose context lacks a method is masked to the
method's identity (IA3 ones, BitFit zeros) in the same way.

Nothing here ever materialises a per-token copy of a LoRA matrix: tokens are routed once per
forward pass (`route`), then each layer runs one grouped computation (see `LORA_STRATEGIES`).
The base weights live in the 'params' collection, the tables in the 'adaptors' collection, so
the trainable tree and the frozen tree are separate arguments of `Module.apply`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ADAPTORS = 'adaptors'  # the variable collection holding every trainable table
METHODS = ('lora', 'ia3', 'bitfit', 'dora')
LORA_INITS = ('kaiming_uniform', 'gaussian')
# onehot: the paper's einsum with a one-hot selector; cost grows with the number of rows R.
# grouped: tokens sorted by context into tiles, one batched matmul with A/B gathered per tile;
#   cost ~ (tokens + R * tile) regardless of R.
# ragged: tokens sorted by context, jax.lax.ragged_dot (grouped kernels on GPU/TPU).
# auto: dense LoRA for one row, onehot for two, grouped beyond (measured in bench/).
LORA_STRATEGIES = ('auto', 'onehot', 'grouped', 'ragged')
# Target presets of the paper: A = attention projections, F = feed-forward projections.
PRESETS = ('A', 'F', 'AF', 'all')


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters shared by every adapted projection and context."""
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False  # scale alpha / sqrt(rank) (rsLoRA) instead of alpha / rank
  init: str = 'kaiming_uniform'  # A's init: 'kaiming_uniform' (as PEFT) or 'gaussian' (std 1/r)
  dropout: float = 0.0  # dropout on the LoRA branch's input, as PEFT's lora_dropout

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class ContextSpec:
  """One context's adaptor: its methods and LoRA hyper-parameters; None inherits peft's own.

  methods: a tuple of names, or a string such as 'lora+bitfit' or 'none'. The LoRA fields
  apply to 'lora' and 'dora'. After `PeftConfig` resolves it, every field is set.
  """
  methods: tuple[str, ...] | str | None = None
  rank: int | None = None
  alpha: float | None = None
  rslora: bool | None = None
  init: str | None = None
  dropout: float | None = None

  @property
  def lora(self) -> LoraConfig:
    return LoraConfig(rank=self.rank, alpha=self.alpha, rslora=self.rslora, init=self.init,
                      dropout=self.dropout)

  @property
  def low_rank(self) -> bool:
    """Whether this context uses the LoRA tables (as 'lora' or as 'dora')."""
    return 'lora' in self.methods or 'dora' in self.methods


_LORA_FIELDS = ('rank', 'alpha', 'rslora', 'init', 'dropout')


def _parse_methods(methods, where: str) -> tuple[str, ...]:
  if isinstance(methods, str):
    methods = () if methods.strip() in ('', 'none') else tuple(
        m.strip() for m in methods.split('+'))
  methods = tuple(methods)
  for m in methods:
    if m not in METHODS:
      raise ValueError(f'Unknown PEFT method {m!r} in {where}; expected some of {METHODS} '
                       "(or 'none').")
  if len(set(methods)) != len(methods):
    raise ValueError(f'{where}={methods} lists a method twice.')
  if 'lora' in methods and 'dora' in methods:
    raise ValueError(f"{where}={methods}: 'lora' and 'dora' share the LoRA tables; give one.")
  return methods


def _check_lora(lo, where: str):
  if not isinstance(lo.rank, int) or isinstance(lo.rank, bool) or lo.rank < 1:
    raise ValueError(f'{where}.rank must be an integer >= 1, got {lo.rank!r}.')
  if not lo.alpha > 0:
    raise ValueError(f'{where}.alpha must be > 0, got {lo.alpha!r}.')
  if lo.init not in LORA_INITS:
    raise ValueError(f'{where}.init={lo.init!r}; expected one of {LORA_INITS}.')
  if not 0.0 <= lo.dropout < 1.0:
    raise ValueError(f'{where}.dropout must be in [0, 1), got {lo.dropout!r}.')


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Which methods adapt which projections, and for how many contexts.

  `targets` is a preset ('A', 'F', 'AF', 'all') or comma-separated glob patterns over the
  projection names of a block (e.g. 'q_proj,v_proj' or 'attn/*'). IA3 reads presets as the
  paper does (A: keys and values, F: the feed-forward intermediate); `method_targets` overrides
  the targets of single methods, e.g. {'bitfit': 'all'}.

  `contexts` gives each context its own `ContextSpec` (methods, rank, alpha, rslora, init,
  dropout; unset fields inherit `methods` and `lora`): either a sequence with one entry per
  context, e.g. [{'methods': 'lora', 'rank': 64}, {'methods': 'lora+bitfit', 'rank': 8},
  {'methods': 'none'}], or a mapping {'c1': {'rank': 16}} of overrides for some contexts (on the
  command line: --config.peft.contexts.c1.rank=16). `methods` then becomes the union of the
  contexts' methods and `adapted_contexts` the contexts with any method.
  """
  methods: tuple[str, ...] = ()
  targets: str = 'AF'
  method_targets: tuple[tuple[str, str], ...] = ()
  num_contexts: int = 1
  adapted_contexts: tuple[int, ...] | None = None  # None: every context has a row
  lora: LoraConfig = LoraConfig()
  strategy: str = 'auto'
  tile: int = 64  # tokens per tile of the grouped strategy
  contexts: tuple[ContextSpec, ...] | None = None  # per-context specs; None: all alike

  def __post_init__(self):
    object.__setattr__(self, 'methods', _parse_methods(self.methods, 'peft.methods'))
    if isinstance(self.method_targets, Mapping):
      object.__setattr__(self, 'method_targets', tuple(sorted(self.method_targets.items())))
    if self.adapted_contexts is not None:
      object.__setattr__(self, 'adapted_contexts', tuple(int(c) for c in self.adapted_contexts))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, 'lora', config_from_dict(LoraConfig, self.lora, 'peft.lora'))
    if self.contexts is not None:
      self._resolve_contexts()
    self.validate()

  def _resolve_contexts(self):
    """Fills every context's spec from the defaults; derives methods and adapted_contexts."""
    raw, C = self.contexts, self.num_contexts
    if not isinstance(C, int) or C < 1:
      raise ValueError(f'peft.num_contexts must be an integer >= 1, got {C!r}.')
    if hasattr(raw, 'to_dict'):
      raw = raw.to_dict()
    if isinstance(raw, Mapping):
      entries = [{} for _ in range(C)]
      for key, spec in raw.items():
        k = str(key)
        c = int(k[1:]) if k[:1] == 'c' and k[1:].isdigit() else int(k) if k.isdigit() else None
        if c is None or not 0 <= c < C:
          raise ValueError(f'peft.contexts key {key!r} must name a context as c0..c{C - 1} '
                           f'(num_contexts={C}).')
        entries[c] = spec
    elif isinstance(raw, (list, tuple)):
      if len(raw) != C:
        raise ValueError(f'peft.contexts lists {len(raw)} contexts but peft.num_contexts={C}; '
                         'give one entry per context.')
      entries = list(raw)
    else:
      raise ValueError(f'peft.contexts must be a list of per-context specs or a mapping '
                       f"{{'c<i>': spec}}, got {type(raw).__name__}.")
    specs = []
    for c, e in enumerate(entries):
      where = f'peft.contexts[{c}]'
      if not isinstance(e, ContextSpec):
        if hasattr(e, 'to_dict'):
          e = e.to_dict()
        if not isinstance(e, Mapping):
          fields = [f.name for f in dataclasses.fields(ContextSpec)]
          raise ValueError(f'{where} must be a dict of {fields}, got {e!r}.')
        e = config_from_dict(ContextSpec, e, where)
      methods = _parse_methods(self.methods if e.methods is None else e.methods,
                               f'{where}.methods')
      fill = {f: getattr(self.lora, f) if getattr(e, f) is None else getattr(e, f)
              for f in _LORA_FIELDS}
      spec = ContextSpec(methods=methods, **fill)
      if spec.low_rank:
        _check_lora(spec.lora, where)
      specs.append(spec)
    adapted = tuple(c for c, sp in enumerate(specs) if sp.methods)
    if not adapted:
      raise ValueError('peft.contexts gives no context any method; at least one must be adapted.')
    if self.adapted_contexts is not None and tuple(self.adapted_contexts) != adapted:
      raise ValueError(f'peft.adapted_contexts={self.adapted_contexts} disagrees with '
                       f'peft.contexts, which adapts {adapted}; give unadapted contexts '
                       "methods='none' instead.")
    union = tuple(m for m in METHODS if any(m in sp.methods for sp in specs))
    object.__setattr__(self, 'contexts', tuple(specs))
    object.__setattr__(self, 'methods', union)
    object.__setattr__(self, 'adapted_contexts', adapted)

  def validate(self):
    for m, _ in self.method_targets:
      if m not in self.methods:
        raise ValueError(f'peft.method_targets names {m!r}, which is not in peft.methods='
                         f'{self.methods}.')
    if not isinstance(self.num_contexts, int) or self.num_contexts < 1:
      raise ValueError(f'peft.num_contexts must be an integer >= 1, got {self.num_contexts!r}.')
    if self.adapted_contexts is not None:
      bad = [c for c in self.adapted_contexts if not 0 <= c < self.num_contexts]
      if bad or len(set(self.adapted_contexts)) != len(self.adapted_contexts) or (
          not self.adapted_contexts):
        raise ValueError(
            f'peft.adapted_contexts={self.adapted_contexts} must be distinct context ids in '
            f'[0, {self.num_contexts}) (num_contexts), at least one.')
    _check_lora(self.lora, 'peft.lora')
    if self.strategy not in LORA_STRATEGIES:
      raise ValueError(f'peft.strategy={self.strategy!r}; expected one of {LORA_STRATEGIES}.')
    if not isinstance(self.tile, int) or self.tile < 1:
      raise ValueError(f'peft.tile must be an integer >= 1, got {self.tile!r}.')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PeftConfig:
    """Builds from a dict or ml_collections ConfigDict; unknown keys are an error."""
    return config_from_dict(cls, d, 'peft')

  @property
  def rows(self) -> tuple[int, ...]:
    """The adapted contexts, in table-row order."""
    if self.adapted_contexts is None:
      return tuple(range(self.num_contexts))
    return self.adapted_contexts

  @property
  def num_rows(self) -> int:
    return len(self.rows)

  def targets_of(self, method: str) -> str:
    return dict(self.method_targets).get(method, self.targets)

  @property
  def specs(self) -> tuple[ContextSpec, ...]:
    """Every context's resolved spec (unadapted contexts have no methods)."""
    if self.contexts is not None:
      return self.contexts
    lo = {f: getattr(self.lora, f) for f in _LORA_FIELDS}
    rows = set(self.rows)
    return tuple(ContextSpec(methods=self.methods if c in rows else (), **lo)
                 for c in range(self.num_contexts))

  @property
  def row_specs(self) -> tuple[ContextSpec, ...]:
    """The specs of the adapted contexts, in table-row order."""
    specs = self.specs
    return tuple(specs[c] for c in self.rows)

  @property
  def uniform(self) -> bool:
    """Whether every adapted context has the same spec (no masks, one scalar scale)."""
    return len(set(self.row_specs)) == 1


def config_from_dict(cls, d, where: str):
  """Builds config dataclass `cls` from a dict or ConfigDict; unknown keys name `where`."""
  if isinstance(d, cls):
    return d
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in {where}; expected some of {sorted(names)}.')
  for k, v in d.items():
    if isinstance(v, list):
      d[k] = tuple(v)
  return cls(**d)


# ----------------------------------------------------------------------------- target selection


@dataclasses.dataclass(frozen=True)
class Projection:
  """A projection of an architecture's block, as target selection sees it.

  group: 'A' (attention) or 'F' (feed-forward). ia3: where the paper's IA3 presets scale it:
  'out' for keys and values, 'in' for the feed-forward down projection, None otherwise.
  """
  name: str
  group: str
  ia3: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerAdaptor:
  """Which methods one projection carries; ia3 is 'in', 'out' or None."""
  lora: bool = False
  bitfit: bool = False
  ia3: str | None = None
  dora: bool = False

  @property
  def any(self) -> bool:
    return self.lora or self.bitfit or self.ia3 is not None or self.dora

  def rows_with(self, method: str, peft: PeftConfig) -> np.ndarray:
    """Static bool [R]: which table rows this projection adapts with `method`."""
    here = {'lora': self.lora, 'dora': self.dora, 'bitfit': self.bitfit,
            'ia3': self.ia3 is not None}[method]
    return np.array([here and method in s.methods for s in peft.row_specs], bool)

  def ranks(self, peft: PeftConfig) -> np.ndarray:
    """Static int [R]: each row's real LoRA rank in this projection (0: no LoRA tables used)."""
    used_R = self.rows_with('lora', peft) | self.rows_with('dora', peft)
    return np.array([s.rank if u else 0 for s, u in zip(peft.row_specs, used_R)], np.int64)


def _match(spec: str, projections: Sequence[Projection], method: str) -> set[str]:
  names = [p.name for p in projections]
  if spec in PRESETS:
    groups = {'A': 'A', 'F': 'F', 'AF': 'AF', 'all': 'AF'}[spec]
    chosen = {p.name for p in projections if p.group in groups}
    if method == 'ia3' and spec != 'all':
      chosen = {p.name for p in projections if p.name in chosen and p.ia3}
    return chosen
  chosen = set()
  for pattern in (s.strip() for s in spec.split(',')):
    hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)
            or fnmatch.fnmatchcase(n.rsplit('/', 1)[-1], pattern)}
    if not pattern or not hits:
      raise ValueError(
          f'PEFT target {pattern!r} (for {method}) matches no projection; presets are '
          f'{PRESETS} and the projections of this model are {names}.')
    chosen |= hits
  return chosen


def resolve_targets(peft: PeftConfig | None,
                    projections: Sequence[Projection]) -> dict[str, LayerAdaptor]:
  """Maps every projection name to the methods it carries; unmatched targets are an error."""
  out = {p.name: LayerAdaptor() for p in projections}
  if peft is None:
    return out
  by_name = {p.name: p for p in projections}
  for method in peft.methods:
    for name in _match(peft.targets_of(method), projections, method):
      cur = out[name]
      if method == 'ia3':
        cur = dataclasses.replace(cur, ia3=by_name[name].ia3 or 'out')
      else:
        cur = dataclasses.replace(cur, **{method: True})
      out[name] = cur
  if peft.methods and not any(a.any for a in out.values()):
    raise ValueError(f'peft.targets={peft.targets!r} selects no projection for {peft.methods}.')
  return out


# ----------------------------------------------------------------------------- routing


def check_context_ids(context_ids, num_contexts: int, what: str = 'context_ids'):
  """Raises if concrete context ids fall outside [0, num_contexts); tracers pass unchecked."""
  if isinstance(context_ids, jax.core.Tracer):
    return
  ids = np.asarray(context_ids)
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'{what} must be an integer array, got dtype {ids.dtype}.')
  if ids.size and (ids.min() < 0 or ids.max() >= num_contexts):
    raise ValueError(f'{what} holds values in [{ids.min()}, {ids.max()}], but the model has '
                     f'num_contexts={num_contexts} (valid ids are 0..{num_contexts - 1}).')


@flax.struct.dataclass
class Routing:
  """Where each token's adaptor group lives; computed once per forward pass, used by all layers.

  row_T: table row of each (flattened) token, R for tokens without an adaptor.
  The grouped strategy adds, for P = tiles * tile padded slots:
  slot_T: each token's slot in the context-sorted padded buffer (P for unadapted tokens);
  token_P: the token in each slot (T for padding); tile_row_N: each tile's table row;
  used_tiles: how many leading tiles hold tokens (the rest are all padding and skipped).
  The ragged strategy adds order_T (tokens sorted by row), unorder_T and sizes_G (R+1 groups).
  """
  row_T: jax.Array
  num_rows: int = flax.struct.field(pytree_node=False)
  strategy: str = flax.struct.field(pytree_node=False)
  slot_T: jax.Array | None = None
  token_P: jax.Array | None = None
  tile_row_N: jax.Array | None = None
  used_tiles: jax.Array | None = None
  order_T: jax.Array | None = None
  unorder_T: jax.Array | None = None
  sizes_G: jax.Array | None = None


def _pick_strategy(strategy: str, num_rows: int) -> str:
  if num_rows == 1:
    return 'dense'
  if strategy == 'auto':
    return 'onehot' if num_rows <= 2 else 'grouped'
  return strategy


def route(context_ids, peft: PeftConfig) -> Routing:
  """Sorts the tokens of `context_ids` (any shape) into adaptor groups for every layer."""
  ids_T = jnp.asarray(context_ids, jnp.int32).reshape(-1)
  R = peft.num_rows
  row_of_context = np.full((peft.num_contexts,), R, np.int32)
  row_of_context[list(peft.rows)] = np.arange(R, dtype=np.int32)
  # Out-of-range ids (only possible under jit, where they cannot be checked) get no adaptor.
  row_T = jnp.take(jnp.asarray(row_of_context), ids_T, mode='fill', fill_value=R)
  strategy = _pick_strategy(peft.strategy, R)
  T = ids_T.shape[0]
  if strategy == 'grouped':
    tile = min(peft.tile, T)
    n_tiles = -(-T // tile) + R  # each group's padding adds at most one tile
    P = n_tiles * tile
    onehot_TR = (row_T[:, None] == jnp.arange(R)[None, :]).astype(jnp.int32)
    count_R = onehot_TR.sum(0)
    padded_R = -(-count_R // tile) * tile
    start_R = jnp.cumsum(padded_R) - padded_R
    rank_T = jnp.take_along_axis(jnp.cumsum(onehot_TR, 0),
                                 jnp.minimum(row_T, R - 1)[:, None], axis=1)[:, 0] - 1
    slot_T = jnp.where(row_T < R, start_R[jnp.minimum(row_T, R - 1)] + rank_T, P)
    token_P = jnp.full((P + 1,), T, jnp.int32).at[slot_T].set(jnp.arange(T, dtype=jnp.int32))[:P]
    tile_start_N = jnp.arange(n_tiles, dtype=jnp.int32) * tile
    # A group with no tokens shares its start with the next group; the later group owns it.
    tile_row_N = (tile_start_N[:, None] >= start_R[None, :]).sum(1).astype(jnp.int32) - 1
    used = (padded_R.sum() // tile).astype(jnp.int32)
    return Routing(row_T, R, strategy, slot_T=slot_T, token_P=token_P, tile_row_N=tile_row_N,
                   used_tiles=used)
  if strategy == 'ragged':
    order_T = jnp.argsort(row_T, stable=True).astype(jnp.int32)
    unorder_T = jnp.zeros_like(order_T).at[order_T].set(jnp.arange(T, dtype=jnp.int32))
    sizes_G = jnp.bincount(row_T, length=R + 1).astype(jnp.int32)
    return Routing(row_T, R, strategy, order_T=order_T, unorder_T=unorder_T, sizes_G=sizes_G)
  return Routing(row_T, R, strategy)


# ----------------------------------------------------------------------------- grouped math


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
  return _lowp_matmul(x, w.astype(x.dtype), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lowp_matmul(x, w, out_dtype):
  return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def _lowp_matmul_fwd(x, w, out_dtype):
  return _lowp_matmul(x, w, out_dtype), (x, w)


def _lowp_matmul_bwd(out_dtype, res, g):
  x, w = res
  g = g.astype(x.dtype)  # cotangents in the compute dtype, as autocast's backward has them
  dx = jnp.matmul(g, _transposed(w), preferred_element_type=jnp.float32).astype(x.dtype)
  x_TD, g_TE = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = jnp.matmul(_transposed(x_TD), g_TE, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw  # dw of a frozen kernel is never used, and XLA drops its dot


def _transposed(a_MN):
  """a.T (the last two axes swapped), laid out row-major on XLA:CPU. There a bf16 dot with a
  transposed operand (which XLA folds a plain `.T` into) runs as a float32 dot at half the
  speed of a row-major one, more than the transpose costs (bench/); elsewhere it is free."""
  t = jnp.swapaxes(a_MN, -1, -2)
  if jax.default_backend() != 'cpu':
    return t
  return jax.lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


def _select(table_RD, routing: Routing, dtype, fill: float):
  """Per-token row of a vector table: [T, D]; `fill` for tokens without an adaptor."""
  R = routing.num_rows
  table_RD = table_RD.astype(dtype)
  if R == 1:
    sel = jnp.broadcast_to(table_RD[0], (routing.row_T.shape[0], table_RD.shape[-1]))
    return jnp.where((routing.row_T == 0)[:, None], sel, jnp.asarray(fill, dtype))
  onehot_TR = jax.nn.one_hot(routing.row_T, R, dtype=dtype)
  sel = onehot_TR @ table_RD
  if fill:
    sel = sel + (1 - onehot_TR.sum(-1, keepdims=True)) * fill
  return sel


@jax.custom_vjp
def _permute_rows(x_ND, take_M, inverse_N):
  """out[m] = x[take[m]], zero where take[m] >= N; `inverse` is the inverse partial permutation.

  The transpose of an injective row gather is the gather by its inverse, so the backward pass
  is a gather as well (XLA would otherwise emit a scatter-add, which is slow on CPU).
  """
  return jnp.take(x_ND, take_M, axis=0, mode='fill', fill_value=0)


def _permute_rows_fwd(x_ND, take_M, inverse_N):
  return _permute_rows(x_ND, take_M, inverse_N), (take_M, inverse_N)


def _permute_rows_bwd(res, g_MD):
  take_M, inverse_N = res
  return jnp.take(g_MD, inverse_N, axis=0, mode='fill', fill_value=0), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@jax.custom_vjp
def _tile_lora(x_NtD, a_RDr, b_RrE, row_N, used):
  """y[n] = x[n] @ A[row[n]] @ B[row[n]] for the first `used` tiles n (zeros after them).

  One plain matmul pair per tile in a loop whose trip count is the number of tiles that hold
  tokens, so padding tiles cost nothing. Neither direction copies A or B per tile: the loop
  indexes them, and the backward accumulates dA[row], dB[row] in place in its carry.
  """
  return _tile_lora_fwd(x_NtD, a_RDr, b_RrE, row_N, used)[0]


def _tile_lora_fwd(x_NtD, a_RDr, b_RrE, row_N, used):
  N, t, _ = x_NtD.shape
  r, E = b_RrE.shape[1:]

  def body(n, carry):
    h_Ntr, y_NtE = carry
    row = row_N[n]
    h_tr = x_NtD[n] @ a_RDr[row]
    return h_Ntr.at[n].set(h_tr), y_NtE.at[n].set(h_tr @ b_RrE[row])
  init = (jnp.zeros((N, t, r), x_NtD.dtype), jnp.zeros((N, t, E), x_NtD.dtype))
  h_Ntr, y_NtE = jax.lax.fori_loop(0, used, body, init)
  return y_NtE, (x_NtD, a_RDr, b_RrE, row_N, used, h_Ntr)


def _tile_lora_bwd(res, g_NtE):
  x_NtD, a_RDr, b_RrE, row_N, used, h_Ntr = res

  def body(n, carry):
    dx_NtD, da_RDr, db_RrE = carry
    row, g_tE = row_N[n], g_NtE[n]
    dh_tr = g_tE @ b_RrE[row].T
    db_RrE = db_RrE.at[row].add(h_Ntr[n].T @ g_tE)
    da_RDr = da_RDr.at[row].add(x_NtD[n].T @ dh_tr)
    return dx_NtD.at[n].set(dh_tr @ a_RDr[row].T), da_RDr, db_RrE
  init = (jnp.zeros_like(x_NtD), jnp.zeros_like(a_RDr), jnp.zeros_like(b_RrE))
  dx_NtD, da_RDr, db_RrE = jax.lax.fori_loop(0, used, body, init)
  return dx_NtD, da_RDr, db_RrE, None, None


_tile_lora.defvjp(_tile_lora_fwd, _tile_lora_bwd)


def lora_delta(x_TD, a_RDr, b_RrE, routing: Routing):
  """sum over rows of onehot[t, c] * x_t @ A_c @ B_c, by the routing's strategy."""
  R = routing.num_rows
  row_T = routing.row_T
  if routing.strategy == 'dense':
    h_Tr = matmul(x_TD, a_RDr[0])
    h_Tr = jnp.where((row_T == 0)[:, None], h_Tr, 0)
    return matmul(h_Tr, b_RrE[0])
  if routing.strategy == 'onehot':
    onehot_TR = jax.nn.one_hot(row_T, R, dtype=x_TD.dtype)
    (T, D), (_, r, E) = x_TD.shape, b_RrE.shape
    h_TRr = matmul(x_TD, a_RDr.transpose(1, 0, 2).reshape(D, R * r)).reshape(T, R, r)
    return matmul((h_TRr * onehot_TR[:, :, None]).reshape(T, R * r), b_RrE.reshape(R * r, E))
  if routing.strategy == 'grouped':
    n_tiles = routing.tile_row_N.shape[0]
    tile = routing.token_P.shape[0] // n_tiles
    # XLA:CPU runs these skinny bf16 matmuls slower than float32 ones (bench/: C=8 LoRA
    # projection 1.70x vs 1.30x of C=1), so the tiles compute in float32 there.
    dtype = jnp.float32 if jax.default_backend() == 'cpu' else x_TD.dtype
    x_NtD = _permute_rows(x_TD, routing.token_P, routing.slot_T).reshape(n_tiles, tile, -1)
    y_NtE = _tile_lora(x_NtD.astype(dtype), a_RDr.astype(dtype), b_RrE.astype(dtype),
                       routing.tile_row_N, routing.used_tiles).astype(x_TD.dtype)
    return _permute_rows(y_NtE.reshape(n_tiles * tile, -1), routing.slot_T, routing.token_P)
  if routing.strategy == 'ragged':
    zeros_a = jnp.zeros((1,) + a_RDr.shape[1:], a_RDr.dtype)
    zeros_b = jnp.zeros((1,) + b_RrE.shape[1:], b_RrE.dtype)
    xs_TD = x_TD[routing.order_T]
    h = jax.lax.ragged_dot(xs_TD, jnp.concatenate([a_RDr, zeros_a]), routing.sizes_G)
    y = jax.lax.ragged_dot(h, jnp.concatenate([b_RrE, zeros_b]), routing.sizes_G)
    return y[routing.unorder_T]
  raise ValueError(f'Unknown LoRA strategy {routing.strategy!r}.')


def _lora_a_init(lora: LoraConfig):
  def init(key, shape, dtype=jnp.float32):
    d_in, r = shape[-2], shape[-1]
    if lora.init == 'gaussian':
      return jax.random.normal(key, shape, dtype) / r
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on [r, d_in], as PEFT
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _lora_a_init_rows(specs: Sequence[ContextSpec], rank_R: np.ndarray):
  """A's init for per-context specs: each row its own init and rank, the padding zero."""
  gauss_R = np.array([s.init == 'gaussian' for s in specs])

  def init(key, shape, dtype=jnp.float32):
    d_in, r = shape[-2], shape[-1]
    k_u, k_n = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    u = jax.random.uniform(k_u, shape, dtype, -bound, bound)
    n = jax.random.normal(k_n, shape, dtype) / np.maximum(rank_R, 1)[:, None, None]
    a = jnp.where(gauss_R[:, None, None], n, u)
    return a * _rank_mask(rank_R, r)[:, None, :].astype(dtype)
  return init


def _rank_mask(rank_R: np.ndarray, r: int) -> np.ndarray:
  """Static [R, r]: 1 on each row's real rank, 0 on its padding."""
  return (np.arange(r)[None, :] < rank_R[:, None]).astype(np.float32)


def _mask_rows(table_RD, on_R: np.ndarray, fill: float):
  """Rows whose context lacks the method are held at `fill` (and get zero gradient)."""
  if on_R.all():
    return table_RD
  return jnp.where(on_R[:, None], table_RD, jnp.asarray(fill, table_RD.dtype))


def column_norms(kernel_DE, a_RDr=None, b_RrE=None):
  """||W + A_c B_c|| over the input axis, per row: [R, E] (or [E] without A, B), float32.

  Expands ||w_j||^2 + 2 <W^T A_c, B_c>_j + B_c^T (A_c^T A_c) B_c so that no [R, D, E] copy of
  the merged weight is ever formed; B carries the LoRA scale.
  """
  w = kernel_DE.astype(jnp.float32)
  sq_E = jnp.sum(w * w, axis=0)
  if a_RDr is None:
    return jnp.sqrt(sq_E)
  a, b = a_RDr.astype(jnp.float32), b_RrE.astype(jnp.float32)
  wa_RrE = jnp.einsum('de,cdr->cre', w, a)
  gram_Rrr = jnp.einsum('cdr,cds->crs', a, a)
  sq_RE = (sq_E + 2 * jnp.sum(wa_RrE * b, axis=1)
           + jnp.einsum('cre,crs,cse->ce', b, gram_Rrr, b))
  return jnp.sqrt(jnp.maximum(sq_RE, 0.0))


def _dora_factor(kernel_DE, a_RDr, b_RrE, m_RE, dora_R: np.ndarray):
  """g_c = m_c / ||W + s_c A_c B_c||_col per row, 1 for rows without DoRA: [R, E] float32.

  The norm is a constant in the gradient, as in PyTorch PEFT (DoRA paper, section 4.3).
  """
  norm_RE = jax.lax.stop_gradient(column_norms(kernel_DE, a_RDr, b_RrE))
  return jnp.where(dora_R[:, None], m_RE.astype(jnp.float32) / norm_RE, 1.0)


class ContextDense(nn.Module):
  """A dense layer with a frozen kernel/bias and per-context adaptor tables.

  Call with activations x [..., d_in] and either context ids of shape x.shape[:-1] or a
  `Routing` from `route` (the decoder routes once and shares it with every layer).
  """
  features: int
  use_bias: bool = False
  peft: PeftConfig | None = None
  adapt: LayerAdaptor = LayerAdaptor()
  dtype: Any = None  # compute dtype; None: that of x
  param_dtype: Any = jnp.float32  # frozen base weights
  adaptor_dtype: Any = jnp.float32  # trainable tables
  kernel_init: Any = nn.initializers.lecun_normal()
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, context):
    d_in = x.shape[-1]
    dtype = self.dtype or x.dtype
    kernel = self.param('kernel', self.kernel_init, (d_in, self.features), self.param_dtype)
    bias = (self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x = x.astype(dtype)
    if self.peft is None or not self.adapt.any:
      y = matmul(x, kernel.astype(dtype))
      return y if bias is None else y + bias.astype(dtype)

    peft, adapt, R = self.peft, self.adapt, self.peft.num_rows
    uniform = peft.uniform
    routing = context if isinstance(context, Routing) else route(context, peft)
    lead = x.shape[:-1]
    x_TD = x.reshape(-1, d_in)

    def table(name, init, shape):
      return self.variable(ADAPTORS, name, lambda: init(self.make_rng('params'), shape,
                                                        self.adaptor_dtype)).value

    xb_TD = x_TD
    if adapt.ia3 == 'in':
      s_RD = _mask_rows(table('ia3', nn.initializers.ones, (R, d_in)),
                        adapt.rows_with('ia3', peft), 1.0)
      xb_TD = x_TD * _select(s_RD, routing, dtype, 1.0)
    y_TE = matmul(xb_TD, kernel.astype(dtype))
    delta_TE = None
    if adapt.dora:  # g * (x W + s x A B), the bias left out as in PEFT
      delta_TE, g_TE, xl_TD = self._low_rank(x_TD, kernel, routing, table, uniform)
      if xl_TD is x_TD:
        y_TE = y_TE * g_TE
      else:  # PEFT recomputes the base on the dropped-out input: x W + (g - 1) x_d W
        y_TE = y_TE + (g_TE - 1) * (matmul(xl_TD, kernel.astype(dtype)))
      delta_TE = delta_TE * g_TE
    if bias is not None:
      y_TE = y_TE + bias.astype(dtype)
    if adapt.ia3 == 'out':
      s_RE = _mask_rows(table('ia3', nn.initializers.ones, (R, self.features)),
                        adapt.rows_with('ia3', peft), 1.0)
      y_TE = y_TE * _select(s_RE, routing, dtype, 1.0)
    if adapt.bitfit:
      b_RE = _mask_rows(table('bitfit', nn.initializers.zeros, (R, self.features)),
                        adapt.rows_with('bitfit', peft), 0.0)
      y_TE = y_TE + _select(b_RE, routing, dtype, 0.0)
    if adapt.lora and not adapt.dora:
      delta_TE = self._low_rank(x_TD, kernel, routing, table, uniform)[0]
    if delta_TE is not None:
      y_TE = y_TE + delta_TE
    return y_TE.reshape(*lead, self.features)

  def _low_rank(self, x_TD, kernel, routing, table, uniform):
    """The LoRA/DoRA branch: (scaled x_d A B, DoRA's per-token g or None, x_d)."""
    peft, adapt, R = self.peft, self.adapt, self.peft.num_rows
    dtype = x_TD.dtype
    specs = peft.row_specs
    rank_R = adapt.ranks(peft)
    r = int(rank_R.max())
    if uniform:
      lo = specs[0].lora
      a = table('lora_a', _lora_a_init(lo), (R, x_TD.shape[-1], r))
      b = table('lora_b', nn.initializers.zeros, (R, r, self.features))
      a, b = a.astype(dtype), b.astype(dtype)
      xl_TD = (nn.Dropout(lo.dropout, deterministic=self.deterministic)(x_TD)
               if lo.dropout else x_TD)
      delta_TE = lora_delta(xl_TD, a, b, routing) * jnp.asarray(lo.scale, dtype)
      b_scaled = b * jnp.asarray(lo.scale, dtype) if adapt.dora else None
    else:
      # Padded to the largest rank; the static mask zeroes each row's padding (and the rows
      # of contexts without LoRA here), and B's mask carries each row's own scale.
      mask_Rr = _rank_mask(rank_R, r)
      scale_R = np.array([s.lora.scale for s in specs], np.float32)
      a = table('lora_a', _lora_a_init_rows(specs, rank_R), (R, x_TD.shape[-1], r))
      b = table('lora_b', nn.initializers.zeros, (R, r, self.features))
      a = a.astype(dtype) * jnp.asarray(mask_Rr[:, None, :], dtype)
      b_scaled = b.astype(dtype) * jnp.asarray((mask_Rr * scale_R[:, None])[:, :, None], dtype)
      xl_TD = self._dropout(x_TD, routing, rank_R)
      delta_TE = lora_delta(xl_TD, a, b_scaled, routing)
    if not adapt.dora:
      return delta_TE, None, xl_TD
    dora_R = adapt.rows_with('dora', peft)
    m_RE = self.variable(ADAPTORS, 'dora_m', lambda: jnp.where(
        dora_R[:, None], column_norms(kernel)[None, :], 0.0).astype(self.adaptor_dtype)).value
    g_RE = _dora_factor(kernel, a, b_scaled, m_RE, dora_R)
    return delta_TE, _select(g_RE, routing, dtype, 1.0), xl_TD

  def _dropout(self, x_TD, routing, rank_R):
    """LoRA dropout with each context's own rate; one rate: the plain dropout layer."""
    rates = [s.dropout for s, k in zip(self.peft.row_specs, rank_R) if k]
    if self.deterministic or not rates or max(rates) == 0:
      return x_TD
    if len(set(rates)) == 1:
      return nn.Dropout(rates[0], deterministic=False)(x_TD)
    rate_G = np.array([s.dropout if k else 0.0 for s, k in zip(self.peft.row_specs, rank_R)]
                      + [0.0], np.float32)
    keep_T1 = 1.0 - jnp.asarray(rate_G)[routing.row_T][:, None]
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_T1, x_TD.shape)
    return jnp.where(keep, x_TD / keep_T1.astype(x_TD.dtype), 0).astype(x_TD.dtype)


def init_dora_magnitudes(params, tables):
  """Sets every 'dora_m' row with a nonzero magnitude to ||W||_col of its sibling kernel.

  DoRA's magnitude starts at the column norms of the *pre-trained* W (B = 0 at init). Tables
  initialised beside a random base (e.g. before a checkpoint is loaded) take their magnitudes
  from the loaded base with this; rows of contexts without DoRA (all zeros) stay zero.
  """
  if isinstance(tables, Mapping):
    out = {k: init_dora_magnitudes(params[k] if k in params else None, v) if isinstance(
        v, Mapping) else v for k, v in tables.items()}
    if 'dora_m' in tables:
      if params is None or 'kernel' not in params:
        raise ValueError("A 'dora_m' table has no sibling 'kernel' in the base parameters.")
      m = tables['dora_m']
      norm = jnp.sqrt(jnp.sum(jnp.square(params['kernel'].astype(jnp.float32)), axis=-2))
      on = jnp.any(m != 0, axis=-1, keepdims=True)
      out['dora_m'] = jnp.where(on, jnp.expand_dims(norm, -2), 0).astype(m.dtype)
    return out
  return tables
