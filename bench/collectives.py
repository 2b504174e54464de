"""The collectives of the compiled 8-device train step, per LoRA strategy (issue 17's figure).

    python bench/collectives.py                            # this checkout's library
    python bench/collectives.py --root=/path/to/checkout   # another commit's library
    python bench/collectives.py --json=out.json --strategies=grouped,onehot

The step is tests/test_shard_routing.py's: a tiny decoder (hidden 32, MLP 40, vocab 40, 2
layers), Context-LoRA C=4, r=4, targets AF, tile 8, global batch 8 x 12 tokens, on 8 simulated
CPU devices (data=2, fsdp=2, tensor=2), SGD. It is compiled as the trainer of the library at
`--root` compiles it: under jax.set_mesh when that library has sharding.on_mesh (the routing
per batch shard of commit a52a349), else without a context mesh (the global routing before it).
The library is imported from `--root` in a subprocess (8 devices must exist before JAX starts,
and each library needs its own interpreter); the HLO is parsed here with the test's parser.

Per strategy it prints every all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute of the optimized HLO: operand shapes and bytes, result shapes, whether its
groups span batch shards, and two flags from the test's checkers: 'global' (an operand or
result has a dimension of the global batch's tokens: >= 8 x 12 = 96, or the (8, 12) pair) and
'moves' (token-shaped data crossing batch shards). No parameter dimension is 48 or more.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import test_shard_routing as tsr  # noqa: E402  (the parser and the step's shapes)
from cpeft_jax import xla_flags  # noqa: E402

STRATEGIES = ('grouped', 'ragged', 'onehot')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
               'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
SHAPE = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')

# Builds the step with the library on sys.path[0] and writes one optimized HLO per strategy.
# Only APIs present both before and after a52a349 are used (the test's own code, less its
# one-device comparison and the layer check).
SCRIPT = r'''
import sys
sys.path.insert(0, {root!r})
import types
import jax, jax.numpy as jnp, numpy as np, optax
from cpeft_jax import sharding, trees
from cpeft_jax import trainable as trainable_lib
from cpeft_jax.adaptors import LoraConfig, PeftConfig
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.train import step as step_lib, trainer
B, L, C, RANK, HIDDEN = {B}, {L}, {C}, {RANK}, {HIDDEN}
context_mesh = hasattr(sharding, 'on_mesh')  # the trainer traces its step under jax.set_mesh
print('library', sharding.__file__, 'context mesh', context_mesh, file=sys.stderr)
rng = np.random.default_rng(0)
tokens = rng.integers(3, 40, (B, L + 1))
batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=rng.random((B, L)) < 0.8,
             context_ids=rng.integers(0, C, (B, L)).astype(np.int32))
cfg = DecoderConfig(vocab_size=40, hidden_size=HIDDEN, intermediate_size=40, num_layers=2,
                    num_heads=2, num_kv_heads=2)
mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
for strategy in {strategies!r}:
  peft = PeftConfig(methods=('lora',), num_contexts=C, targets='AF', strategy=strategy, tile=8,
                    lora=LoraConfig(rank=RANK, alpha=8.0))
  model = make_decoder(cfg, peft)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  v = jax.tree_util.tree_map_with_path(lambda kp, s: jnp.asarray(
      trees.path_str(kp).endswith('/weight') + 0.2 * rng.standard_normal(s.shape), s.dtype),
      shapes)
  trainable, frozen = trainable_lib.split(v, 'peft')
  tx = optax.sgd(1e3)
  apply = lambda w, b, train, rng, model=model: model.apply(
      w, b['tokens'], context_ids_BL=b['context_ids'])
  step = lambda s, f, b, apply=apply: step_lib.train_step(s, f, b, jax.random.key(0),
                                                          apply_fn=apply)
  placed = trainer.place(types.SimpleNamespace(config={{}}, mesh=mesh), trainable, frozen, tx)
  run = jax.jit(step, in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh),
                out_shardings=(placed.state_sh, placed.replicated))
  args = (placed.state, placed.frozen, jax.device_put(batch, placed.batch_sh))
  if context_mesh:
    with jax.set_mesh(mesh):
      text = run.lower(*args).compile().as_text()
  else:
    text = run.lower(*args).compile().as_text()
  with open(f'{hlo_dir}/{{strategy}}.hlo', 'w') as f:
    f.write(text)
print('context_mesh', context_mesh)
'''


def compile_hlo(root: str, strategies, hlo_dir: str) -> bool:
  """Writes hlo_dir/<strategy>.hlo for each strategy with the library at `root`; returns
  whether that library's step was traced under a context mesh."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root,
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
             + ' '.join(xla_flags.FAST_COMPILE))
  code = SCRIPT.format(root=root, B=tsr.B, L=tsr.L, C=tsr.C, RANK=tsr.RANK, HIDDEN=tsr.HIDDEN,
                       strategies=tuple(strategies), hlo_dir=hlo_dir)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       cwd=root)
  if out.returncode:
    raise RuntimeError(f'compiling the step with the library at {root} failed:\n'
                       + out.stderr[-3000:])
  return out.stdout.strip().splitlines()[-1] == 'context_mesh True'


