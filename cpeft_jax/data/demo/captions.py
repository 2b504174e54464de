"""Templated reference captions that are true of a scene.

Every caption names every group with its count, colour and shape; size and position phrases
are optional, and group order, wording and the frame around the list vary between captions.
"""

from __future__ import annotations

import numpy as np

from cpeft_jax.data.demo.scenes import Group, Scene

COUNT_WORDS = {1: ('a', 'one', 'a single'), 2: ('two', 'a pair of'), 3: ('three',), 4: ('four',)}
SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
           'diamond': 'diamonds', 'cross': 'crosses'}
POSITION_PHRASES = {
    'left': ('on the left', 'on the left side', 'to the left'),
    'right': ('on the right', 'on the right side', 'to the right'),
    'top': ('at the top', 'near the top', 'along the top'),
    'bottom': ('at the bottom', 'near the bottom', 'along the bottom'),
    'center': ('in the center', 'in the middle'),
    'top left': ('in the top left corner', 'at the top left'),
    'top right': ('in the top right corner', 'at the top right'),
    'bottom left': ('in the bottom left corner', 'at the bottom left'),
    'bottom right': ('in the bottom right corner', 'at the bottom right'),
}
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
                'ten', 'eleven', 'twelve')
# {list} is the groups joined; {be} agrees with the first group; {total} counts the items.
FRAMES = (
    '{list}',
    '{list}',
    'a picture of {list}',
    'an image showing {list}',
    'there {be} {list}',
    '{list} on a dark background',
    '{total}: {list}',
    'a dark scene with {list}',
)


def _article(words: str) -> str:
  """'a orange' -> 'an orange'."""
  if words.startswith('a ') and words[2:3] in 'aeiou':
    return 'an ' + words[2:]
  return words


def group_phrase(group: Group, rng: np.random.Generator, *, with_size: bool,
                 with_position: bool) -> str:
  """'two small red circles on the left' (size and position optional)."""
  words = [str(rng.choice(COUNT_WORDS[group.count]))]
  if with_size:
    words.append(str(rng.choice(SIZE_WORDS[group.size])))
  words.append(group.color)
  words.append(group.shape if group.count == 1 else PLURALS[group.shape])
  if with_position and group.position is not None:
    words.append(str(rng.choice(POSITION_PHRASES[group.position])))
  return _article(' '.join(words))


def _join(phrases: list[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """One random true caption of the scene."""
  order = rng.permutation(len(scene.groups))
  groups = [scene.groups[i] for i in order]
  phrases = [group_phrase(g, rng, with_size=bool(rng.random() < 0.6),
                          with_position=bool(rng.random() < 0.7)) for g in groups]
  total = sum(g.count for g in groups)
  frame = str(rng.choice(FRAMES))
  return _article(frame.format(
      list=_join(phrases),
      be='is' if groups[0].count == 1 else 'are',
      total=f'{NUMBER_WORDS[total]} shape{"s" if total > 1 else ""}'))


def reference_captions(scene: Scene, rng: np.random.Generator, num: int = 5) -> list[str]:
  """`num` captions of the scene, distinct where the templates allow it."""
  out: list[str] = []
  for _ in range(20 * num):
    text = caption(scene, rng)
    if text not in out:
      out.append(text)
    if len(out) == num:
      return out
  while len(out) < num:  # a scene with few phrasings: repeat some
    out.append(caption(scene, rng))
  return out
