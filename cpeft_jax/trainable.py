"""Which leaves train: a model's variables split into a trainable and a frozen tree, by mode.

Which leaves train is a rule over variable paths ('collection/module/.../leaf'): adaptor
tables and the connector for PEFT, the connector alone for the paper's "projection only"
baseline, everything but the vision encoder for full fine-tuning. Only the trainable tree is
differentiated and only it has optimizer state; the frozen tree is a separate argument.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cpeft_jax import trees

# Regexes over 'collection/path/to/leaf'; a leaf trains if any pattern of its mode matches.
TRAINABLE = {
    'peft': (r'^adaptors/', r'^params/connector/'),
    'connector': (r'^params/connector/',),
    'full': (r'^adaptors/', r'^params/connector/', r'^params/decoder/'),
}


def split(variables: Mapping[str, Any], mode: str) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts of the same collections; each leaf in exactly one."""
  if mode not in TRAINABLE:
    raise ValueError(f'train mode {mode!r}; expected one of {sorted(TRAINABLE)}.')
  patterns = [re.compile(p) for p in TRAINABLE[mode]]
  flat = trees.flatten(variables)
  trainable = {k: v for k, v in flat.items() if any(p.search(k) for p in patterns)}
  if not trainable:
    raise ValueError(f'train mode {mode!r} selects no variable; the model has '
                     f'{sorted({k.split("/")[0] + "/" + k.split("/")[1] for k in flat})}.')
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return trees.unflatten(trainable), trees.unflatten(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """The model's variables from its two parts."""
  flat = trees.flatten(dict(frozen))
  flat.update(trees.flatten(dict(trainable)))
  return trees.unflatten(flat)
