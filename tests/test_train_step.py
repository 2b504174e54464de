"""Trainable/frozen split, the loss against a numpy reference, gradient accumulation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpeft_jax import losses
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib
from cpeft_jax.models import vlm
from helpers import VLM_DEC as DEC, VLM_PEFT as PEFT  # the tiny model
from helpers import PatchEncoder, randomize, vlm_batch


@pytest.fixture(scope='module')
def setup():
  pixels, b = vlm_batch()
  model = vlm.VisionLanguageModel(PatchEncoder(), DEC, PEFT)
  v = model.init(jax.random.key(0), pixels, b['tokens'], b['kinds'], b['context_ids'])
  batch = {k: jnp.asarray(b[k]) for k in ('tokens', 'targets', 'kinds', 'context_ids',
                                          'attention_mask', 'loss_mask')}
  batch['pixels'] = pixels
  return model, v, batch


def _paths(tree):
  return {'/'.join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_split_modes(setup):
  _, v, _ = setup
  embed = 'params/decoder/embed_tokens/embedding'
  for mode, prefixes, train_embeddings in (
      ('peft', ('adaptors/', 'params/connector/'), False),
      ('connector', ('params/connector/',), False),
      ('full', ('adaptors/', 'params/connector/', 'params/decoder/'), True),
      ('full', ('adaptors/', 'params/connector/', 'params/decoder/'), False)):
    trainable, frozen = trainable_lib.split(v, mode, train_embeddings=train_embeddings)
    t, f = _paths(trainable), _paths(frozen)
    assert t and all(p.startswith(prefixes) for p in t)
    assert {p for p in f if p.startswith(prefixes)} == (
        {embed} if mode == 'full' and not train_embeddings else set())
    assert _paths(v) == t | f
    merged = trainable_lib.merge(trainable, frozen)
    jax.tree.map(np.testing.assert_array_equal, merged, jax.tree.map(lambda x: x, dict(v)))
  with pytest.raises(ValueError, match="train mode 'lora'"):
    trainable_lib.split(v, 'lora')


def test_full_fine_tuning_keeps_input_embeddings_frozen(setup):
  """train.mode='full': every decoder leaf trains but the input embedding table, which gets no
  update (it is not even differentiated); with train_embeddings the same step moves it, so it is
  frozen by the split, not for want of a gradient. The count: all variables less the encoder's
  and the table's."""
  model, v, batch = setup
  apply = vlm.apply_fn(model)
  step = jax.jit(step_lib.train_step, static_argnames=('apply_fn',))
  tx = state_lib.optimizer(state_lib.OptimConfig(learning_rate=1e-2))
  table = np.asarray(v['params']['decoder']['embed_tokens']['embedding'])
  assert table.shape == (DEC.vocab_size, DEC.hidden_size)
  encoder = (8 * 8 * 3) * 24 + 24  # helpers.PatchEncoder: one Dense over 8x8x3 patches
  total = sum(x.size for x in jax.tree.leaves(v))
  for train_embeddings in (False, True):
    trainable, frozen = trainable_lib.split(v, 'full', train_embeddings=train_embeddings)
    n = sum(x.size for x in jax.tree.leaves(trainable))
    assert n == total - encoder - (0 if train_embeddings else DEC.vocab_size * DEC.hidden_size)
    st = state_lib.TrainState.create(trainable, tx)
    st, _ = step(st, frozen, batch, jax.random.key(0), apply_fn=apply)
    new = trainable_lib.merge(st.trainable, frozen)['params']['decoder']
    moved = not np.array_equal(np.asarray(new['embed_tokens']['embedding']), table)
    assert moved == train_embeddings
    assert not np.array_equal(np.asarray(new['lm_head']['kernel']),
                              np.asarray(v['params']['decoder']['lm_head']['kernel']))
  # Tied embeddings: the LM head is the same table, so under full fine-tuning it stays frozen.
  tied = vlm.VisionLanguageModel(PatchEncoder(), dataclasses.replace(DEC, tie_embeddings=True),
                                 PEFT)
  host = {k: np.asarray(batch[k]) for k in ('pixels', 'tokens', 'kinds', 'context_ids')}
  shapes = jax.eval_shape(lambda: tied.init(jax.random.key(0), host['pixels'], host['tokens'],
                                            host['kinds'], host['context_ids']))
  trainable, frozen = trainable_lib.split(shapes, 'full')
  assert 'embed_tokens' in frozen['params']['decoder']
  assert not {'embed_tokens', 'lm_head'} & set(trainable['params']['decoder'])


