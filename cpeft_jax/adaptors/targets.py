"""Which projections carry which methods: the paper's A / F / AF presets and glob patterns.

A model lists its block's projections (`Projection`); `resolve_targets` reads a `PeftConfig`'s
targets against them and gives every projection its `LayerAdaptor`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

import numpy as np

from cpeft_jax.adaptors.config import PeftConfig

# Target presets of the paper: A = attention projections, F = feed-forward projections.
PRESETS = ('A', 'F', 'AF', 'all')


@dataclasses.dataclass(frozen=True)
class Projection:
  """A projection of an architecture's block, as target selection sees it.

  group: 'A' (attention) or 'F' (feed-forward). ia3: where the paper's IA3 presets scale it:
  'out' for keys and values, 'in' for the feed-forward down projection, None otherwise.
  """
  name: str
  group: str
  ia3: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerAdaptor:
  """Which methods one projection carries; ia3 is 'in', 'out' or None."""
  lora: bool = False
  bitfit: bool = False
  ia3: str | None = None
  dora: bool = False

  @property
  def any(self) -> bool:
    return self.lora or self.bitfit or self.ia3 is not None or self.dora

  def rows_with(self, method: str, peft: PeftConfig) -> np.ndarray:
    """Static bool [R]: which table rows this projection adapts with `method`."""
    here = {'lora': self.lora, 'dora': self.dora, 'bitfit': self.bitfit,
            'ia3': self.ia3 is not None}[method]
    return np.array([here and method in s.methods for s in peft.row_specs], bool)

  def ranks(self, peft: PeftConfig) -> np.ndarray:
    """Static int [R]: each row's real LoRA rank in this projection (0: no LoRA tables used)."""
    used_R = self.rows_with('lora', peft) | self.rows_with('dora', peft)
    return np.array([s.rank if u else 0 for s, u in zip(peft.row_specs, used_R)], np.int64)


def _match(spec: str, projections: Sequence[Projection], method: str) -> set[str]:
  names = [p.name for p in projections]
  if spec in PRESETS:
    groups = {'A': 'A', 'F': 'F', 'AF': 'AF', 'all': 'AF'}[spec]
    chosen = {p.name for p in projections if p.group in groups}
    if method == 'ia3' and spec != 'all':
      chosen = {p.name for p in projections if p.name in chosen and p.ia3}
    return chosen
  chosen = set()
  for pattern in (s.strip() for s in spec.split(',')):
    hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)
            or fnmatch.fnmatchcase(n.rsplit('/', 1)[-1], pattern)}
    if not pattern or not hits:
      raise ValueError(
          f'PEFT target {pattern!r} (for {method}) matches no projection; presets are '
          f'{PRESETS} and the projections of this model are {names}.')
    chosen |= hits
  return chosen


def resolve_targets(peft: PeftConfig | None,
                    projections: Sequence[Projection]) -> dict[str, LayerAdaptor]:
  """Maps every projection name to the methods it carries; unmatched targets are an error."""
  out = {p.name: LayerAdaptor() for p in projections}
  if peft is None:
    return out
  by_name = {p.name: p for p in projections}
  for method in peft.methods:
    for name in _match(peft.targets_of(method), projections, method):
      cur = out[name]
      if method == 'ia3':
        cur = dataclasses.replace(cur, ia3=by_name[name].ia3 or 'out')
      else:
        cur = dataclasses.replace(cur, **{method: True})
      out[name] = cur
  if peft.methods and not any(a.any for a in out.values()):
    raise ValueError(f'peft.targets={peft.targets!r} selects no projection for {peft.methods}.')
  return out
