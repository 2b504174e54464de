"""A markdown table comparing evaluated workdirs (e.g. context-agnostic vs context-specific).

    python -m cpeft_jax.evaluation.compare DIR1 DIR2 ... [--split=test] [--output=table.md]
    python evaluate.py --compare=DIR1,DIR2,... [--compare_split=test] [--compare_output=...]

Each workdir must hold DIR/eval/metrics.json (written by evaluate.py) and DIR/config.json
(written by training), from which its row names the contexts and the PEFT method.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from absl import app, flags

# (header, key in a split's metrics, format)
COLUMNS = (('PPL', 'perplexity', '{:.3f}'), ('BLEU-4', 'Bleu_4', '{:.3f}'),
           ('METEOR', 'METEOR', '{:.3f}'), ('ROUGE-L', 'ROUGE_L', '{:.3f}'),
           ('CIDEr', 'CIDEr', '{:.3f}'))


def _read(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: {what}.')
  with open(path) as f:
    return json.load(f)


def describe(config: dict) -> tuple[str, str]:
  """(contexts, method) of a run's config.json, as the table shows them."""
  peft, data = config.get('peft', {}), config.get('data', {})
  cmap = data.get('context_map', '?')
  contexts = cmap if isinstance(cmap, str) else ', '.join(f'{k}={v}' for k, v in cmap.items())
  contexts += f" ({peft.get('num_contexts', '?')})"
  methods = list(peft.get('methods') or [])
  parts = [f"lora r={peft.get('lora', {}).get('rank', '?')}" if m == 'lora' else m
           for m in methods]
  method = ' + '.join(parts) or 'none'
  mode = config.get('train', {}).get('mode', 'peft')
  return contexts, method if mode == 'peft' else f'{method} ({mode})'


def rows(workdirs: Sequence[str], split: str | None = None) -> tuple[str, list[dict]]:
  """(split, one row per workdir: {workdir, contexts, method, metrics}); `split` defaults to
  the first split of the first workdir's metrics and must be in every one."""
  if not workdirs:
    raise ValueError('No workdirs to compare: expected --compare=DIR1,DIR2,...')
  out = []
  for workdir in workdirs:
    metrics = _read(os.path.join(workdir, 'eval', 'metrics.json'),
                    f'run evaluate.py --workdir={workdir} first')
    config = _read(os.path.join(workdir, 'config.json'), 'training writes it into its workdir')
    splits = metrics.get('splits', {})
    split = split or next(iter(splits), None)
    if split not in splits:
      raise ValueError(f'{workdir} has no evaluated split {split!r}; its eval/metrics.json has '
                       f'{sorted(splits)}.')
    contexts, method = describe(config)
    out.append({'workdir': workdir, 'contexts': contexts, 'method': method,
                'metrics': splits[split]})
  return split, out


def table(workdirs: Sequence[str], split: str | None = None) -> str:
  """The comparison as a markdown table (a '-' where a run lacks a metric)."""
  split, found = rows(workdirs, split)
  head = ['workdir', 'contexts', 'method'] + [h for h, _, _ in COLUMNS]
  lines = [f'Split: {split}', '', '| ' + ' | '.join(head) + ' |',
           '|' + '|'.join(['---'] * 3 + ['---:'] * len(COLUMNS)) + '|']
  for r in found:
    cells = [r['workdir'], r['contexts'], r['method']]
    cells += [fmt.format(r['metrics'][k]) if k in r['metrics'] else '-' for _, k, fmt in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write(workdirs: Sequence[str], split: str | None = None, output: str | None = None) -> str:
  """Prints the table and writes it to `output` when given; returns it."""
  text = table(workdirs, split)
  print(text, end='')
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, 'w') as f:
      f.write(text)
    print(f'wrote {output}')
  return text


def main(argv):
  write(argv[1:], flags.FLAGS.split, flags.FLAGS.output)


if __name__ == '__main__':
  flags.DEFINE_string('split', None, 'Split to compare (default: the first evaluated one).')
  flags.DEFINE_string('output', None, 'Also write the markdown table to this file.')
  app.run(main)
