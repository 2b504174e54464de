"""RESULTS.md of a sweep: the paper's Table 1 and Table 2 layouts, every cell, and the findings.

Numbers over seeds are written `mean ± s`, s being half the range (lowest to highest seed), so
every seed lies within mean ± s; with two seeds they are exactly the two values. A finding is a
set of comparisons `lower < higher` of validation perplexities; a comparison holds when the
means are in that order, and its gap stands out of the seed noise when it exceeds the sum of
the two cells' spreads (their seeds' ranges do not overlap).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any


RESULTS = 'RESULTS.md'
PROJECTION_ONLY, FULL = 'projection only', 'full fine-tuning'  # the rows of non-PEFT cells
PAPER_METHODS = ('IA3', 'BitFit', 'LoRA r=1', 'LoRA r=8', 'LoRA r=64')
TARGETS = ('A', 'F', 'AF')
CONTEXTS = ('agnostic', 'specific')
CAPTION_METRICS = (('Bleu_4', 'BLEU-4'), ('METEOR', 'METEOR'), ('ROUGE_L', 'ROUGE-L'),
                   ('CIDEr', 'CIDEr'))
SPREAD = ('mean ± s over seeds, s = half the range from the lowest to the highest seed (every '
          'seed lies within mean ± s; with two seeds they are the two values)')
Key = tuple[str, str, str]  # (method, targets, contexts); '' targets and contexts off PEFT


@dataclasses.dataclass(frozen=True)
class Stat:
  mean: float
  lo: float
  hi: float
  n: int

  @property
  def spread(self) -> float:
    return (self.hi - self.lo) / 2

  @classmethod
  def of(cls, values: Sequence[float]) -> Stat:
    return cls(sum(values) / len(values), min(values), max(values), len(values))

  def text(self, digits: int = 3) -> str:
    return f'{self.mean:.{digits}f} ± {self.spread:.{digits}f}'


@dataclasses.dataclass(frozen=True)
class Comparison:
  lower: Key  # expected to have the lower perplexity
  higher: Key
  gap: float  # mean(higher) - mean(lower): positive when the comparison holds
  spread: float  # the two cells' spreads added

  @property
  def holds(self) -> bool:
    return self.gap > 0

  @property
  def separated(self) -> bool:
    return self.gap > self.spread


@dataclasses.dataclass(frozen=True)
class Finding:
  statement: str
  comparisons: tuple[Comparison, ...]  # those whose two cells are measured
  expected: int  # comparisons in the whole grid

  @property
  def verdict(self) -> str:
    if not self.comparisons:
      return 'not measured yet'
    if not all(c.holds for c in self.comparisons):
      return 'does not hold'
    n = len(self.comparisons)
    return 'holds' if n >= self.expected else f'holds so far ({n} of {self.expected} measured)'

  def line(self) -> str:
    if not self.comparisons:
      return f'- {self.statement}: **{self.verdict}**.'
    cs = self.comparisons
    held, apart = sum(c.holds for c in cs), sum(c.separated for c in cs)
    worst = min(cs, key=lambda c: c.gap)
    out = (f'- {self.statement}: **{self.verdict}**. {held} of {len(cs)} comparisons hold, '
           f'{apart} by more than the seed spread; smallest gap {worst.gap:+.3f} PPL '
           f'({_name(worst.higher)} − {_name(worst.lower)}) against a seed spread of '
           f'{worst.spread:.3f}')
    failed = [c for c in cs if not c.holds]
    if failed:
      out += '; fails: ' + ', '.join(f'{_name(c.lower)} vs {_name(c.higher)} '
                                     f'({c.gap:+.3f} ± {c.spread:.3f})' for c in failed[:4])
      out += f' and {len(failed) - 4} more' if len(failed) > 4 else ''
    return out + '.'


def _name(key: Key) -> str:
  return ' '.join(k for k in key if k)


def stats(results: Sequence[dict], value: Callable[[dict], float | None]) -> dict[Key, Stat]:
  """{(method, targets, contexts): Stat of `value` over the seeds of that cell}."""
  groups: dict[Key, list[float]] = {}
  for r in results:
    v = value(r)
    if v is not None:
      groups.setdefault((r['method'], r['targets'], r['contexts']), []).append(float(v))
  return {k: Stat.of(v) for k, v in groups.items()}


def _methods(keys) -> list[str]:
  """The paper's adaptors first, then any other PEFT method of the results."""
  others = sorted({k[0] for k in keys} - set(PAPER_METHODS) - {PROJECTION_ONLY, FULL})
  return list(PAPER_METHODS) + others


def _compare(ppl: dict[Key, Stat], pairs: Sequence[tuple[Key, Key]]) -> tuple[Comparison, ...]:
  return tuple(Comparison(lo, hi, ppl[hi].mean - ppl[lo].mean, ppl[lo].spread + ppl[hi].spread)
               for lo, hi in pairs if lo in ppl and hi in ppl)


