"""The loss of a batch, shared by the train step and evaluation: masked next-token cross-entropy.

The model hands over its final hidden states and LM head (`models.lm_head.LMHead`), and
`head_token_losses` computes the logits a chunk of positions at a time, forward and backward,
so no [B, L, V] float32 array exists (at the paper's LLM shape those and their gradient were
the step's largest buffers). Under a frozen head (as PEFT runs have it) the gradient of the hidden
states is made beside the logits in the forward pass, so the head is read twice a chunk, not
three times. An apply function that returns logits still works (`token_losses`).
`eval_step` and `task_eval_step` are the pure evaluation steps (loss sums and token counts over
a batch, overall or per task) that evaluation consumes as its predict functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from cpeft_jax import lowp
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.models.lm_head import LMHead

# Perplexity of a mean loss above this is reported as exp(MAX_LOG_PERPLEXITY), not an overflow.
MAX_LOG_PERPLEXITY = 50.0

# apply_fn(variables, batch, *, train, rng) -> (hidden [B, L, D], LMHead), or logits [B, L, V]
# (float32; then the loss reads them whole).
ApplyFn = Callable[..., tuple[jax.Array, LMHead] | jax.Array]

# Float32 logits per chunk of the chunked loss: 2**22 is 16 MiB a chunk (its logits, and in the
# backward pass their gradient); at the paper's LLM shape (B=8, V=50272) 10 positions of each
# row. Larger chunks mean fewer, bigger matmuls; smaller ones less memory.
CHUNK_LOGITS = 1 << 22


@jax.custom_vjp
def token_losses(logits_BLV, targets_BL):
  """Cross-entropy per position, as optax.softmax_cross_entropy_with_integer_labels (a test),
  with a backward pass that keeps only the logits and their log-sum-exp: the gradient
  softmax - onehot is the one [B, L, V] array it makes (autodiff of the optax loss also keeps
  the log-softmax, another float32 copy of the logits; bench/: 196 MiB at the paper shape)."""
  return _token_losses_fwd(logits_BLV, targets_BL)[0]


def _token_losses_fwd(logits_BLV, targets_BL):
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  picked_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return lse_BL - picked_BL, (logits_BLV, lse_BL, targets_BL)


def _token_losses_bwd(res, g_BL):
  logits_BLV, lse_BL, targets_BL = res
  onehot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=logits_BLV.dtype)
  dlogits_BLV = (jnp.exp(logits_BLV - lse_BL[..., None]) - onehot_BLV) * g_BL[..., None]
  return dlogits_BLV, None


token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def chunking(B: int, L: int, V: int, chunk_logits: int = CHUNK_LOGITS) -> tuple[int, int]:
  """(chunks, positions per chunk) of `head_token_losses`: every row's positions in even chunks
  of at most about chunk_logits / (B V) (at least 1), the last padded."""
  if chunk_logits < 1:
    raise ValueError(f'chunk_logits must be a positive number of logits, got {chunk_logits!r}.')
  want = max(1, min(L, chunk_logits // (B * V)))
  K = -(-L // want)
  return K, -(-L // K)


def head_token_losses(hidden_BLD, head: LMHead, targets_BL, *, mask_BL=None,
                      chunk_logits: int | None = None):
  """`token_losses(head.logits(hidden_BLD), targets_BL)` without the [B, L, V] logits: the
  positions go through the head in chunks of [B, n] (`chunking`; chunk_logits default
  CHUNK_LOGITS); the batch axis stays whole in every chunk, so a batch split over devices
  stays split.

  With `mask_BL` (the loss mask), a chunk with no scored position in any row skips the head
  both ways and gives losses of 0: a caption's image and prompt positions, which every row
  has at the same places, cost nothing (at the paper's shape 6 of 13 chunks, the head's 64
  image positions). With a trainable head, the backward pass also skips any chunk whose
  cotangent is all zero; with a frozen one it has no head product left to skip.
  """
  B, L, D = hidden_BLD.shape
  K, n = chunking(B, L, head.vocab_size, CHUNK_LOGITS if chunk_logits is None else chunk_logits)
  pad = K * n - L
  chunks = lambda a: jnp.pad(a, ((0, 0), (0, pad))).reshape(B, K, n).swapaxes(0, 1)
  x_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
  x_KBnD = x_BLD.reshape(B, K, n, D).swapaxes(0, 1)
  live_K = (None if mask_BL is None or K == 1  # (one chunk: no loop to skip in)
            else jnp.any(chunks(jax.lax.stop_gradient(mask_BL)) != 0, axis=(1, 2)))
  loss_KBn = _chunked_losses(x_KBnD, head, chunks(targets_BL), live_K)
  return loss_KBn.swapaxes(0, 1).reshape(B, K * n)[:, :L]


def _map(f, xs):
  """lax.map, or a plain call for one chunk (a loop would round-trip bf16 values on XLA:CPU)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda a: a[None], f(jax.tree.map(lambda a: a[0], xs)))
  return jax.lax.map(f, xs)


