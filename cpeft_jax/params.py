"""Parameter accounting: trainable adaptor parameters per method and per context.

    python -m cpeft_jax.params --config=configs/paper_llm150m.py:method=lora,rank=64
    python -m cpeft_jax.params --config=configs/paper_llm150m.py --grid   # the paper's Table 3

Shapes come from `jax.eval_shape`, so no parameter memory is ever allocated.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.llama import Decoder, DecoderConfig

# Table leaf name -> (method, axis of the context rows counted from the end).
_LEAVES = {'lora_a': ('lora', -3), 'lora_b': ('lora', -3), 'ia3': ('ia3', -2),
           'bitfit': ('bitfit', -2)}


@dataclasses.dataclass
class Report:
  """Trainable adaptor parameters by method and context, and the frozen base's size."""
  per_method_context: dict[str, dict[int, int]]
  base: int
  peft: PeftConfig

  @property
  def adaptor_total(self) -> int:
    return sum(sum(v.values()) for v in self.per_method_context.values())

  def context_total(self, c: int) -> int:
    return sum(v.get(c, 0) for v in self.per_method_context.values())

  def format(self) -> str:
    C = self.peft.num_contexts
    head = '| method | ' + ' | '.join(f'context {c}' for c in range(C)) + ' | total |'
    lines = [head, '|---' * (C + 2) + '|']
    for m, per in self.per_method_context.items():
      lines.append(f'| {m} | ' + ' | '.join(f'{per.get(c, 0):,}' for c in range(C))
                   + f' | {sum(per.values()):,} |')
    lines.append('| all adaptors | ' + ' | '.join(f'{self.context_total(c):,}' for c in range(C))
                 + f' | {self.adaptor_total:,} |')
    lines.append(f'\nfrozen base parameters: {self.base:,} (trainable under full fine-tuning)')
    return '\n'.join(lines)


def variable_shapes(cfg: DecoderConfig, peft: PeftConfig | None, seq_len: int = 8):
  """The decoder's variables as ShapeDtypeStructs, without allocating them."""
  model = Decoder(cfg, peft)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))


def count_adaptors(tables, peft: PeftConfig) -> dict[str, dict[int, int]]:
  """Adaptor parameters per method and per context, from a tree of 'adaptors' tables."""
  out = {m: {c: 0 for c in peft.rows} for m in peft.methods}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tables)[0]:
    name = path[-1].key
    if name not in _LEAVES:
      raise ValueError(f'Unexpected adaptor table {jax.tree_util.keystr(path)}.')
    method, axis = _LEAVES[name]
    rows = leaf.shape[axis]
    if rows != peft.num_rows:
      raise ValueError(f'Adaptor table {jax.tree_util.keystr(path)} has {rows} context rows; '
                       f'the config has {peft.num_rows}.')
    for c in peft.rows:
      out[method][c] += math.prod(leaf.shape) // rows
  return out


def report(cfg: DecoderConfig, peft: PeftConfig) -> Report:
  shapes = variable_shapes(cfg, peft)
  base = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  return Report(count_adaptors(shapes.get(adaptors.ADAPTORS, {}), peft), base, peft)


GRID = (('IA3', ('ia3',), None), ('BitFit', ('bitfit',), None), ('LoRA r=1', ('lora',), 1),
        ('LoRA r=8', ('lora',), 8), ('LoRA r=64', ('lora',), 64))


def grid(cfg: DecoderConfig, peft: PeftConfig, num_specific: int = 2) -> str:
  """The paper's Table 3 for this model and targets: agnostic vs context-specific counts."""
  lines = [f'| adaptor ({peft.targets}) | context-agnostic | context-specific ({num_specific}) |',
           '|---|---|---|']
  for label, methods, rank in GRID:
    lora = dataclasses.replace(peft.lora, rank=rank or peft.lora.rank)
    counts = [report(cfg, dataclasses.replace(peft, methods=methods, num_contexts=C, lora=lora,
                                              adapted_contexts=None, method_targets=()))
              .adaptor_total for C in (1, num_specific)]
    lines.append(f'| {label} | {counts[0]:,} | {counts[1]:,} |')
  full = report(cfg, dataclasses.replace(peft, methods=())).base
  lines.append(f'| full fine-tuning (all base parameters) | {full:,} | |')
  return '\n'.join(lines)


def main(argv):
  del argv
  from cpeft_jax import configlib
  config = FLAGS.config
  cfg, peft = configlib.decoder_config(config), configlib.peft_config(config)
  if FLAGS.grid:
    print(grid(cfg, peft))
  else:
    print(f'methods={peft.methods} targets={peft.targets!r} contexts={peft.num_contexts} '
          f'adapted={peft.rows} rank={peft.lora.rank}')
    print(report(cfg, peft).format())


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).',
                                  lock_config=True)
  flags.DEFINE_bool('grid', False, "Print the paper's Table 3 grid for the config's model.")
  flags.mark_flags_as_required(['config'])
  app.run(main)
