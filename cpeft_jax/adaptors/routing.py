"""Context ids -> adaptor groups, and the LoRA math over them (one-hot, grouped, ragged).

`route` sorts a forward pass's tokens into table rows once; every layer then computes its LoRA
delta for all contexts in one grouped computation (`lora_delta`, by `PeftConfig.strategy`), and
reads per-context vectors (IA3, BitFit, DoRA's factor) per token with `select`. No per-token copy
of a LoRA matrix is ever formed.

Under a context mesh (`jax.set_mesh`) whose batch axes (`BATCH_AXES`) hold more than one device,
routing and the LoRA math run shard by shard (`jax.shard_map` over those axes, manual there,
the 'tensor' axis left to the partitioner): each batch shard sorts and multiplies only its own
tokens, so the adaptors add no collective on tokens; the tables enter every shard whole over
the batch axes (gathered as the base's fsdp kernels are) and their gradients are summed over
the shards, the same parameter-gradient reduction the base has. Without a mesh, or with one
device on the batch axes, nothing changes.

`strategy='auto'` picks by backend and shape (`pick_strategy`): one row: plain LoRA. XLA:CPU
(measured, bench/): onehot for R <= 2 rows, grouped beyond. GPU/TPU (not measured here):
onehot while R x r <= `ONEHOT_MAX_WIDTH` (128, one MXU / tensor-core tile: the wider matmul
then costs about what rank r alone costs), ragged beyond (`jax.lax.ragged_dot`, which lowers to
a grouped-matmul kernel on TPU; on GPU tokamax's Pallas kernel replaces it where tokamax is
installed: it is optional, never required).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cpeft_jax.adaptors.config import PeftConfig
from cpeft_jax.lowp import matmul
from cpeft_jax.sharding import BATCH_AXES  # the mesh axes the batch is split over

try:  # Pallas grouped-matmul kernels for GPU and TPU, with jax.lax.ragged_dot's signature.
  import tokamax as _tokamax
except ImportError:
  _tokamax = None

ONEHOT_MAX_WIDTH = 128  # 'auto' on GPU/TPU: onehot while rows x rank fit one matmul tile


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
  Routed shard by shard (`axes` names the mesh's batch axes), every array is the concatenation
  of the shards' own routings along its leading axis (used_tiles: one count per shard), and
  the indices in each are local to its shard.
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
  mesh: jax.sharding.AbstractMesh | None = flax.struct.field(pytree_node=False, default=None)
  axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

  def _shard(self) -> Routing:
    """One shard's routing as its own map sees it (inside shard_map)."""
    used = None if self.used_tiles is None else self.used_tiles[0]
    return self.replace(used_tiles=used, mesh=None, axes=())


def pick_strategy(strategy: str, num_rows: int, rank: int, backend: str) -> str:
  """The LoRA strategy that `strategy` ('auto' or a name) means for R rows of rank r.

  One row: plain LoRA ('dense'). 'auto' on XLA:CPU: onehot for R <= 2, grouped beyond (the
  measured CPU rule: onehot grows with R, ragged_dot is no grouped kernel there). On GPU/TPU:
  onehot while R x r <= ONEHOT_MAX_WIDTH (the R x r wide matmul fills about one MXU or
  tensor-core tile, which rank r alone already occupies), ragged beyond (a grouped matmul).
  """
  if num_rows == 1:
    return 'dense'
  if strategy != 'auto':
    return strategy
  if backend == 'cpu':
    return 'onehot' if num_rows <= 2 else 'grouped'
  return 'onehot' if num_rows * rank <= ONEHOT_MAX_WIDTH else 'ragged'


def _max_rank(peft: PeftConfig) -> int:
  ranks = [s.rank for s in peft.row_specs if s.low_rank]
  return max(ranks) if ranks else peft.lora.rank


def batch_split(batch: int) -> tuple[jax.sharding.AbstractMesh | None, tuple[str, ...]]:
  """The context mesh and its batch axes (of more than one device, not already manual) when
  `batch` rows split evenly over them; (None, ()) otherwise: no mesh, one batch shard, or a
  batch the shards cannot split (e.g. one generated row)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, ()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1
               and a not in mesh.manual_axes)
  if not axes or batch % math.prod(mesh.shape[a] for a in axes):
    return None, ()
  return mesh, axes


def shard_batch(x):
  """`x` with its leading (batch) axis split over the context mesh's batch axes and its other
  axes whole (replicated over 'tensor', as the Megatron layout keeps the residual stream);
  unchanged without batch shards. Pins activations where the partitioner might otherwise
  split tokens over 'tensor' or gather the batch."""
  _, axes = batch_split(x.shape[0]) if x.ndim else (None, ())
  return jax.lax.with_sharding_constraint(x, PartitionSpec(axes)) if axes else x


@jax.named_scope('route')  # the op_name scope bench/breakdown.py files routing under
def route(context_ids, peft: PeftConfig) -> Routing:
  """Sorts the tokens of `context_ids` (any shape, batch first) into adaptor groups for every
  layer; under a mesh with batch shards (`batch_split`), each shard's tokens on their own."""
  ids = jnp.asarray(context_ids, jnp.int32)
  strategy = pick_strategy(peft.strategy, peft.num_rows, _max_rank(peft), jax.default_backend())
  mesh, axes = batch_split(ids.shape[0]) if ids.ndim else (None, ())
  if not axes:
    return _route_tokens(ids.reshape(-1), peft, strategy)

  def local(ids_b):
    r = _route_tokens(ids_b.reshape(-1), peft, strategy)
    return r if r.used_tiles is None else r.replace(used_tiles=r.used_tiles[None])
  spec = PartitionSpec(axes)
  routing = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec,
                          axis_names=set(axes))(ids)
  return routing.replace(mesh=mesh, axes=axes)