def _chunk_forward(head, x_BnD, t_Bn, live, with_dx: bool = False):
  """(log-sum-exp, the target's logit) of a chunk's positions; zeros where not `live`.

  `with_dx` adds d(loss)/d(hidden) of each position for a unit cotangent, float32 [B, n, D]:
  (softmax - onehot) W^T, read off the logits while they exist (see `_chunked_losses_fwd`).
  """
  def run(x_BnD, t_Bn):
    logits_BnV = head.logits(x_BnD)
    picked_Bn = jnp.take_along_axis(logits_BnV, t_Bn[..., None], axis=-1)[..., 0]
    lse_Bn = jax.nn.logsumexp(logits_BnV, axis=-1)
    if not with_dx:
      return lse_Bn, picked_Bn
    return lse_Bn, picked_Bn, _hidden_grad(head, _dlogits(logits_BnV, lse_Bn, t_Bn, head))
  if live is None:
    return run(x_BnD, t_Bn)
  zeros = (jnp.zeros(t_Bn.shape, jnp.float32),) * 2
  skip = lambda x_BnD, t_Bn: zeros + ((jnp.zeros(x_BnD.shape, jnp.float32),) if with_dx else ())
  return jax.lax.cond(live, run, skip, x_BnD, t_Bn)


def _dlogits(logits_BnV, lse_Bn, t_Bn, head, g_Bn=None):
  """softmax - onehot (times the cotangent `g_Bn`, if given), in the head's compute dtype, as
  lowp.matmul_f32's backward pass has it."""
  onehot_BnV = jax.nn.one_hot(t_Bn, head.vocab_size, dtype=jnp.float32)
  d_BnV = jnp.exp(logits_BnV - lse_Bn[..., None]) - onehot_BnV
  return (d_BnV if g_Bn is None else d_BnV * g_Bn[..., None]).astype(head.weight.dtype)


def _hidden_grad(head, dlogits_BnV, g_VT=None):
  """dlogits W^T, float32 [B, n, D]. It reads the head as it is stored: W^T of a [D, V]
  kernel would be a transposed copy of the whole head (XLA:CPU lays a dot's operands out
  row-major), so an untied head's product is (W g^T)^T with the chunk's g transposed (`g_VT`,
  if the caller has it already)."""
  *lead, V = dlogits_BnV.shape
  g_TV, w, f32 = dlogits_BnV.reshape(-1, V), head.weight, dict(preferred_element_type=jnp.float32)
  if head.vocab_major:
    dx_TD = jnp.matmul(g_TV, w, **f32)
  else:
    # (The barrier keeps XLA:CPU from folding .T into the dot's output layout, which its
    # bf16 x bf16 -> f32 dot cannot write.)
    g_VT = lowp.transposed(g_TV) if g_VT is None else g_VT
    dx_TD = jax.lax.optimization_barrier(jnp.matmul(w, g_VT, **f32)).T
  return dx_TD.reshape(*lead, dx_TD.shape[-1])


@jax.custom_vjp
def _chunked_losses(x_KBnD, head, t_KBn, live_K):
  lse_KBn, picked_KBn = _map(lambda a: _chunk_forward(head, *a), (x_KBnD, t_KBn, live_K))
  return lse_KBn - picked_KBn


def _chunked_losses_fwd(x_KBnD, head, t_KBn, live_K):
  x, h, t = x_KBnD.value, jax.tree.map(lambda p: p.value, head), t_KBn.value
  live = None if live_K is None else live_K.value
  # Which gradients to make is static (the residuals' structure): a frozen head gets none, and
  # no [D, V] accumulator is carried through the loop.
  wants = (x_KBnD.perturbed, head.weight.perturbed)
  if wants == (True, False):
    # A frozen head (as PEFT runs have it): d(hidden) is linear in each position's cotangent,
    # so it is made here from the logits at hand, per unit cotangent, and the backward pass
    # only scales it: two head matmuls a chunk instead of three (the backward pass would
    # compute the logits again), for a float32 [B, L, D] residual in place of the hidden
    # states.
    lse_KBn, picked_KBn, unit_KBnD = _map(lambda a: _chunk_forward(h, *a, with_dx=True),
                                          (x, t, live))
    return lse_KBn - picked_KBn, (unit_KBnD, jnp.zeros((0,), x.dtype))
  lse_KBn, picked_KBn = _map(lambda a: _chunk_forward(h, *a), (x, t, live))
  return lse_KBn - picked_KBn, (x, h, t, live, lse_KBn, *(() if w else None for w in wants))


