"""Which leaves train: a model's variables split into a trainable and a frozen tree, by mode.

Which leaves train is a rule over variable paths ('collection/module/.../leaf'): adaptor
tables and the connector for PEFT, the connector alone for the paper's "projection only"
baseline, the connector and the decoder for full fine-tuning. Only the trainable tree is
differentiated and only it has optimizer state; the frozen tree is a separate argument.

Full fine-tuning keeps the decoder's input embedding table (`embed_tokens`) frozen, as the
paper does (its LM's input embeddings are OPT-125m's, frozen), unless `train_embeddings`
(config: train.full_embeddings=True). With tied embeddings the LM head is that same table, so
it stays frozen too: only an untied `lm_head` trains. Learned position tables (GPT-2, OPT) are
not input token embeddings and train under full fine-tuning.
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
# The decoder's input embedding table, frozen under full fine-tuning unless asked to train.
EMBEDDINGS = r'^params/decoder/embed_tokens/'


def split(variables: Mapping[str, Any], mode: str, *,
          train_embeddings: bool = False) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts of the same collections; each leaf in exactly one.

  `train_embeddings` (mode 'full' only): the input embedding table trains as well.
  """
  if mode not in TRAINABLE:
    raise ValueError(f'train mode {mode!r}; expected one of {sorted(TRAINABLE)}.')
  patterns = [re.compile(p) for p in TRAINABLE[mode]]
  keep_frozen = re.compile(EMBEDDINGS) if mode == 'full' and not train_embeddings else None
  flat = trees.flatten(variables)
  trainable = {k: v for k, v in flat.items() if any(p.search(k) for p in patterns)
               and not (keep_frozen and keep_frozen.search(k))}
  if not trainable:
    raise ValueError(f'train mode {mode!r} selects no variable; the model has '
                     f'{sorted({k.split("/")[0] + "/" + k.split("/")[1] for k in flat})}.')
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return trees.unflatten(trainable), trees.unflatten(frozen)


def split_for(variables: Mapping[str, Any], config) -> tuple[dict, dict]:
  """`split` as a config asks: train.mode, and train.full_embeddings (default False)."""
  return split(variables, config.train.mode,
               train_embeddings=bool(config.train.get('full_embeddings', False)))


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """The model's variables from its two parts."""
  flat = trees.flatten(dict(frozen))
  flat.update(trees.flatten(dict(trainable)))
  return trees.unflatten(flat)