def findings(ppl: dict[Key, Stat]) -> list[Finding]:
  """The paper's findings checked on validation perplexities {(method, targets, contexts): Stat}."""
  methods = _methods(ppl)
  peft = [(m, t, x) for m in methods for t in TARGETS for x in CONTEXTS]
  specific = [((m, t, 'specific'), (m, t, 'agnostic')) for m in methods for t in TARGETS]
  af = [((m, 'AF', x), (m, t, x)) for m in methods for x in CONTEXTS for t in ('A', 'F')]
  chain = [((a, t, x), (b, t, x)) for t in TARGETS for x in CONTEXTS
           for b, a in itertools.pairwise(PAPER_METHODS)]
  proj = (PROJECTION_ONLY, '', '')
  worst = [(k, proj) for k in peft + [(FULL, '', '')]]
  lora64 = [(('LoRA r=64', 'AF', 'specific'), (FULL, '', ''))]
  n_paper = len(PAPER_METHODS)
  return [
      Finding('Context-specific below context-agnostic in every cell', _compare(ppl, specific),
              n_paper * len(TARGETS)),
      Finding('AF below A and below F', _compare(ppl, af), n_paper * len(CONTEXTS) * 2),
      Finding('LoRA r=64 < LoRA r=8 < LoRA r=1 < BitFit < IA3 (per targets and contexts)',
              _compare(ppl, chain), len(chain)),
      Finding('Projection only is the worst', _compare(ppl, worst),
              n_paper * len(TARGETS) * len(CONTEXTS) + 1),
      Finding('Context-LoRA-64 (AF, specific) below full fine-tuning at equal epochs',
              _compare(ppl, lora64), 1),
  ]


def _cell(s: Stat | None, digits: int = 3) -> str:
  return s.text(digits) if s else '–'


def table1(ppl: dict[Key, Stat]) -> list[str]:
  """Validation PPL per adaptor (rows) x targets x contexts (columns), as the paper's Table 1."""
  cols = [(t, x) for t in TARGETS for x in CONTEXTS]
  lines = ['| adaptor | ' + ' | '.join(f'{t} {x}' for t, x in cols) + ' |',
           '|---|' + '---|' * len(cols)]
  for m in _methods(ppl):
    if any((m, t, x) in ppl for t, x in cols) or m in PAPER_METHODS:
      lines.append(f'| {m} | ' + ' | '.join(_cell(ppl.get((m, t, x))) for t, x in cols) + ' |')
  return lines


def table2(results: Sequence[dict]) -> list[str]:
  """AF cells, projection only and full fine-tuning: PPL and caption metrics (Table 2's rows)."""
  ppl = stats(results, lambda r: r['val_ppl'])
  scores = {name: stats(results, lambda r, k=key: r['metrics'].get(key))
            for key, name in CAPTION_METRICS}
  rows = [(m, 'AF', x) for m in _methods(ppl) for x in CONTEXTS]
  rows += [(PROJECTION_ONLY, '', ''), (FULL, '', '')]
  lines = ['| adaptor | contexts | val PPL | ' + ' | '.join(n for _, n in CAPTION_METRICS) + ' |',
           '|---|---|---|' + '---|' * len(CAPTION_METRICS)]
  for k in rows:
    if k in ppl or k[0] in PAPER_METHODS + (PROJECTION_ONLY, FULL):
      lines.append(f'| {k[0]} | {k[2] or "–"} | {_cell(ppl.get(k))} | ' + ' | '.join(
          _cell(scores[n].get(k)) for _, n in CAPTION_METRICS) + ' |')
  return lines


def cell_table(results: Sequence[dict]) -> list[str]:
  """One row per cell: seeds, trainable parameters, PPL, caption metrics, steps, minutes."""
  by_cell: dict[str, list[dict]] = {}
  for r in results:
    by_cell.setdefault(r['cell'], []).append(r)
  lines = ['| cell | seeds | trainable | val PPL | ' +
           ' | '.join(n for _, n in CAPTION_METRICS) + ' | steps | minutes per seed |',
           '|---|---|---|---|' + '---|' * len(CAPTION_METRICS) + '---|---|']
  for name, rs in by_cell.items():
    s = lambda f: Stat.of([f(r) for r in rs])
    metric = [_cell(s(lambda r, k=k: r['metrics'][k])) if all(k in r['metrics'] for r in rs)
              else '–' for k, _ in CAPTION_METRICS]
    lines.append(f'| {name} | {",".join(str(r["seed"]) for r in sorted(rs, key=_seed))} | '
                 f'{rs[0]["trainable_params"]:,} | {_cell(s(lambda r: r["val_ppl"]))} | '
                 + ' | '.join(metric) + f' | {rs[0]["steps"]} | '
                 f'{s(lambda r: r["seconds"] / 60).mean:.1f} |')
  return lines


def _seed(r: dict) -> int:
  return r['seed']


def markdown(results: Sequence[dict], *, command: str, wall_seconds: float,
             runs_total: int) -> str:
  """RESULTS.md's text for `results` (the sweep result dicts finished so far)."""
  spent = sum(r['seconds'] for r in results) / 60
  out = ['# Sweep results', '', f'Command: `{command}`', '',
         f'Wall time: {wall_seconds / 60:.1f} min in this invocation; the {len(results)} finished '
         f'cell x seed runs ({len(results)} of {runs_total}) took {spent:.1f} min of training '
         'and evaluation in all.', '',
         f'Numbers: {SPREAD}. PPL is validation caption perplexity of the best-validation '
         'weights; caption metrics score greedy captions of the validation split against every '
         "reference (pycocoevalcap). The paper's Table 2 reports test PPL; this is validation.",
         '']
  encoders = sorted({r['encoder'] for r in results})
  for enc in encoders:
    rs = [r for r in results if r['encoder'] == enc]
    if len(encoders) > 1:
      out += [f'## Encoder {enc}', '']
    ppl = stats(rs, lambda r: r['val_ppl'])
    out += ['### Table 1: validation PPL by adaptor, targets and contexts', '', *table1(ppl), '',
            '### Table 2: AF, projection only and full fine-tuning', '', *table2(rs), '',
            "### The paper's findings, here", '', *(f.line() for f in findings(ppl)), '']
  out += ['## Every cell', '', *cell_table(results), '']
  return '\n'.join(out)


def write(path: str, results: Sequence[dict], **kw: Any) -> str:
  """Writes RESULTS.md (through a temporary file, so a reader never sees half of it)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(markdown(results, **kw))
  os.replace(tmp, path)
  return path
