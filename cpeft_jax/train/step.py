"""The pure train and eval steps: (state, frozen, batch, rng) -> (state, metrics).

The loss is next-token cross-entropy over the positions `loss_mask` marks (caption tokens and
EOS), averaged over those tokens. A batch is split into `micro_steps` micro-batches whose
gradients are summed in a scan, so the update equals the one of the whole batch.

With `num_contexts`, the step also returns per-context diagnostics: the loss and token count
of each context id (a loss position belongs to the context of the token it is computed at,
whose adaptors produced it) and the gradient norm of each context row of the adaptor tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from cpeft_jax import adaptors
from cpeft_jax.train import state as state_lib

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


def row_grad_norms(grads) -> jax.Array | None:
  """Norm of each context row [R] over every adaptor table of a tree of gradients (or weights,
  or updates); None without tables.

  Tables inside the scanned layers are [layers, R, ...], others [R, ...].
  """
  tables = grads.get(adaptors.ADAPTORS) if isinstance(grads, Mapping) else None
  if not tables:
    return None
  sq = None
  for path, g in flax.traverse_util.flatten_dict(tables, sep='/').items():
    axis = 1 if '/layers/' in f'/{path}' else 0
    g = jnp.moveaxis(g.astype(jnp.float32), axis, 0)
    s = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
    sq = s if sq is None else sq + s
  return jnp.sqrt(sq)


def train_step(state: state_lib.TrainState, frozen, batch, rng, *, apply_fn: ApplyFn,
               micro_steps: int = 1, num_contexts: int = 0, num_tasks: int = 0):
  """One optimizer update over `batch`; gradients only for the trainable tree.

  With `num_contexts`, the metrics hold each context's loss and tokens (and each table row's
  gradient norm and update-to-weight ratio); with `num_tasks`, each task's loss and tokens
  (batch['tasks'] [B]: each row's task index).
  """
  B = batch['targets'].shape[0]
  if B % micro_steps:
    raise ValueError(f'batch size {B} is not divisible by micro_steps={micro_steps}.')
  micro = jax.tree.map(lambda x: x.reshape(micro_steps, B // micro_steps, *x.shape[1:]), batch)
  rngs = jax.random.split(rng, micro_steps)
  C, K = max(num_contexts, 1), max(num_tasks, 1)

  def sums(trainable, mb, r):
    loss_BL, mask_BL = masked_losses(apply_fn, state_lib.merge(trainable, frozen), mb,
                                      train=True, rng=r)
    s_C, n_C = context_sums(loss_BL, mask_BL, mb['context_ids'], C) if num_contexts else (
        jnp.zeros((C,)), jnp.zeros((C,)))
    s_K, n_K = task_sums(loss_BL, mask_BL, mb['tasks'], K) if num_tasks else (
        jnp.zeros((K,)), jnp.zeros((K,)))
    return jnp.sum(loss_BL), (jnp.sum(mask_BL), s_C, n_C, s_K, n_K)

  def body(carry, xs):
    g_acc, *acc = carry
    (s, aux), g = jax.value_and_grad(sums, has_aux=True)(state.trainable, *xs)
    return (jax.tree.map(jnp.add, g_acc, g), *(a + b for a, b in zip(acc, (s, *aux)))), None

  zeros = jax.tree.map(jnp.zeros_like, state.trainable)
  init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros((C,)), jnp.zeros((C,)),
          jnp.zeros((K,)), jnp.zeros((K,)))
  if micro_steps == 1:  # no loop: XLA:CPU round-trips a loop's bf16 values through float32
    (g, s, n, s_C, n_C, s_K, n_K), _ = body(init, jax.tree.map(lambda x: x[0], (micro, rngs)))
  else:
    (g, s, n, s_C, n_C, s_K, n_K), _ = jax.lax.scan(body, init, (micro, rngs))
  n = jnp.maximum(n, 1.0)
  grads = jax.tree.map(lambda x: x / n, g)
  new_state = state.apply_gradients(grads)
  metrics = {'loss': s / n, 'tokens': n, 'grad_norm': optax.tree.norm(grads)}
  if num_tasks:
    metrics.update(loss_task=s_K / jnp.maximum(n_K, 1.0), tokens_task=n_K)
  if num_contexts:
    metrics.update(loss_ctx=s_C / jnp.maximum(n_C, 1.0), tokens_ctx=n_C)
    rows = row_grad_norms(grads)
    if rows is not None:
      metrics['grad_norm_row'] = rows
      # Update-to-weight ratio of each context row: ||new - old|| / ||old|| over its tables.
      delta = jax.tree.map(jnp.subtract, new_state.trainable, state.trainable)
      metrics['update_ratio_row'] = row_grad_norms(delta) / jnp.maximum(
          row_grad_norms(state.trainable), 1e-12)
  return new_state, metrics


def eval_step(trainable, frozen, batch, *, apply_fn: ApplyFn):
  """Masked loss sum and token count (perplexity = exp(sum / count) over a split)."""
  s, n = loss_sums(apply_fn, state_lib.merge(trainable, frozen), batch, train=False)
  return {'loss_sum': s, 'tokens': n}
