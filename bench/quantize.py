"""The quantized frozen base against the bf16 base: parameter memory, train-step time, loss.

One command reports all three for the paper's LLM shape (configs/paper_llm150m.py's decoder):

    python -m bench.quantize                      # memory + step time + demo losses (minutes)
    python -m bench.quantize --shape=small --steps=1 --rounds=1 --seq=32 \
        --demo_args=contexts=modality,epochs=1,num_train=40,pretrain_epochs=1 \
        --demo_overrides=optim.warmup_steps=2   # the smallest settings: checks that it runs
    python -m bench.quantize --nodemo --notime_steps   # memory only (shapes, seconds)

memory: bytes of the decoder's 'params' tree from shapes and dtypes (jax.eval_shape, nothing
  materialised): the bf16 base against int8/int4/NF4 bases with per-block (64) and
  per-channel scales (float32), first with the block projections quantized (embeddings and LM
  head in bf16, as PEFT's QLoRA leaves them), then with the LM head and input embeddings
  quantized too; 4-bit values count as packed (half a byte). The issue's goal (int4 at most
  0.35x bf16) is checked on the fully quantized int4 base.
step: one jitted train step (forward, backward for the LoRA tables only, Adam update) of the
  decoder with context-specific LoRA r=64 on attention and feed-forward, bf16 compute, on the
  bf16 base and on each of --formats (per-block 64 scales); the cases' timed blocks alternate
  so that load drifts hit all alike; medians, with the load average. Time it on a quiet machine.
demo: configs/demo.py (--demo_args) trained the same short way on a bf16 base and on a base in
  each of --demo_formats (the very same stage-0 decoder for all); the best validation loss and
  perplexity of each, and the difference to bf16.
Not a test: nothing asserts a time.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpeft_jax import quantize as qz
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.llama import Decoder

SHAPES = {  # configs/paper_llm150m.py's model, and a small one
    'paper': dict(vocab_size=50272, hidden_size=768, num_layers=12, num_heads=12,
                  intermediate_size=3072, fused_gate_up=True),
    'small': dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4,
                  intermediate_size=1024, fused_gate_up=True),
}
FLAGS = flags.FLAGS
flags.DEFINE_enum('shape', 'paper', list(SHAPES), 'Decoder shape.')
flags.DEFINE_integer('batch', 2, 'Batch size of the timed train step.')
flags.DEFINE_integer('seq', 128, 'Sequence length of the timed train step.')
flags.DEFINE_integer('rank', 64, 'LoRA rank.')
flags.DEFINE_integer('steps', 3, 'Timed steps per block.')
flags.DEFINE_integer('rounds', 3, 'Rounds of blocks (each case once per round).')
flags.DEFINE_list('formats', ['int8', 'int4', 'nf4'], 'Quantized bases to time against bf16.')
flags.DEFINE_bool('time_steps', True, 'Time the train step.')
flags.DEFINE_bool('demo', True, 'Also train the demo on a bf16 base and on --demo_formats.')
flags.DEFINE_list('demo_formats', ['int4'], 'Quantized bases of the demo trainings.')
flags.DEFINE_string('demo_targets', 'decoder', 'quantize.targets of the demo trainings.')
flags.DEFINE_list('demo_overrides', [], 'Config overrides of all demo trainings, e.g. '
                  'optim.warmup_steps=2 (passed to train.py as --config.KEY=VALUE).')
flags.DEFINE_string('demo_dir', '/tmp/bench_quantize_demo', 'Workdirs of the demo runs.')
flags.DEFINE_string('demo_args', 'contexts=modality,epochs=2,num_train=300,pretrain_epochs=2',
                    'configs/demo.py arguments of both demo runs.')


def decoder_cfg(param_dtype='bfloat16'):
  return DecoderConfig(**SHAPES[FLAGS.shape], dtype='bfloat16', param_dtype=param_dtype)


def peft():
  return PeftConfig(methods=('lora',), targets='AF', num_contexts=2,
                    lora=LoraConfig(rank=FLAGS.rank, alpha=float(FLAGS.rank)))


def abstract_params(cfg):
  model = Decoder(cfg, peft())
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda k: model.init(k, tokens)['params'], jax.random.key(0))


def memory():
  """{name: (bytes, ratio to bf16)} of the decoder's frozen 'params' tree."""
  base = abstract_params(decoder_cfg('bfloat16'))
  ref = qz.param_bytes(base)
  out = {'bf16': (ref, 1.0)}
  for targets in ('decoder', 'decoder,lm_head,embed'):
    for fmt in ('int8', 'int4', 'nf4'):
      for gran in ('block', 'channel'):
        qcfg = qz.QuantConfig(format=fmt, granularity=gran, block_size=64, targets=targets)
        # Unquantized leaves stay bf16; scales are float32 (qcfg.scale_dtype).
        q = jax.eval_shape(lambda p: qz.quantize_params({'decoder': p}, qcfg)['decoder'], base)
        n = qz.param_bytes(q)
        name = f'{fmt}/{gran}64' if gran == 'block' else f'{fmt}/{gran}'
        out[f'{name} [{targets}]'] = (n, n / ref)
  return out