def test_adaptor_dropout_runs_dropped_tokens_through_the_base(setup):
  """train.adaptor_dropout: in training each token loses its adaptor with the given rate; the
  logits equal a model whose dropped tokens sit in a third, unadapted context (the same two
  table rows); evaluation never drops."""
  model, v, batch = setup
  model = model.clone(connector_cfg=model.connector_cfg.__class__(dropout=0.0))  # no other noise
  v = {**v, 'adaptors': randomize(v['adaptors'], 5)}  # adaptors that change every token
  rng = jax.random.key(7)
  train = jax.jit(vlm.apply_fn(model, adaptor_dropout=0.5, logits=True), static_argnames='train')
  keep = np.asarray(jax.random.bernoulli(
      jax.random.fold_in(rng, vlm.ADAPTOR_DROPOUT_STREAM), 0.5, batch['context_ids'].shape))
  assert 0 < keep.mean() < 1
  ref = model.clone(peft=dataclasses.replace(PEFT, num_contexts=3, adapted_contexts=(0, 1)))
  ids = np.where(keep, np.asarray(batch['context_ids']), 2)
  want = ref.apply(v, batch['pixels'], batch['tokens'], batch['kinds'], ids,
                   batch['attention_mask'])
  np.testing.assert_allclose(train(v, batch, train=True, rng=rng), want, rtol=1e-5, atol=1e-5)
  plain = vlm.apply_fn(model, logits=True)(v, batch)
  assert np.abs(np.asarray(plain) - np.asarray(want)).max() > 1e-3  # dropping mattered
  np.testing.assert_allclose(train(v, batch, train=False), plain, rtol=1e-5, atol=1e-6)
  ids_BL = vlm.drop_contexts(jnp.zeros((400, 100), jnp.int32), 0.3, rng, 2)
  assert set(np.unique(ids_BL).tolist()) == {0, 2}
  assert abs(float(jnp.mean(ids_BL == 2)) - 0.3) < 0.01


def test_loss_matches_numpy_reference(setup):
  model, v, batch = setup
  s, n = losses.loss_sums(vlm.apply_fn(model), v, batch, train=False)  # the chunked loss
  logits = np.asarray(vlm.apply_fn(model, logits=True)(v, batch), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  mask = np.asarray(batch['loss_mask'])
  nll = -np.take_along_axis(logp, np.asarray(batch['targets'])[..., None], -1)[..., 0]
  assert float(n) == mask.sum() == 3 + 1 + 2 + 1  # caption tokens + EOS per row
  np.testing.assert_allclose(float(s), (nll * mask).sum(), rtol=1e-5)


def test_micro_batches_give_the_same_update_and_loss_decreases(setup):
  model, v, batch = setup
  apply = vlm.apply_fn(model.clone(connector_cfg=model.connector_cfg.__class__(dropout=0.0)))
  trainable, frozen = trainable_lib.split(v, 'peft')
  tx = state_lib.optimizer(state_lib.OptimConfig(learning_rate=1e-2))
  st = state_lib.TrainState.create(trainable, tx)
  opt_leaves = jax.tree.leaves(st.opt_state)
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * sum(x.size for x in jax.tree.leaves(trainable))
  step = jax.jit(step_lib.train_step,
                 static_argnames=('apply_fn', 'micro_steps', 'num_contexts', 'num_tasks'))
  batch = {**batch, 'tasks': jnp.arange(batch['tokens'].shape[0]) % 2}  # rows of two tasks
  s1, m1 = step(st, frozen, batch, jax.random.key(0), apply_fn=apply, micro_steps=1,
                num_contexts=3, num_tasks=2)
  s2, m2 = step(st, frozen, batch, jax.random.key(0), apply_fn=apply, micro_steps=2,
                num_contexts=3, num_tasks=2)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['loss_task'], m2['loss_task'], rtol=1e-6)
  _check_per_context_diagnostics(apply, v, trainable, frozen, batch, m2)
  # Update-to-weight ratio per context row: ||row of (new - old)|| / ||row of old||.
  rows = lambda tree, r: np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)[:, r])))
                                     for x in jax.tree.leaves(tree['adaptors'])))
  delta = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                       s2.trainable, trainable)
  want = [rows(delta, r) / rows(trainable, r) for r in range(2)]
  np.testing.assert_allclose(m2['update_ratio_row'], want, rtol=1e-4)
  assert min(want) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               s1.trainable, s2.trainable)
  _check_accumulated_gradients(step, apply, trainable, frozen, batch, m1, m2)
  losses = [float(m1['loss'])]
  for i in range(15):
    s1, m = step(s1, frozen, batch, jax.random.key(i), apply_fn=apply, micro_steps=1,
                 num_contexts=3)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.9 * losses[0]
  assert int(s1.step) == 16