def _shapes(text: str):
  """[(dtype, dims, bytes)] of every array type in an HLO type string (tuples included)."""
  out = []
  for dtype, dims in SHAPE.findall(text):
    if dtype not in DTYPE_BYTES:
      continue
    dims = [int(d) for d in dims.split(',') if d]
    n = DTYPE_BYTES[dtype]
    for d in dims:
      n *= d
    out.append((dtype, dims, n))
  return out


def _name(dtype, dims) -> str:
  return f'{dtype}[{",".join(map(str, dims))}]'


def collectives(hlo: str):
  """One dict per collective of an optimized HLO module: op, operand and result shapes, operand
  bytes, whether a group spans batch shards, and the test's two token checks."""
  types, out = {}, []
  lines = [m for m in map(tsr.OP.match, hlo.splitlines()) if m]
  for m in lines:
    types[m.group(1)] = m.group(2)
  for m in lines:
    op = m.group(3).removesuffix('-start')
    if op not in tsr.COLLECTIVES:
      continue
    operands = [s for n in re.findall(r'%([\w.\-]+)', m.group(4)) for s in _shapes(types[n])]
    result = _shapes(m.group(2))
    crosses = any(len({p // tsr.TENSOR for p in g}) > 1 for g in tsr._groups(m.group(5)))
    entry = (op, [s[1] for s in operands + result], crosses)
    out.append(dict(op=op, operands=[_name(t, d) for t, d, _ in operands],
                    result=[_name(t, d) for t, d, _ in result],
                    operand_bytes=sum(b for _, _, b in operands), crosses_shards=crosses,
                    global_tokens=bool(tsr.on_global_tokens([entry])),
                    moves_tokens=bool(tsr.between_shards([entry]))))
  return out


def summary(ops) -> dict:
  """Count, kinds, total operand bytes and the token-flagged ones of a strategy's list."""
  return dict(count=len(ops), kinds=dict(sorted(collections.Counter(o['op'] for o in ops).items())),
              operand_bytes=sum(o['operand_bytes'] for o in ops),
              global_tokens=sum(o['global_tokens'] for o in ops),
              moves_tokens=sum(o['moves_tokens'] for o in ops))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--root', default=ROOT, help='checkout whose cpeft_jax compiles the step')
  p.add_argument('--strategies', default=','.join(STRATEGIES))
  p.add_argument('--json', default='', help='also write the results here')
  a = p.parse_args(argv)
  strategies = [s for s in a.strategies.split(',') if s]
  if bad := [s for s in strategies if s not in STRATEGIES]:
    p.error(f'--strategies: {bad} not among {STRATEGIES}')
  root = os.path.abspath(a.root)
  with tempfile.TemporaryDirectory() as d:
    context_mesh = compile_hlo(root, strategies, d)
    res = {s: collectives(open(os.path.join(d, f'{s}.hlo')).read()) for s in strategies}
  print(f'library: {root}  traced under jax.set_mesh: {context_mesh}')
  for s, ops in res.items():
    sm = summary(ops)
    print(f'\n== {s}: {sm["count"]} collectives {sm["kinds"]}, operands '
          f'{sm["operand_bytes"]} B ({sm["operand_bytes"] / 2**20:.4f} MiB), on global tokens: '
          f'{sm["global_tokens"]}, moving tokens between batch shards: {sm["moves_tokens"]}')
    for o in ops:
      flags = ' '.join(f for f in ('crosses_shards', 'global_tokens', 'moves_tokens') if o[f])
      print(f'  {o["op"]:<18} {o["operand_bytes"]:>7} B  operands {" ".join(o["operands"])}'
            f'  -> {" ".join(o["result"])}  {flags}')
  out = dict(root=root, context_mesh=context_mesh,
             strategies={s: dict(summary(ops), ops=ops) for s, ops in res.items()})
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main()