def _chunked_losses_bwd(res, g_KBn):
  zero = isinstance(g_KBn, jax.custom_derivatives.SymbolicZero)
  if len(res) == 2:  # a frozen head: d(hidden) per unit cotangent, from the forward pass
    unit_KBnD, like = res
    g_KBn1 = 0.0 if zero else g_KBn[..., None]
    return (g_KBn1 * unit_KBnD).astype(like.dtype), None, None, None
  x_KBnD, head, t_KBn, live_K, lse_KBn, want_dx, want_dw = res
  if zero:
    g_KBn = jnp.zeros(lse_KBn.shape, lse_KBn.dtype)
  V, cd = head.vocab_size, head.weight.dtype
  f32 = dict(preferred_element_type=jnp.float32)

  def chunk(dw_acc, xs):
    x_BnD, t_Bn, lse_Bn, g_Bn, live = xs
    if live is None:
      return live_chunk(dw_acc, x_BnD, t_Bn, lse_Bn, g_Bn)
    # A chunk the forward pass skipped, or one whose losses nobody uses, adds nothing.
    zero_dx = None if want_dx is None else jnp.zeros(x_BnD.shape, x_BnD.dtype)
    return jax.lax.cond(live & jnp.any(g_Bn != 0), live_chunk, lambda acc, *_: (acc, zero_dx),
                        dw_acc, x_BnD, t_Bn, lse_Bn, g_Bn)

  def live_chunk(dw_acc, x_BnD, t_Bn, lse_Bn, g_Bn):
    dlogits_BnV = _dlogits(head.logits(x_BnD), lse_Bn, t_Bn, head, g_Bn)
    # (The logits are computed again here: storing them or their gradient would make the
    # [B, L, V] array the chunking avoids.)
    x_TD, g_TV = x_BnD.reshape(-1, x_BnD.shape[-1]).astype(cd), dlogits_BnV.reshape(-1, V)
    g_VT = lowp.transposed(g_TV) if not head.vocab_major or dw_acc is not None else None
    dx_BnD = None
    if want_dx is not None:
      dx_BnD = _hidden_grad(head, dlogits_BnV, g_VT).astype(x_BnD.dtype)
    if dw_acc is not None:
      dw_acc = dw_acc + (jnp.matmul(g_VT, x_TD, **f32) if head.vocab_major
                         else jnp.matmul(lowp.transposed(x_TD), g_TV, **f32))
    return dw_acc, dx_BnD

  dw0 = jnp.zeros(head.weight.shape, jnp.float32) if want_dw is not None else None
  xs = (x_KBnD, t_KBn, lse_KBn, g_KBn, live_K)
  if x_KBnD.shape[0] == 1:
    dw, dx = chunk(dw0, jax.tree.map(lambda a: a[0], xs))
    dx = None if dx is None else dx[None]
  else:
    dw, dx = jax.lax.scan(chunk, dw0, xs)
  dhead = None if dw is None else LMHead(dw.astype(head.weight.dtype), head.vocab_major)
  return dx, dhead, None, None


_chunked_losses.defvjp(_chunked_losses_fwd, _chunked_losses_bwd, symbolic_zeros=True)


def masked_losses(apply_fn, variables, batch, *, train, rng):
  """(token losses [B, L] with the loss mask applied, the loss mask [B, L] as float32)."""
  out = apply_fn(variables, batch, train=train, rng=rng)
  mask_BL = batch['loss_mask'].astype(jnp.float32)
  if isinstance(out, tuple):
    loss_BL = head_token_losses(*out, batch['targets'], mask_BL=mask_BL)
  else:
    loss_BL = token_losses(out, batch['targets'])
  return loss_BL * mask_BL, mask_BL


def loss_sums(apply_fn: ApplyFn, variables, batch: Mapping[str, jax.Array], *, train: bool,
              rng=None):
  """(sum of masked token losses, number of masked tokens)."""
  loss_BL, mask_BL = masked_losses(apply_fn, variables, batch, train=train, rng=rng)
  return jnp.sum(loss_BL), jnp.sum(mask_BL)


def context_sums(loss_BL, mask_BL, context_ids_BL, num_contexts: int):
  """(loss sum [C], token count [C]) of the masked positions of each context id."""
  ids = context_ids_BL.reshape(-1)
  seg = lambda x: jax.ops.segment_sum(x.reshape(-1), ids, num_segments=num_contexts)
  return seg(loss_BL), seg(mask_BL)


def task_sums(loss_BL, mask_BL, tasks_B, num_tasks: int):
  """(loss sum [K], token count [K]) of the masked positions of each row's task (tasks_B [B])."""
  return context_sums(loss_BL, mask_BL, jnp.broadcast_to(tasks_B[:, None], loss_BL.shape),
                      num_tasks)


def eval_step(trainable, frozen, batch, *, apply_fn: ApplyFn):
  """Masked loss sum and token count (perplexity = exp(sum / count) over a split)."""
  s, n = loss_sums(apply_fn, trainable_lib.merge(trainable, frozen), batch, train=False)
  return {'loss_sum': s, 'tokens': n}


def task_eval_step(trainable, frozen, batch, *, apply_fn: ApplyFn, num_tasks: int):
  """Masked loss sum and token count of each task [T] (rows grouped by batch['tasks'])."""
  loss_BL, mask_BL = masked_losses(apply_fn, trainable_lib.merge(trainable, frozen), batch,
                                   train=False, rng=None)
  loss_T, tokens_T = task_sums(loss_BL, mask_BL, batch['tasks'], num_tasks)
  return {'loss_sum': loss_T, 'tokens': tokens_T}


def perplexity(mean_loss: float) -> float:
  """exp(mean loss per token), clamped so that a diverged loss does not overflow."""
  return math.exp(min(mean_loss, MAX_LOG_PERPLEXITY))
