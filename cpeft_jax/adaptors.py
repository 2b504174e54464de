"""Context-indexed adaptors: a dense layer with a frozen base and per-context tables.

Every token carries an integer context id. Each adapted projection owns one group of adaptor
parameters per context, stored as tables with a leading context ("row") axis:

  LoRA    lora_a [R, d_in, r], lora_b [R, r, d_out]   (B is zero at init)
  IA3     ia3    [R, d_out] (keys/values) or [R, d_in] (feed-forward input), ones at init
  BitFit  bitfit [R, d_out], zeros at init

R is the number of *adapted* contexts: a context left out of `PeftConfig.adapted_contexts` has
no row and its tokens see the frozen base only. A layer computes, per token t of context c,

  y_t = ((x_t * ia3_in[c]) @ W + b) * ia3_out[c] + bitfit[c] + scale * dropout(x_t) @ A_c @ B_c

Nothing here ever materialises a per-token copy of a LoRA matrix: tokens are routed once per
forward pass (`route`), then each layer runs one grouped computation (see `LORA_STRATEGIES`).
The base weights live in the 'params' collection, the tables in the 'adaptors' collection, so
the trainable tree and the frozen tree are separate arguments of `Module.apply`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ADAPTORS = 'adaptors'  # the variable collection holding every trainable table
METHODS = ('lora', 'ia3', 'bitfit')
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
class PeftConfig:
  """Which methods adapt which projections, and for how many contexts.

  `targets` is a preset ('A', 'F', 'AF', 'all') or comma-separated glob patterns over the
  projection names of a block (e.g. 'q_proj,v_proj' or 'attn/*'). IA3 reads presets as the
  paper does (A: keys and values, F: the feed-forward intermediate); `method_targets` overrides
  the targets of single methods, e.g. {'bitfit': 'all'}.
  """
  methods: tuple[str, ...] = ()
  targets: str = 'AF'
  method_targets: tuple[tuple[str, str], ...] = ()
  num_contexts: int = 1
  adapted_contexts: tuple[int, ...] | None = None  # None: every context has a row
  lora: LoraConfig = LoraConfig()
  strategy: str = 'auto'
  tile: int = 64  # tokens per tile of the grouped strategy

  def __post_init__(self):
    object.__setattr__(self, 'methods', tuple(self.methods))
    if isinstance(self.method_targets, Mapping):
      object.__setattr__(self, 'method_targets', tuple(sorted(self.method_targets.items())))
    if self.adapted_contexts is not None:
      object.__setattr__(self, 'adapted_contexts', tuple(int(c) for c in self.adapted_contexts))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, 'lora', config_from_dict(LoraConfig, self.lora, 'peft.lora'))
    self.validate()

  def validate(self):
    for m in self.methods:
      if m not in METHODS:
        raise ValueError(f'Unknown PEFT method {m!r} in peft.methods; expected some of {METHODS}.')
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f'peft.methods={self.methods} lists a method twice.')
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
    lo = self.lora
    if not isinstance(lo.rank, int) or lo.rank < 1:
      raise ValueError(f'peft.lora.rank must be an integer >= 1, got {lo.rank!r}.')
    if not lo.alpha > 0:
      raise ValueError(f'peft.lora.alpha must be > 0, got {lo.alpha!r}.')
    if lo.init not in LORA_INITS:
      raise ValueError(f'peft.lora.init={lo.init!r}; expected one of {LORA_INITS}.')
    if not 0.0 <= lo.dropout < 1.0:
      raise ValueError(f'peft.lora.dropout must be in [0, 1), got {lo.dropout!r}.')
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

  @property
  def any(self) -> bool:
    return self.lora or self.bitfit or self.ia3 is not None


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
    h_Tr = x_TD @ a_RDr[0]
    h_Tr = jnp.where((row_T == 0)[:, None], h_Tr, 0)
    return h_Tr @ b_RrE[0]
  if routing.strategy == 'onehot':
    onehot_TR = jax.nn.one_hot(row_T, R, dtype=x_TD.dtype)
    h_TRr = jnp.einsum('td,cdr->tcr', x_TD, a_RDr) * onehot_TR[:, :, None]
    return jnp.einsum('tcr,cre->te', h_TRr, b_RrE)
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
      y = x @ kernel.astype(dtype)
      return y if bias is None else y + bias.astype(dtype)

    peft, adapt, R = self.peft, self.adapt, self.peft.num_rows
    routing = context if isinstance(context, Routing) else route(context, peft)
    lead = x.shape[:-1]
    x_TD = x.reshape(-1, d_in)

    def table(name, init, shape):
      return self.variable(ADAPTORS, name, lambda: init(self.make_rng('params'), shape,
                                                        self.adaptor_dtype)).value

    xb_TD = x_TD
    if adapt.ia3 == 'in':
      s_RD = table('ia3', nn.initializers.ones, (R, d_in))
      xb_TD = x_TD * _select(s_RD, routing, dtype, 1.0)
    y_TE = xb_TD @ kernel.astype(dtype)
    if bias is not None:
      y_TE = y_TE + bias.astype(dtype)
    if adapt.ia3 == 'out':
      s_RE = table('ia3', nn.initializers.ones, (R, self.features))
      y_TE = y_TE * _select(s_RE, routing, dtype, 1.0)
    if adapt.bitfit:
      b_RE = table('bitfit', nn.initializers.zeros, (R, self.features))
      y_TE = y_TE + _select(b_RE, routing, dtype, 0.0)
    if adapt.lora:
      lo = peft.lora
      a = table('lora_a', _lora_a_init(lo), (R, d_in, lo.rank))
      b = table('lora_b', nn.initializers.zeros, (R, lo.rank, self.features))
      xl_TD = nn.Dropout(lo.dropout, deterministic=self.deterministic)(x_TD) if lo.dropout else x_TD
      delta = lora_delta(xl_TD, a.astype(dtype), b.astype(dtype), routing)
      y_TE = y_TE + delta * jnp.asarray(lo.scale, dtype)
    return y_TE.reshape(*lead, self.features)
