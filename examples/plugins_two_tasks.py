"""Two plug-ins trained separately on one frozen base, assembled, and evaluated on a mixed batch.

    python examples/plugins_two_tasks.py --workdir=/tmp/plugins [--steps=200]

Text only, offline, under a minute of CPU time on 2 cores. The tasks come from the demo's
procedural scenes: 'caption' (a true caption of a scene) and 'qa' (a question about a shape's
colour or count, and its answer). Each task trains its own one-context LoRA plug-in on the
same frozen base decoder (a small random one saved as a Hugging Face checkpoint, as a real base
would be), saved with the base's fingerprint. The plug-ins are then loaded (checked against
the base), assembled as contexts 0 and 1 of one model, and evaluated on a batch that mixes both
tasks, each example routed to its task's context (`contexts.task_contexts`). The table printed
shows each task's loss under the base alone, under each plug-in alone, and under the assembly.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from cpeft_jax import checkpoints, contexts, plugins
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.data import tokenizer as tokenizers
from cpeft_jax.data.demo import captions, scenes
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import init_adaptors
from cpeft_jax.models.llama import Decoder

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', '/tmp/cpeft_plugins', 'Where the base and the plug-ins go.')
flags.DEFINE_integer('steps', 200, 'Training steps per plug-in.')
flags.DEFINE_integer('seed', 0, 'Seed of the data, the base and the adaptors.')

TASKS = ('caption', 'qa')
SEQ_LEN, BATCH = 32, 32


def example(task: str, rng: np.random.Generator) -> str:
  scene = scenes.sample_scene(rng)
  if task == 'caption':
    return captions.caption(scene, rng)
  g = scene.groups[rng.integers(len(scene.groups))]
  if rng.random() < 0.5:
    return f'question : what color is the {g.shape} ? answer : {g.color}'
  return f'question : how many {g.shape}s are there ? answer : {captions.NUMBER_WORDS[g.count]}'


def batches(task: str, tok, num: int, seed: int):
  """[num, BATCH, SEQ_LEN] token ids (BOS text EOS PAD...) of one task."""
  rng = np.random.default_rng(seed)
  ids = tokenizers.special_ids(tok)
  out = np.full((num * BATCH, SEQ_LEN), ids.pad, np.int32)
  for i, ids_L in enumerate(tokenizers.encode(tok, [example(task, rng) for _ in range(len(out))])):
    row = [ids.bos] + ids_L[:SEQ_LEN - 2] + [ids.eos]
    out[i, :len(row)] = row
  return out.reshape(num, BATCH, SEQ_LEN)


def loss_fn(cfg, peft, params, tables, tokens_BL, ctx_BL, pad: int, weight_B=None):
  """Mean next-token cross-entropy over the non-padding targets (of the examples weighted 1)."""
  variables = {'params': params} | ({'adaptors': tables} if tables is not None else {})
  logits = Decoder(cfg, peft).apply(variables, tokens_BL, context_ids_BL=ctx_BL,
                                    attention_mask_BL=tokens_BL != pad)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_BL[:, 1:])
  mask = (tokens_BL[:, 1:] != pad).astype(jnp.float32)
  if weight_B is not None:
    mask = mask * weight_B[:, None]
  return (ce * mask).sum() / mask.sum()


@functools.lru_cache(maxsize=None)
def trainer(cfg, peft, pad: int):
  """(optimizer, jitted step) of a plug-in run; runs of the same shapes share one compilation."""
  tx = optax.adam(1e-2)
  zeros = jnp.zeros((BATCH, SEQ_LEN), jnp.int32)

  @jax.jit
  def step(params, tables, opt, tokens):
    loss, grads = jax.value_and_grad(
        lambda t: loss_fn(cfg, peft, params, t, tokens, zeros, pad))(tables)
    updates, opt = tx.update(grads, opt, tables)
    return optax.apply_updates(tables, updates), opt, loss
  return tx, step


def train_plugin(task, cfg, params, tok, steps, seed) -> plugins.Plugin:
  """One run: a one-context LoRA on `task`; only the tables train (the base is an argument)."""
  peft = PeftConfig(methods=('lora',), targets='AF', lora=LoraConfig(rank=8, alpha=16.0))
  tables = init_adaptors(cfg, peft, seed)
  tx, step = trainer(cfg, peft, tokenizers.special_ids(tok).pad)
  data = batches(task, tok, steps, seed=seed + 1)
  opt = tx.init(tables)
  for i in range(steps):
    tables, opt, loss = step(params, tables, opt, jnp.asarray(data[i]))
    if (i + 1) % 100 == 0:
      print(f'  {task}: step {i + 1} loss {float(loss):.3f}')
  return plugins.extract(tables, peft, 0, {'decoder': plugins.fingerprint(params, cfg)},
                         name=task, meta={'task': task})


def main(argv):
  del argv
  work = FLAGS.workdir
  rng = np.random.default_rng(FLAGS.seed)
  tok = tokenizers.word_level([example(t, rng) for t in TASKS for _ in range(2000)])
  cfg = DecoderConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128)
  init = jax.jit(Decoder(cfg).init)  # one compilation, not one per operation
  params = init(jax.random.key(FLAGS.seed), jnp.zeros((1, 1), jnp.int32))['params']
  # A random base stands in for a pre-trained one. Its output head is scaled up: after the final
  # RMSNorm, logits are bounded by the head's norm, and at init scale (std 0.02) they could
  # never be confident, whatever the adaptors learn.
  params['lm_head']['kernel'] = params['lm_head']['kernel'] * 20
  base_dir = checkpoints.save_decoder(os.path.join(work, 'base'), cfg, params, tok)

  for task in TASKS:  # separate runs: each sees only the base checkpoint and its own task
    base = checkpoints.load_decoder(base_dir)
    print(f'training the {task!r} plug-in')
    plugin = train_plugin(task, base.config, base.params, tok, FLAGS.steps, FLAGS.seed)
    plugins.save(os.path.join(work, task), plugin)

  base = checkpoints.load_decoder(base_dir)
  fp = {'decoder': plugins.fingerprint(base.params, base.config)}
  loaded = [plugins.load(os.path.join(work, task), fp) for task in TASKS]
  peft, tables = plugins.assemble(loaded)  # context i = task i
  pad = tokenizers.special_ids(tok).pad
  evals = {task: jnp.asarray(batches(task, tok, 1, seed=FLAGS.seed + 100 + i)[0])
           for i, task in enumerate(TASKS)}
  zeros = jnp.zeros((BATCH, SEQ_LEN), jnp.int32)
  loss = jax.jit(functools.partial(loss_fn, base.config), static_argnums=(0, 5))
  ones = jnp.ones(BATCH)
  rows = {'base alone': [float(loss(None, base.params, None, evals[t], zeros, pad, ones))
                         for t in TASKS]}
  for p in loaded:
    rows[f'{p.name} plug-in alone'] = [
        float(loss(p.peft, base.params, p.tables, evals[t], zeros, pad, ones)) for t in TASKS]
  # One mixed batch: half caption examples (context 0), half QA examples (context 1). Every
  # loss is over the whole batch's shape, the halves picked by weights (one compilation each).
  half = BATCH // 2
  mixed = jnp.concatenate([evals['caption'][:half], evals['qa'][:half]])
  ctx = jnp.asarray(contexts.task_contexts(['caption'] * half + ['qa'] * half, SEQ_LEN,
                                           {'caption': 0, 'qa': 1}))
  halves = [jnp.asarray(np.arange(BATCH) < half, jnp.float32),
            jnp.asarray(np.arange(BATCH) >= half, jnp.float32)]
  per_task = [float(loss(peft, base.params, tables, mixed, ctx, pad, w)) for w in halves]
  full = [float(loss(p.peft, base.params, p.tables, mixed, zeros, pad, w))
          for p, w in zip(loaded, halves)]
  print(f'\nvalidation loss per task      {TASKS[0]:>9} {TASKS[1]:>9}')
  for name, values in rows.items():
    print(f'{name:<29} {values[0]:9.3f} {values[1]:9.3f}')
  print(f'{"assembled, mixed batch":<29} {per_task[0]:9.3f} {per_task[1]:9.3f}')
  print(f'(each plug-in alone on the same halves: {full[0]:.3f}, {full[1]:.3f})')


if __name__ == '__main__':
  app.run(main)
