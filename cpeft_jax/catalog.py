"""Named checkpoints this project loads: what each is, and the settings that suit it.

A config names a text model (`text_model=`) or a vision encoder (`vision.path=`) by hub id or
local directory; every name below is such a hub id, loaded like any other through
`checkpoints.resolve` (a local directory or the local Hugging Face cache; loading never goes
online). The catalog adds what a user wants to know before downloading (architecture, sizes)
and the recommended encoder settings (feature layer, CLS token). It is data, not a registry:
a name that is not here still loads if its model_type is supported.

  python -m cpeft_jax.catalog      # lists the presets
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

from cpeft_jax import checkpoints

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Text:
  """A decoder checkpoint: config.json's model_type and shape, and its parameter count."""
  model_type: str
  params: str
  hidden_size: int
  num_layers: int
  vocab_size: int
  note: str = ''


@dataclasses.dataclass(frozen=True)
class Vision:
  """A vision tower: its input size, image tokens and width at the recommended feature layer.

  feature_layer indexes transformers' hidden_states (-1 the last, -2 the penultimate, as
  LLaVA takes CLIP's); drop_cls drops the class token of towers that have one.
  """
  model_type: str
  params: str
  image_size: int
  num_tokens: int
  width: int
  feature_layer: int = -1
  drop_cls: bool = True
  note: str = ''


TEXT = {
    'HuggingFaceTB/SmolLM2-135M': Text('llama', '135M', 576, 30, 49152,
                                       'GQA 9/3 heads, tied embeddings; paper.py default'),
    'gpt2': Text('gpt2', '124M', 768, 12, 50257, "the paper's size reference; 1024 positions"),
    'facebook/opt-125m': Text('opt', '125M', 768, 12, 50272,
                              "the paper's embedding source; 2048 positions"),
    'TinyLlama/TinyLlama-1.1B-Chat-v1.0': Text('llama', '1.1B', 2048, 22, 32000,
                                               'GQA 32/4 heads'),
    'Qwen/Qwen2.5-0.5B': Text('qwen2', '494M', 896, 24, 151936,
                              'q/k/v biases, GQA 14/2 heads, tied embeddings'),
}
VISION = {
    'microsoft/swinv2-tiny-patch4-window8-256': Vision(
        'swinv2', '28M', 256, 64, 768, note="the paper's encoder (no CLS token)"),
    'openai/clip-vit-base-patch32': Vision(
        'clip', '88M', 224, 49, 768, feature_layer=-2,
        note='vision tower of the CLIP checkpoint; penultimate layer, CLS dropped (LLaVA)'),
    'google/siglip-base-patch16-224': Vision(
        'siglip', '86M', 224, 196, 768, note='vision tower of the SigLIP checkpoint (no CLS)'),
}


def vision_settings(name: str) -> dict:
  """Recommended `vision` config entries for an encoder: kind, path, feature_layer, drop_cls.

  A name outside the catalog gets the loader's defaults (last layer, CLS dropped).
  """
  v = VISION.get(name)
  return dict(kind='hf', path=name, feature_layer=v.feature_layer if v else -1,
              drop_cls=v.drop_cls if v else True)


def resolve(name: str | os.PathLike) -> pathlib.Path:
  """The checkpoint directory of a preset name, hub id or local path.

  An uncached name fails with how to fetch it (the error says the catalog's size for presets).
  A cached preset whose config.json disagrees with the catalog (another revision) is warned of.
  """
  entry = TEXT.get(str(name)) or VISION.get(str(name))
  try:
    directory = checkpoints.resolve(name)
  except FileNotFoundError as e:
    if entry is None:
      raise
    raise FileNotFoundError(
        f'{e} ({name!r} is a catalog preset: {entry.model_type}, {entry.params} parameters; '
        'where the hub is unreachable, download it on another machine and copy its Hugging '
        'Face cache, HF_HOME, here.)') from e
  if entry is not None:
    _check(name, entry, checkpoints.read_config(directory))
  return directory


def _check(name, entry, hf: dict):
  model_type = hf.get('model_type')
  if model_type not in (entry.model_type, f'{entry.model_type}_vision_model'):
    log.warning('%s: config.json has model_type=%r; the catalog records %r.', name, model_type,
                entry.model_type)
  if isinstance(entry, Text):
    width = hf.get('hidden_size', hf.get('n_embd'))
    if width != entry.hidden_size:
      log.warning('%s: config.json has hidden size %s; the catalog records %d.', name, width,
                  entry.hidden_size)


def table() -> str:
  """The presets as a markdown table (the output of `python -m cpeft_jax.catalog`)."""
  lines = ['| text model | type | parameters | hidden | layers | vocab | note |',
           '|---|---|---|---|---|---|---|']
  lines += [f'| {n} | {t.model_type} | {t.params} | {t.hidden_size} | {t.num_layers} | '
            f'{t.vocab_size} | {t.note} |' for n, t in TEXT.items()]
  lines += ['', '| vision model | type | parameters | image | tokens | width | feature layer '
            '| drop CLS | note |', '|---|---|---|---|---|---|---|---|---|']
  lines += [f'| {n} | {v.model_type} | {v.params} | {v.image_size} | {v.num_tokens} | '
            f'{v.width} | {v.feature_layer} | {v.drop_cls} | {v.note} |'
            for n, v in VISION.items()]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(table())