def _route_tokens(ids_T, peft: PeftConfig, strategy: str) -> Routing:
  """The routing of one sequence of tokens (the whole batch, or one shard's)."""
  R = peft.num_rows
  row_of_context = np.full((peft.num_contexts,), R, np.int32)
  row_of_context[list(peft.rows)] = np.arange(R, dtype=np.int32)
  # Out-of-range ids (only possible under jit, where they cannot be checked) get no adaptor.
  row_T = jnp.take(jnp.asarray(row_of_context), ids_T, mode='fill', fill_value=R)
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
    token_P = jnp.full((P + 1,), T, jnp.int32).at[slot_T].set(
        jnp.arange(T, dtype=jnp.int32))[:P]
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


def select(table_RD, routing: Routing, dtype, fill: float):
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
# On XLA:CPU this loop costs about 3.5x C=1's plain LoRA for the same FLOPs (one layer's seven
# projections, forward and backward, 1024 tokens in 8 groups of 128, r=64, 2-core EPYC: 118 ms
# against 32). A 64-row tile's matmuls run at 60-100 GFLOP/s against 150-180 for 1024 rows,
# and each tile's operands are copied out of the arrays (dynamic slices). Tried, same shape:
# 128-row tiles 105 ms; adjacent tiles of one group merged into one 128-row matmul (lax.cond)
# 110; bf16 matmuls accumulating in float32 104; a batched matmul over all tiles with each
# tile's A and B gathered 171-193; ragged_dot 595; onehot 153. None is worth its padding or
# code: the tiles' matmuls alone, at 100 GFLOP/s, already take twice C=1's whole LoRA.


def lora_delta(x_TD, a_RDr, b_RrE, routing: Routing):
  """sum over rows of onehot[t, c] * x_t @ A_c @ B_c, by the routing's strategy.

  Routed shard by shard, each batch shard computes its own tokens' deltas from whole tables
  (shard_map over the routing's batch axes); the tables' gradients are summed over the shards.
  """
  if not routing.axes:
    return _lora_delta(x_TD, a_RDr, b_RrE, routing)
  spec, whole = PartitionSpec(routing.axes), PartitionSpec()
  # The tables enter in float32 and are cast inside: their gradients are then summed over the
  # shards in float32 (exact where bf16 sums would round; and XLA:CPU aborts compiling a bf16
  # all-reduce here, in its AllReducePromotion pass).
  dtype = a_RDr.dtype
  # check_vma=False: the loops' carries need no per-axis types, and the transpose sums the
  # tables' gradients over the batch shards (one psum each, where the base has its own).
  local = lambda x, a, b, r: _lora_delta(x, a.astype(dtype), b.astype(dtype), r._shard())
  return jax.shard_map(local, mesh=routing.mesh, in_specs=(spec, whole, whole, spec),
                       out_specs=spec, axis_names=set(routing.axes), check_vma=False)(
                           x_TD, a_RDr.astype(jnp.float32), b_RrE.astype(jnp.float32), routing)


def _ragged_dot(x_MK, w_GKN, sizes_G):
  if _tokamax is not None and jax.default_backend() in ('gpu', 'tpu'):
    return _tokamax.ragged_dot(x_MK, w_GKN, sizes_G)
  return jax.lax.ragged_dot(x_MK, w_GKN, sizes_G)


def _lora_delta(x_TD, a_RDr, b_RrE, routing: Routing):
  """lora_delta on the tokens of one shard (or of the whole batch)."""
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
    h = _ragged_dot(xs_TD, jnp.concatenate([a_RDr, zeros_a]), routing.sizes_G)
    y = _ragged_dot(h, jnp.concatenate([b_RrE, zeros_b]), routing.sizes_G)
    return y[routing.unorder_T]
  raise ValueError(f'Unknown LoRA strategy {routing.strategy!r}.')
