"""Peak memory, step time and tokens/s of context-LoRA training against full fine-tuning.

    python bench/memory.py                       # demo decoder, then the paper's ~150M LLM
    python bench/memory.py --models=demo --batch=32 --seq=96 --steps=10
    python bench/memory.py --models=llm150m --compile_only   # XLA's plan only, no allocation
    python bench/memory.py --models=llm150m --remat          # layers recomputed in backward

Each (model, mode) runs in a fresh subprocess: the decoder of configs/demo.py or
configs/paper_llm150m.py as a text LM whose first `--prefix` positions are context 1 (the
image tokens' place in a captioning row) and the rest context 0, loss on the rest. 'peft'
trains the config's context adaptors (LoRA r16 AF for the demo, r8 AF for the LLM) with the
base frozen; 'full' trains every decoder weight (no adaptors). Both use training's own
train_step (jit, donated state) and Adam. Reported per run:
  planned: XLA's buffer plan of the compiled step (arguments + outputs - donated + temporaries)
  peak:    measured peak, GPU memory_stats()['peak_bytes_in_use'], else the process's peak RSS
           minus its RSS after importing JAX (CPU)
  step_s, tokens_per_s: mean over --steps steps after two warm-up steps (B x L positions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {'demo': dict(batch=32, seq=96, prefix=65, vocab=128),
          'llm150m': dict(batch=8, seq=128, prefix=64, vocab=None)}


def _rss_mb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def run_one(model: str, mode: str, batch: int, seq: int, prefix: int, steps: int,
            compile_only: bool, remat: bool = False) -> dict:
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  import numpy as np
  jax.devices()
  rss0 = _rss_mb()
  from cpeft_jax import experiment
  from cpeft_jax import trainable as trainable_lib
  from cpeft_jax.models.decoder_config import DecoderConfig
  from cpeft_jax.models.llama import Decoder
  from cpeft_jax.train import state as state_lib
  from cpeft_jax.train import step as step_lib
  if model == 'demo':
    from configs import demo as cfg_mod
    c = cfg_mod.get_config()
    c.model.vocab_size = MODELS['demo']['vocab']  # the demo's word-level vocabulary is ~100
  else:
    from configs import paper_llm150m as cfg_mod
    c = cfg_mod.get_config()
  if remat:  # recompute each layer's activations in the backward pass
    c.model.remat = True
  dec = DecoderConfig.from_dict(c.model)
  peft = experiment.peft_config(c) if mode == 'peft' else None
  net = Decoder(dec, peft, deterministic=False)

  # Variables as the VLM nests them ('params/decoder/...'), so training's path rules apply.
  nest = lambda v: {col: {'decoder': tree} for col, tree in v.items()}
  unnest = lambda v: {col: tree['decoder'] for col, tree in v.items()}

  def apply(variables, b, *, train=False, rng=None):
    return net.apply(unnest(variables), b['tokens'], context_ids_BL=b['context_ids'],
                     attention_mask_BL=b['attention_mask'], rngs={'dropout': rng},
                     method='features')

  pos = np.arange(seq)
  host = {'tokens': np.random.default_rng(0).integers(3, dec.vocab_size, (batch, seq)),
          'context_ids': np.broadcast_to((pos < prefix).astype(np.int32), (batch, seq)),
          'attention_mask': np.ones((batch, seq), np.int32),
          'loss_mask': np.broadcast_to((pos >= prefix).astype(np.float32), (batch, seq))}
  host['targets'] = np.roll(host['tokens'], -1, axis=1)
  tokens = jnp.zeros((1, seq), jnp.int32)
  init = lambda k: nest(net.init(k, tokens, context_ids_BL=jnp.zeros((1, seq), jnp.int32)))
  tx = state_lib.optimizer(state_lib.OptimConfig(learning_rate=1e-4))
  nctx = peft.num_contexts if peft else 0

  def make(variables):
    # 'full' here is every decoder weight, the input embeddings too (training's default keeps
    # them frozen, as the paper does): the recorded numbers measure every weight.
    trainable, frozen = trainable_lib.split(variables, 'peft' if mode == 'peft' else 'full',
                                            train_embeddings=True)
    return state_lib.TrainState.create(trainable, tx), frozen

  step = jax.jit(functools.partial(step_lib.train_step, apply_fn=apply, num_contexts=nctx),
                 donate_argnums=(0,))
  if compile_only:
    state, frozen = jax.eval_shape(lambda k: make(init(k)), jax.random.key(0))
    batch_d = {k: jax.ShapeDtypeStruct(v.shape, jnp.asarray(v[:1, :1]).dtype)
               for k, v in host.items()}
  else:
    state, frozen = jax.jit(lambda k: make(init(k)))(jax.random.key(0))
    batch_d = {k: jnp.asarray(v) for k, v in host.items()}
  rng = jax.random.key(1)
  compiled = step.lower(state, frozen, batch_d, rng).compile()
  ma = compiled.memory_analysis()
  planned = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes +
             ma.temp_size_in_bytes) / 2**20
  count = lambda t: int(sum(np.prod(x.shape) for x in jax.tree.leaves(t)))
  out = {'model': model, 'mode': mode, 'remat': remat, 'device': jax.devices()[0].device_kind,
         'batch': batch, 'seq': seq, 'trainable': count(state.trainable),
         'frozen': count(frozen), 'planned_mb': round(planned, 1),
         'temp_mb': round(ma.temp_size_in_bytes / 2**20, 1)}
  if compile_only:
    return out
  times = []
  for i in range(steps + 2):
    t = time.perf_counter()
    state, m = compiled(state, frozen, batch_d, jax.random.fold_in(rng, i))
    float(m['loss'])
    times.append(time.perf_counter() - t)
  step_s = float(np.mean(times[2:]))
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    peak, how = stats['peak_bytes_in_use'] / 2**20, 'device peak_bytes_in_use'
  else:
    peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0, 'peak RSS'
  out.update(peak_mb=round(peak, 1), peak_is=how, step_s=round(step_s, 4),
             tokens_per_s=round(batch * seq / step_s, 1), loss=round(float(m['loss']), 4))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='demo,llm150m')
  p.add_argument('--modes', default='peft,full')
  p.add_argument('--batch', type=int, default=0, help='0: the model\'s default (MODELS)')
  p.add_argument('--seq', type=int, default=0)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--compile_only', action='store_true')
  p.add_argument('--remat', action='store_true', help='rematerialise each decoder layer')
  p.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--out', default='', help='also write the results as JSON lines here')
  a = p.parse_args()
  if a.one:
    d = MODELS[a.models]
    seq = a.seq or d['seq']
    res = run_one(a.models, a.modes, a.batch or d['batch'], seq,
                  min(d['prefix'], seq // 2), a.steps, a.compile_only, a.remat)
    print('RESULT ' + json.dumps(res), flush=True)
    return
  rows = []
  for model in a.models.split(','):
    for mode in a.modes.split(','):
      cmd = [sys.executable, os.path.abspath(__file__), '--one', f'--models={model}',
             f'--modes={mode}', f'--batch={a.batch}', f'--seq={a.seq}', f'--steps={a.steps}']
      cmd += ['--compile_only'] if a.compile_only else []
      cmd += ['--remat'] if a.remat else []
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
      lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
      if proc.returncode or not lines:
        print(f'{model}/{mode} failed:\n{proc.stderr[-2000:]}', flush=True)
        continue
      rows.append(json.loads(lines[0][7:]))
      print(json.dumps(rows[-1]), flush=True)
  if a.out:
    with open(a.out, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  by = {(r['model'], r['mode']): r for r in rows}
  for model in a.models.split(','):
    peft, full = by.get((model, 'peft')), by.get((model, 'full'))
    if peft and full:
      key = 'peak_mb' if 'peak_mb' in peft else 'planned_mb'
      print(f'{model}: full fine-tuning / context-LoRA memory = '
            f'{full[key] / peft[key]:.2f}x ({key}: {full[key]} vs {peft[key]} MiB; planned '
            f'{full["planned_mb"]} vs {peft["planned_mb"]} MiB)')


if __name__ == '__main__':
  main()
