"""Deterministic demo examples: (image, reference captions, ids) per split and index.

Example `i` of a split depends only on (seed, split, i, image_size, captions_per_image), so a
split of n examples is a prefix of any larger one. The TFDS builder stores these examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from cpeft_jax.data.demo import captions as captions_lib
from cpeft_jax.data.demo import questions, scenes

SPLITS = ('train', 'validation', 'test')
# Image ids are split * _ID_STRIDE + index, unique across splits (as COCO's are).
_ID_STRIDE = 1_000_000


def make_example(split: str, index: int, *, seed: int = 0, image_size: int = 64,
                 captions_per_image: int = 5) -> tuple[dict[str, Any], scenes.Scene]:
  """One example in coco_captions' layout, and the scene it was drawn from."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {list(SPLITS)}')
  if not 0 <= index < _ID_STRIDE:
    raise ValueError(f'example index must be in [0, {_ID_STRIDE}), got {index}')
  if captions_per_image < 1:
    raise ValueError(f'captions_per_image must be >= 1, got {captions_per_image}')
  split_code = SPLITS.index(split)
  rng = _rng(split, index, seed)
  scene = scenes.sample_scene(rng, image_size)
  image_id = split_code * _ID_STRIDE + index
  texts = captions_lib.reference_captions(scene, rng, captions_per_image)
  example = {
      'image': scenes.draw(scene),
      'image/filename': f'{split}_{index:06d}.png',
      'image/id': image_id,
      'captions': [{'text': t, 'id': image_id * captions_per_image + j}
                   for j, t in enumerate(texts)],
  }
  return example, scene


def scene_of(image_id: int, *, seed: int = 0, image_size: int = 64) -> scenes.Scene:
  """The scene behind a stored example, from its image id (no drawing, no captions).

  Lets a consumer derive labels (shapes, colours, counts) for the demo's images.
  """
  split_code, index = divmod(int(image_id), _ID_STRIDE)
  if not 0 <= split_code < len(SPLITS):
    raise ValueError(f'image id {image_id} is not a demo image id (split * {_ID_STRIDE} + index).')
  return scenes.sample_scene(_rng(SPLITS[split_code], index, seed), image_size)


def qa_pairs(image_id: int, *, seed: int = 0, image_size: int = 64) -> list[tuple[str, str]]:
  """(prompt, answer) pairs of the questions about a stored example's scene (the 'qa' task),
  in an order fixed by (seed, image id); derived from the scene, so nothing extra is stored."""
  scene = scene_of(image_id, seed=seed, image_size=image_size)
  split_code, index = divmod(int(image_id), _ID_STRIDE)
  return questions.qa_pairs(scene, np.random.default_rng([seed, split_code, index, 1]))


def _rng(split: str, index: int, seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), index])


def generate_examples(split: str, num_examples: int, *, seed: int = 0, image_size: int = 64,
                      captions_per_image: int = 5) -> Iterator[dict[str, Any]]:
  """Yields the first `num_examples` examples of a split (see `make_example`)."""
  if num_examples < 0 or num_examples > _ID_STRIDE:
    raise ValueError(f'num_examples must be in [0, {_ID_STRIDE}], got {num_examples}')
  for index in range(num_examples):
    yield make_example(split, index, seed=seed, image_size=image_size,
                       captions_per_image=captions_per_image)[0]
