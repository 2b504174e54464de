"""The pure train and eval steps: (state, frozen, batch, rng) -> (state, metrics).

The loss is next-token cross-entropy over the positions `loss_mask` marks (caption tokens and
EOS), averaged over those tokens. A batch is split into `micro_steps` micro-batches whose
gradients are summed in a scan, so the update equals the one of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from cpeft_jax.train import state as state_lib

# apply_fn(variables, batch, *, train, rng) -> logits [B, L, V] (float32).
ApplyFn = Callable[..., jax.Array]


def token_losses(logits_BLV, targets_BL):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)


def loss_sums(apply_fn: ApplyFn, variables, batch: Mapping[str, jax.Array], *, train: bool,
              rng=None):
  """(sum of masked token losses, number of masked tokens)."""
  logits = apply_fn(variables, batch, train=train, rng=rng)
  mask = batch['loss_mask'].astype(jnp.float32)
  return jnp.sum(token_losses(logits, batch['targets']) * mask), jnp.sum(mask)


def train_step(state: state_lib.TrainState, frozen, batch, rng, *, apply_fn: ApplyFn,
               micro_steps: int = 1):
  """One optimizer update over `batch`; gradients only for the trainable tree."""
  B = batch['targets'].shape[0]
  if B % micro_steps:
    raise ValueError(f'batch size {B} is not divisible by micro_steps={micro_steps}.')
  micro = jax.tree.map(lambda x: x.reshape(micro_steps, B // micro_steps, *x.shape[1:]), batch)
  rngs = jax.random.split(rng, micro_steps)

  def grad_of(trainable, mb, r):
    f = lambda t: loss_sums(apply_fn, state_lib.merge(t, frozen), mb, train=True, rng=r)
    (s, n), g = jax.value_and_grad(f, has_aux=True)(trainable)
    return s, n, g

  def body(carry, xs):
    s_acc, n_acc, g_acc = carry
    s, n, g = grad_of(state.trainable, *xs)
    return (s_acc + s, n_acc + n, jax.tree.map(jnp.add, g_acc, g)), None

  zeros = jax.tree.map(jnp.zeros_like, state.trainable)
  (s, n, g), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros), (micro, rngs))
  n = jnp.maximum(n, 1.0)
  grads = jax.tree.map(lambda x: x / n, g)
  new_state = state.apply_gradients(grads)
  metrics = {'loss': s / n, 'tokens': n, 'grad_norm': optax.tree.norm(grads)}
  return new_state, metrics


def eval_step(trainable, frozen, batch, *, apply_fn: ApplyFn):
  """Masked loss sum and token count (perplexity = exp(sum / count) over a split)."""
  s, n = loss_sums(apply_fn, state_lib.merge(trainable, frozen), batch, train=False)
  return {'loss_sum': s, 'tokens': n}
