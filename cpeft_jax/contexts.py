"""Token kinds -> context ids: which adaptor group each token uses. Pure numpy.

The data layout labels every position with a token kind (`Kind`); a context map (a dict from
kind name to context id) turns kinds into the integer context ids that the adaptors index.
A new way of splitting contexts (modality, role, task) is a new map, not a model change.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np


class Kind(enum.IntEnum):
  """What a sequence position holds; stored as small ints in `kinds_BL` arrays."""

  PAD = 0
  BOS = 1
  IMAGE = 2
  TEXT = 3  # caption tokens
  EOS = 4
  BOUNDARY = 5  # learned tokens just before and after the image segment


KIND_NAMES = tuple(k.name.lower() for k in Kind)
PRESETS = ('agnostic', 'modality')


def preset(name: str, *, boundary: int | None = None) -> dict[str, int]:
  """Returns a named context map.

  'agnostic': every kind is context 0 (plain PEFT). 'modality': image 1, everything else 0;
  boundary tokens join the image context unless `boundary` gives another id.
  """
  if name == 'agnostic':
    if boundary not in (None, 0):
      raise ValueError(f"preset 'agnostic' puts every kind in context 0, got boundary={boundary}")
    return {k: 0 for k in KIND_NAMES}
  if name == 'modality':
    mapping = {k: 0 for k in KIND_NAMES}
    mapping['image'] = 1
    mapping['boundary'] = 1 if boundary is None else boundary
    return validate(mapping)
  raise ValueError(f'unknown context preset {name!r}; expected one of {list(PRESETS)}')


def validate(mapping: Mapping[str, int] | str) -> dict[str, int]:
  """Checks a context map (or resolves a preset name) and returns it as a plain dict.

  Keys must be kind names (see `KIND_NAMES`) or `Kind` members; ids non-negative ints. Kinds
  left out are allowed here; `context_ids` raises if one of them actually occurs.
  """
  if isinstance(mapping, str):
    return preset(mapping)
  out = {}
  for key, ctx in mapping.items():
    name = key.name.lower() if isinstance(key, Kind) else key
    if name not in KIND_NAMES:
      raise ValueError(f'unknown token kind {key!r} in context map; '
                       f'expected one of {list(KIND_NAMES)}')
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 0:
      raise ValueError(f'context id for kind {name!r} must be an int >= 0, got {ctx!r}')
    out[name] = int(ctx)
  if not out:
    raise ValueError(f'empty context map; expected ids for kinds among {list(KIND_NAMES)}')
  return out


def num_contexts(mapping: Mapping[str, int] | str) -> int:
  """Number of adaptor groups a map needs: largest context id + 1."""
  return max(validate(mapping).values()) + 1


def context_ids(kinds_BL: np.ndarray, mapping: Mapping[str, int] | str) -> np.ndarray:
  """Maps an integer array of token kinds (any shape) to int32 context ids of the same shape."""
  mapping = validate(mapping)
  kinds_BL = np.asarray(kinds_BL)
  if kinds_BL.size and not np.issubdtype(kinds_BL.dtype, np.integer):
    raise ValueError(f'token kinds must be an integer array, got dtype {kinds_BL.dtype}')
  if kinds_BL.size and (kinds_BL.min() < 0 or kinds_BL.max() >= len(Kind)):
    bad = sorted(set(np.unique(kinds_BL).tolist()) - set(range(len(Kind))))
    raise ValueError(f'token kinds {bad} are not valid; expected ints in [0, {len(Kind)}) '
                     f'for {list(KIND_NAMES)}')
  table_K = np.full(len(Kind), -1, np.int32)
  for name, ctx in mapping.items():
    table_K[Kind[name.upper()]] = ctx
  ctx_BL = table_K[kinds_BL]
  if (ctx_BL < 0).any():
    missing = sorted({KIND_NAMES[k] for k in np.unique(kinds_BL[ctx_BL < 0]).tolist()})
    raise ValueError(f'context map {mapping} has no id for token kinds {missing} '
                     'present in the data')
  return ctx_BL
