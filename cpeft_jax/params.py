"""Parameter accounting: trainable adaptor parameters per method and per context.

With per-context specs (`PeftConfig.contexts`) only the real parameters count: each context's
own rank and methods; the padding that keeps the tables one grouped computation (ranks padded to
the largest, rows of contexts without a method) is reported apart, in entries and bytes.

    python -m cpeft_jax.params --config=configs/paper_llm150m.py:method=lora,rank=64
    python -m cpeft_jax.params --config=configs/paper_llm150m.py --grid   # the paper's Table 3

Table 3's full fine-tuning row counts what train.mode='full' trains in the LM: every decoder
parameter except the input embedding table, which stays frozen as the paper's (OPT-125m's)
do; an untied LM head counts, a tied one is that frozen table. With the config's
train.full_embeddings=True the table counts too. The connector, trained in every row, is not
counted in any. Shapes come from `jax.eval_shape`, so no parameter memory is ever allocated.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import adaptors, experiment
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.models.decoder_config import DecoderConfig

# Table leaf name -> (method, axis of the context rows counted from the end). The LoRA tables
# count towards 'dora' for the rows of DoRA contexts.
_LEAVES = {'lora_a': ('lora', -3), 'lora_b': ('lora', -3), 'ia3': ('ia3', -2),
           'bitfit': ('bitfit', -2), 'dora_m': ('dora', -2)}


@dataclasses.dataclass
class Report:
  """Trainable adaptor parameters by method and context, and the frozen base's size.

  padding / padding_bytes: stored table entries that are not parameters (inert padding).
  """
  per_method_context: dict[str, dict[int, int]]
  base: int
  peft: PeftConfig
  padding: int = 0
  padding_bytes: int = 0
  embeddings: int = 0  # the input embedding table's share of `base`

  def full_trainable(self, embeddings: bool = False) -> int:
    """The LM parameters full fine-tuning trains: the base less its input embeddings (frozen
    as in the paper) unless `embeddings` (train.full_embeddings)."""
    return self.base - (0 if embeddings else self.embeddings)

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
    if self.padding:
      lines.append(f'\npadding: {self.padding:,} stored entries ({self.padding_bytes / 2**20:.2f} '
                   'MiB) hold no parameters (ranks padded to the largest, rows of contexts '
                   'without a method); they stay zero/one and receive no gradient')
    lines.append(f'\nfrozen base parameters: {self.base:,}; full fine-tuning trains '
                 f'{self.full_trainable():,} of them (all but the {self.embeddings:,} of the '
                 'input embeddings, frozen as in the paper; train.full_embeddings=True: all)')
    return '\n'.join(lines)


def variable_shapes(cfg: DecoderConfig, peft: PeftConfig | None, seq_len: int = 8):
  """The decoder's variables as ShapeDtypeStructs, without allocating them."""
  model = make_decoder(cfg, peft)
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))


def _infer_adapt(siblings, peft: PeftConfig) -> adaptors.LayerAdaptor:
  """A projection's methods from the tables it holds (when its targets are not at hand)."""
  return adaptors.LayerAdaptor(lora='lora_a' in siblings and 'lora' in peft.methods,
                               dora='dora_m' in siblings, bitfit='bitfit' in siblings,
                               ia3='out' if 'ia3' in siblings else None)


