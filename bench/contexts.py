"""Forward+backward time of the adapted decoder by number of contexts and LoRA strategy.

    python -m bench.contexts               # the paper's LLM shape (768 wide, 12 layers, L=128)
    python -m bench.contexts --shape=small # a quick run

Times the decoder's layers (hidden states out, no LM head) with gradients for the adaptor
tables only, as PEFT training does. Every figure is the median over two rounds of --repeats timed
runs, each block after a warm-up call; ratios are taken within the same run. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from bench.harness import context_ids
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder

SHAPES = {
    'paper': DecoderConfig(vocab_size=50272, hidden_size=768, num_layers=12, num_heads=12,
                           intermediate_size=3072, fused_gate_up=True, dtype='bfloat16'),
    'small': DecoderConfig(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
                           intermediate_size=1024, fused_gate_up=True, dtype='bfloat16'),
}
FLAGS = flags.FLAGS
flags.DEFINE_enum('shape', 'paper', list(SHAPES), 'Decoder shape.')
flags.DEFINE_integer('batch', 4, 'Batch size.')
flags.DEFINE_integer('seq', 128, 'Sequence length.')
flags.DEFINE_integer('rank', 64, 'LoRA rank.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per block; two rounds of blocks.')
flags.DEFINE_list('strategies', ['auto', 'onehot', 'grouped'], 'LoRA strategies to time.')
flags.DEFINE_integer('tile', 64, 'Tokens per tile of the grouped strategy.')
flags.DEFINE_integer('layers', 0, 'Override the number of layers (0: the shape\'s own).')


def build_step(cfg, peft, batch, seq):
  """A compiled fwd+bwd step and its arguments."""
  model = Decoder(cfg, peft)
  x = jax.random.normal(jax.random.key(0), (batch, seq, cfg.hidden_size), jnp.bfloat16)
  ctx = jnp.asarray(context_ids(batch, seq, peft.num_contexts))
  variables = jax.jit(model.init)(jax.random.key(1), embeddings_BLD=x, context_ids_BL=ctx)
  base, tables = variables['params'], variables['adaptors']

  @jax.jit
  def step(tables, x, ctx):
    def loss(t):
      h = model.apply({'params': base, 'adaptors': t}, embeddings_BLD=x, context_ids_BL=ctx,
                      return_hidden=True)
      return jnp.mean(h.astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss)(tables)

  args = (tables, x, ctx)
  jax.block_until_ready(step(*args))  # compile and warm up
  return step, args


def time_interleaved(steps, repeats, rounds=2):
  """Median seconds of each step in steady state.

  Each round runs every step in a block: one untimed call (the first call after switching
  programs pays for re-faulting the allocator's memory, which a training loop never does), then
  `repeats` timed calls. Rounds alternate the blocks so that machine noise hits all alike.
  """
  times = {k: [] for k in steps}
  for _ in range(rounds):
    for k, (fn, args) in steps.items():
      jax.block_until_ready(fn(*args))
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv):
  del argv
  cfg, B, L = SHAPES[FLAGS.shape], FLAGS.batch, FLAGS.seq
  if FLAGS.layers:
    cfg = dataclasses.replace(cfg, num_layers=FLAGS.layers)
  lora = LoraConfig(rank=FLAGS.rank, alpha=float(FLAGS.rank))
  print(f'# Context-LoRA r={FLAGS.rank} AF, decoder fwd+bwd (adaptor grads), shape={FLAGS.shape} '
        f'(width {cfg.hidden_size}, {cfg.num_layers} layers), batch {B} x seq {L}, '
        f'{cfg.dtype} compute')
  print(f'# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, '
        f'jax {jax.__version__}; median of 2 rounds x {FLAGS.repeats} runs, each block after a '
        'warm-up call\n')
  runs = {(1, 'dense'): PeftConfig(methods=('lora',), lora=lora)}
  for C in (2, 8):
    for s in FLAGS.strategies:
      runs[(C, s)] = PeftConfig(methods=('lora',), lora=lora, num_contexts=C, strategy=s,
                                tile=FLAGS.tile)
  t = time_interleaved({k: build_step(cfg, p, B, L) for k, p in runs.items()}, FLAGS.repeats)
  t1 = t[(1, 'dense')]
  goals = {1: None, 2: 1.10, 8: 1.25}
  print('| contexts | strategy | ms | vs C=1 | goal |\n|---|---|---|---|---|')
  for (C, s), v in t.items():
    goal = goals[C]
    verdict = '' if goal is None else f"<= {goal:.2f}: {'met' if v / t1 <= goal else 'not met'}"
    print(f'| {C} | {s} | {v * 1e3:.0f} | {v / t1:.2f} | {verdict} |')


if __name__ == '__main__':
  app.run(main)