def _check_accumulated_gradients(step, apply, trainable, frozen, batch, m1, m2):
  """Adam's first update is about lr * sign(g), blind to the gradient's scale: compare the
  gradients. Under SGD at rate 1 an update is minus the accumulated gradient, so the connector's
  over 1 and over 2 micro-batches must both be the gradient of the whole batch's mean token
  loss (step.loss_sums / tokens), and the gradient norms must agree."""
  sgd = state_lib.TrainState.create(trainable, optax.sgd(1.0))
  grads = {}
  for k in (1, 2):
    new, m = step(sgd, frozen, batch, jax.random.key(0), apply_fn=apply, micro_steps=k,
                  num_contexts=3, num_tasks=2)
    grads[k] = jax.tree.map(jnp.subtract, trainable, new.trainable)
    np.testing.assert_allclose(m['grad_norm'], (m1, m2)[k - 1]['grad_norm'], rtol=1e-6)

  def mean_loss(t):
    s, n = losses.loss_sums(apply, trainable_lib.merge(t, frozen), batch, train=True,
                              rng=jax.random.key(0))
    return s / n
  want = jax.grad(mean_loss)(trainable)
  # float32 sums in another order (relative ~1e-7), and old - (old - g) rounds at |old|'s ulp.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  for k in (1, 2):
    jax.tree.map(close, grads[k]['params']['connector'], want['params']['connector'])
  assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(want['params']['connector']))
  np.testing.assert_allclose(m2['grad_norm'], m1['grad_norm'], rtol=1e-5)
  np.testing.assert_allclose(m2['grad_norm'], optax.tree.norm(want), rtol=1e-5)
  np.testing.assert_allclose(m2['grad_norm_row'], m1['grad_norm_row'], rtol=1e-5)


def test_schedules():
  cfg = state_lib.OptimConfig(learning_rate=1.0, schedule='cosine', warmup_steps=2, total_steps=10)
  sched = state_lib.schedule(cfg)
  assert float(sched(0)) == 0.0 and float(sched(2)) == 1.0 and float(sched(10)) < 1e-6
  with pytest.raises(ValueError, match='needs optim.total_steps'):
    state_lib.OptimConfig(schedule='linear')



def _check_per_context_diagnostics(apply, v, trainable, frozen, batch, m):
  """The step's per-context losses, token counts and row gradient norms vs references."""
  # Reference: every masked position's loss added to its token's context, one at a time.
  hidden_BLD, head = apply(v, batch)
  logits = np.asarray(head.logits(hidden_BLD), np.float64)
  ctx, mask, tgt = (np.asarray(batch[k]) for k in ('context_ids', 'loss_mask', 'targets'))
  sums, counts = np.zeros(3), np.zeros(3)
  for b, t in zip(*np.nonzero(mask)):
    z = logits[b, t]
    sums[ctx[b, t]] += np.log(np.exp(z - z.max()).sum()) + z.max() - z[tgt[b, t]]
    counts[ctx[b, t]] += 1
  assert counts[1] > 0 and counts[0] > 0 and counts[2] == 0  # the last image token is context 1
  # Per task: every masked position's loss added to its row's task.
  task_sums, task_counts = np.zeros(2), np.zeros(2)
  for b, t in zip(*np.nonzero(mask)):
    z = logits[b, t]
    task_sums[batch['tasks'][b]] += np.log(np.exp(z - z.max()).sum()) + z.max() - z[tgt[b, t]]
    task_counts[batch['tasks'][b]] += 1
  assert task_counts.min() > 0
  np.testing.assert_array_equal(m['tokens_task'], task_counts)
  np.testing.assert_allclose(m['loss_task'], task_sums / task_counts, rtol=1e-5)
  np.testing.assert_allclose((m['loss_task'] * m['tokens_task']).sum() / task_counts.sum(),
                             m['loss'], rtol=1e-6)
  np.testing.assert_array_equal(m['tokens_ctx'], counts)
  np.testing.assert_allclose(m['loss_ctx'][:2], sums[:2] / counts[:2], rtol=1e-5)
  # Per-context losses weighted by their token counts recombine to the step's loss.
  np.testing.assert_allclose((m['loss_ctx'] * m['tokens_ctx']).sum() / m['tokens_ctx'].sum(),
                             m['loss'], rtol=1e-6)
  # Per-row gradient norms: row r of every adaptor table ([layers, R, ...]) of the plain gradient.
  # (train=True: the jitted path; this model has no dropout, so it is the eval loss.)
  g = jax.jit(jax.grad(lambda t, b: losses.loss_sums(
      apply, trainable_lib.merge(t, frozen), b, train=True, rng=jax.random.key(0))[0]
      / counts.sum()))(trainable, batch)
  tables = jax.tree.leaves(g['adaptors'])
  want = [np.sqrt(sum(float(np.sum(np.square(x[:, r]))) for x in tables)) for r in range(2)]
  np.testing.assert_allclose(m['grad_norm_row'], want, rtol=1e-4)
  assert min(want) > 0


def test_token_losses_and_gradient_equal_optax():
  """The cross-entropy's own backward pass gives optax's loss and gradient (weighted, as the
  loss mask weights it)."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(4 * rng.standard_normal((2, 5, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  weights = jnp.asarray(rng.random((2, 5)), jnp.float32)
  ours = lambda x: jnp.sum(losses.token_losses(x, targets) * weights)
  ref = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights)
  np.testing.assert_allclose(losses.token_losses(logits, targets),
                             optax.softmax_cross_entropy_with_integer_labels(logits, targets),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), rtol=1e-5, atol=1e-6)