def count_tables(tables, peft: PeftConfig, targets=None):
  """(parameters per method and context, padding entries, padding bytes) of 'adaptors' tables.

  `targets` maps projection names ('attn/q_proj') to their `LayerAdaptor`; without it the
  methods are read off the tables present (exact unless LoRA and DoRA target differently).
  """
  out = {m: {c: 0 for c in peft.rows} for m in peft.methods}
  padding = padding_bytes = 0
  flat = jax.tree_util.tree_flatten_with_path(tables)[0]
  siblings = {}
  for path, _ in flat:
    siblings.setdefault(tuple(k.key for k in path[:-1]), set()).add(path[-1].key)
  for path, leaf in flat:
    keys = tuple(k.key for k in path)
    name = keys[-1]
    if name not in _LEAVES:
      raise ValueError(f'Unexpected adaptor table {jax.tree_util.keystr(path)}.')
    method, axis = _LEAVES[name]
    rows = leaf.shape[axis]
    if rows != peft.num_rows:
      raise ValueError(f'Adaptor table {jax.tree_util.keystr(path)} has {rows} context rows; '
                       f'the config has {peft.num_rows}.')
    adapt = (targets or {}).get('/'.join(keys[-3:-1])) or _infer_adapt(siblings[keys[:-1]], peft)
    lead = math.prod(leaf.shape[:leaf.ndim + axis])
    if name in ('lora_a', 'lora_b'):
      width = leaf.shape[-2] if name == 'lora_a' else leaf.shape[-1]
      dora_R = adapt.rows_with('dora', peft)
      real_R = [lead * width * int(k) for k in adapt.ranks(peft)]
      per_row = [('dora' if d else 'lora', n) for d, n in zip(dora_R, real_R)]
    else:
      on_R = adapt.rows_with(method, peft)
      per_row = [(method, lead * leaf.shape[-1] * int(on)) for on in on_R]
    for c, (m, n) in zip(peft.rows, per_row):
      if n:
        out[m][c] += n
    pad = math.prod(leaf.shape) - sum(n for _, n in per_row)
    padding += pad
    padding_bytes += pad * np.dtype(leaf.dtype).itemsize
  return out, padding, padding_bytes


def count_adaptors(tables, peft: PeftConfig, targets=None) -> dict[str, dict[int, int]]:
  """Adaptor parameters per method and per context, from a tree of 'adaptors' tables."""
  return count_tables(tables, peft, targets)[0]


def report(cfg: DecoderConfig, peft: PeftConfig) -> Report:
  shapes = variable_shapes(cfg, peft)
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  base = size(shapes['params'])
  targets = adaptors.resolve_targets(peft, cfg.projections())
  counts, padding, padding_bytes = count_tables(shapes.get(adaptors.ADAPTORS, {}), peft, targets)
  return Report(counts, base, peft, padding, padding_bytes,
                embeddings=size(shapes['params'].get('embed_tokens', {})))


GRID = (('IA3', ('ia3',), None), ('BitFit', ('bitfit',), None), ('LoRA r=1', ('lora',), 1),
        ('LoRA r=8', ('lora',), 8), ('LoRA r=64', ('lora',), 64))


def grid(cfg: DecoderConfig, peft: PeftConfig, num_specific: int = 2,
         full_embeddings: bool = False) -> str:
  """The paper's Table 3 for this model and targets: agnostic vs context-specific counts; the
  full fine-tuning row counts the LM less its input embeddings unless `full_embeddings`."""
  lines = [f'| adaptor ({peft.targets}) | context-agnostic | context-specific ({num_specific}) |',
           '|---|---|---|']
  for label, methods, rank in GRID:
    lora = dataclasses.replace(peft.lora, rank=rank or peft.lora.rank)
    counts = [report(cfg, dataclasses.replace(peft, methods=methods, num_contexts=C, lora=lora,
                                              adapted_contexts=None, method_targets=(),
                                              contexts=None))
              .adaptor_total for C in (1, num_specific)]
    lines.append(f'| {label} | {counts[0]:,} | {counts[1]:,} |')
  base = report(cfg, dataclasses.replace(peft, methods=()))
  label = ('all LM parameters' if full_embeddings else
           f'LM less its {base.embeddings:,} frozen input embeddings')
  lines.append(f'| full fine-tuning ({label}) | {base.full_trainable(full_embeddings):,} | |')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = FLAGS.config
  cfg, peft = experiment.decoder_config(config), experiment.peft_config(config)
  if FLAGS.grid:
    print(grid(cfg, peft, full_embeddings=bool(
        (config.get('train') or {}).get('full_embeddings', False))))
  else:
    print(f'methods={peft.methods} targets={peft.targets!r} contexts={peft.num_contexts} '
          f'adapted={peft.rows} rank={peft.lora.rank}')
    if not peft.uniform:
      for c, spec in enumerate(peft.specs):
        print(f'  context {c}: methods={"+".join(spec.methods) or "none"}'
              + (f' rank={spec.rank} scale={spec.lora.scale:g}' if spec.low_rank else ''))
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