def train_step_fn(cfg):
  model = Decoder(cfg, peft())
  tx = optax.adam(1e-4)

  def loss_fn(tables, params, tokens_BL, ctx_BL):
    logits = model.apply({'params': params, 'adaptors': tables}, tokens_BL[:, :-1],
                         context_ids_BL=ctx_BL[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BL[:, 1:]).mean()

  @jax.jit
  def step(tables, opt_state, params, tokens_BL, ctx_BL):
    loss, g = jax.value_and_grad(loss_fn)(tables, params, tokens_BL, ctx_BL)
    updates, opt_state = tx.update(g, opt_state, tables)
    return optax.apply_updates(tables, updates), opt_state, loss
  return model, tx, step


def step_times():
  """{case: median seconds per train step}; the frozen base of each case built once."""
  B, L = FLAGS.batch, FLAGS.seq + 1
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, SHAPES[FLAGS.shape]['vocab_size'], (B, L)), jnp.int32)
  ctx = np.zeros((B, L), np.int32)
  ctx[:, 1:1 + min(64, L // 2)] = 1  # the paper's layout: image tokens after BOS
  ctx = jnp.asarray(ctx)
  cases = {}
  cfg32 = decoder_cfg('float32')
  model, tx, step = train_step_fn(cfg32)
  init = jax.jit(lambda k: model.init(k, tokens, context_ids_BL=ctx))
  v = init(jax.random.key(0))
  tables = v['adaptors']
  bases = {'bf16': jax.tree.map(lambda x: x.astype(jnp.bfloat16), v['params'])}
  for fmt in FLAGS.formats:
    qcfg = qz.QuantConfig(format=fmt, block_size=64, targets='decoder')
    q = qz.quantize_params({'decoder': v['params']}, qcfg)['decoder']
    bases[fmt] = jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                              if isinstance(x, jax.Array) and x.dtype == jnp.float32 else x,
                              q, is_leaf=qz.is_quantized)
  del v
  for name, params in bases.items():
    state = {'t': tables, 'o': tx.init(tables)}

    def run(params=params, state=state):
      state['t'], state['o'], loss = step(state['t'], state['o'], params, tokens, ctx)
      return float(loss)
    t0 = time.perf_counter()
    loss = run()
    print(f'  {name}: compiled + first step {time.perf_counter() - t0:.1f} s, loss {loss:.4f}',
          flush=True)
    cases[name] = run
  times = {k: [] for k in cases}
  order = list(cases)
  for r in range(FLAGS.rounds):
    for name in (order if r % 2 == 0 else order[::-1]):
      cases[name]()  # untimed warm-up of the block
      for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        cases[name]()
        times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def demo_losses():
  """{name: (best validation loss, perplexity, seconds)} of the same short demo training on a
  bf16 base and on each quantized base of --demo_formats."""
  out = {}
  base_lm = os.path.join(FLAGS.demo_dir, 'bf16', 'base_lm')
  data = os.path.join(FLAGS.demo_dir, 'tfds')
  for fmt in ['', *FLAGS.demo_formats]:
    name = fmt or 'bf16'
    args = [sys.executable, 'train.py', f'--config=configs/demo.py:{FLAGS.demo_args}',
            f'--workdir={os.path.join(FLAGS.demo_dir, name)}', f'--config.data.data_dir={data}',
            '--config.model.dtype=bfloat16', f'--config.quantize.format={fmt}',
            f'--config.quantize.targets={FLAGS.demo_targets}',
            *(f'--config.{o}' for o in FLAGS.demo_overrides)]
    if fmt:  # the very same stage-0 decoder as the bf16 run
      args.append(f'--config.text_model={base_lm}')
    t0 = time.time()
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode:
      raise RuntimeError(f'{" ".join(args)} failed:\n{res.stderr[-3000:]}')
    line = [s for s in res.stdout.splitlines() if s.startswith('best validation loss')][-1]
    loss, ppl = re.search(r'best validation loss ([\d.]+), perplexity ([\d.]+)', line).groups()
    out[name] = (float(loss), float(ppl), time.time() - t0)
  return out


def main(argv):
  del argv
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, '
        f'jax {jax.__version__} on {jax.default_backend()}; load average at start '
        f'{os.getloadavg()}')
  print(f'\nparameter memory of the decoder, shape {FLAGS.shape} ({SHAPES[FLAGS.shape]}):')
  mem = memory()
  for name, (n, ratio) in mem.items():
    print(f'  {name:42s} {n / 2**20:9.1f} MiB  {ratio:.3f}x bf16')
  ratio = mem['int4/block64 [decoder,lm_head,embed]'][1]
  print(f'  goal int4 <= 0.35x bf16: {"met" if ratio <= 0.35 else "missed"} ({ratio:.3f}x, '
        'everything but norms quantized, block 64)')
  if FLAGS.time_steps:
    print(f'\ntrain step (LoRA r={FLAGS.rank} AF, 2 contexts, bf16 compute), batch '
          f'{FLAGS.batch} x seq {FLAGS.seq}:')
    med = step_times()
    for name, t in med.items():
      print(f'  {name:6s} median {t * 1e3:9.1f} ms/step  ({t / med["bf16"]:.3f}x bf16)')
    print(f'  load average at the end {os.getloadavg()}')
  if FLAGS.demo:
    print(f'\ndemo ({FLAGS.demo_args}), bf16 compute, quantize.targets={FLAGS.demo_targets}:')
    losses = demo_losses()
    for name, (loss, ppl, secs) in losses.items():
      print(f'  {name:5s} base: best validation loss {loss:.4f} ({loss - losses["bf16"][0]:+.4f} '
            f'vs bf16), perplexity {ppl:.3f} ({secs:.0f} s)')


if __name__ == '__main__':
  app.run(main)
