"""The pure train step: (state, frozen, batch, rng) -> (state, metrics).

The loss (`cpeft_jax.losses`, shared with evaluation) is next-token cross-entropy over the
positions `loss_mask` marks (caption tokens and EOS), averaged over those tokens. A batch is
split into `micro_steps` micro-batches whose gradients are summed in a scan, so the update
equals the one of the whole batch; under a mesh each micro-batch takes rows of every batch
shard (`split_micro`), so no row moves between devices.

With `num_contexts`, the step also returns per-context diagnostics: the loss and token count
of each context id (a loss position belongs to the context of the token it is computed at,
whose adaptors produced it) and the gradient norm of each context row of the adaptor tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from cpeft_jax import adaptors, losses, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.train import state as state_lib


def row_grad_norms(grads) -> jax.Array | None:
  """Norm of each context row [R] over every adaptor table of a tree of gradients (or weights,
  or updates); None without tables.

  Tables inside the scanned layers are [layers, R, ...], others [R, ...].
  """
  tables = grads.get(adaptors.ADAPTORS) if isinstance(grads, Mapping) else None
  if not tables:
    return None
  sq = None
  for path, g in trees.flatten(tables).items():
    axis = 1 if '/layers/' in f'/{path}' else 0
    g = jnp.moveaxis(g.astype(jnp.float32), axis, 0)
    s = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
    sq = s if sq is None else sq + s
  return jnp.sqrt(sq)


def split_micro(batch, micro_steps: int):
  """[B, ...] leaves -> [micro_steps, B / micro_steps, ...]: micro-batch k takes rows k of
  every batch shard's (of the context mesh's, adaptors.batch_split), so each micro-batch is
  spread over all the shards and no row leaves its device; one shard: consecutive rows."""
  B = batch['targets'].shape[0]
  mesh, axes = adaptors.batch_split(B)
  S = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if B % (S * micro_steps):
    raise ValueError(f'batch size {B} is not divisible by micro_steps={micro_steps} x '
                     f'{S} batch shards.')

  def split(x):
    x = x.reshape(S, micro_steps, B // (S * micro_steps), *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(micro_steps, B // micro_steps, *x.shape[3:])
  return jax.tree.map(split, batch)


def train_step(state: state_lib.TrainState, frozen, batch, rng, *, apply_fn: losses.ApplyFn,
               micro_steps: int = 1, num_contexts: int = 0, num_tasks: int = 0):
  """One optimizer update over `batch`; gradients only for the trainable tree.

  With `num_contexts`, the metrics hold each context's loss and tokens (and each table row's
  gradient norm and update-to-weight ratio); with `num_tasks`, each task's loss and tokens
  (batch['tasks'] [B]: each row's task index).
  """
  micro = split_micro(batch, micro_steps)
  rngs = jax.random.split(rng, micro_steps)
  C, K = max(num_contexts, 1), max(num_tasks, 1)

  def sums(trainable, mb, r):
    mb = jax.tree.map(adaptors.shard_batch, mb)
    loss_BL, mask_BL = losses.masked_losses(apply_fn, trainable_lib.merge(trainable, frozen), mb,
                                      train=True, rng=r)
    s_C, n_C = losses.context_sums(loss_BL, mask_BL, mb['context_ids'], C) if num_contexts else (
        jnp.zeros((C,)), jnp.zeros((C,)))
    s_K, n_K = losses.task_sums(loss_BL, mask_BL, mb['tasks'], K) if num_tasks else (
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
  # The metrics' norms read their arrays through a barrier: XLA:CPU otherwise merges their
  # reductions into Adam's elementwise fusions over the same arrays, which then run as slow
  # reduction loops (Adam over 108 M float32 parameters: 130 -> 270 ms with the gradient norm
  # beside it, 2 cores). Apart, each norm is one more read; the update's difference fuses into
  # its norm's reduction.
  grads_m, new_m, old_m = jax.lax.optimization_barrier(
      (grads, new_state.trainable, state.trainable))
  metrics = {'loss': s / n, 'tokens': n, 'grad_norm': optax.tree.norm(grads_m)}
  if num_tasks:
    metrics.update(loss_task=s_K / jnp.maximum(n_K, 1.0), tokens_task=n_K)
  if num_contexts:
    metrics.update(loss_ctx=s_C / jnp.maximum(n_C, 1.0), tokens_ctx=n_C)
    rows = row_grad_norms(grads_m)
    if rows is not None:
      metrics['grad_norm_row'] = rows
      # Update-to-weight ratio of each context row: ||new - old|| / ||old|| over its tables.
      delta = jax.tree.map(jnp.subtract, new_m, old_m)
      metrics['update_ratio_row'] = row_grad_norms(delta) / jnp.maximum(
          row_grad_norms(old_m), 1e-12)
  return new_state, metrics
