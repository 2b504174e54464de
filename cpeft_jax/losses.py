"""The loss of a batch, shared by the train step and evaluation: masked next-token cross-entropy.

`eval_step` and `task_eval_step` are the pure evaluation steps (loss sums and token counts over
a batch, overall or per task) that evaluation consumes as its predict functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from cpeft_jax import trainable as trainable_lib

# Perplexity of a mean loss above this is reported as exp(MAX_LOG_PERPLEXITY), not an overflow.
MAX_LOG_PERPLEXITY = 50.0

# apply_fn(variables, batch, *, train, rng) -> logits [B, L, V] (float32).
ApplyFn = Callable[..., jax.Array]


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


def masked_losses(apply_fn, variables, batch, *, train, rng):
  """(token losses [B, L] with the loss mask applied, the loss mask [B, L] as float32)."""
  logits_BLV = apply_fn(variables, batch, train=train, rng=rng)
  mask_BL = batch['loss_mask'].astype(jnp.float32)
  return token_losses(logits_BLV, batch['targets']) * mask_BL, mask_BL


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
