"""How right generated demo captions are about the scene: each group's count, colour and shape.

    python -m cpeft_jax.data.demo.grading DIR/eval/validation_captions.json [...]

CIDEr and BLEU reward wording; a demo caption is *right* when it names every group of its
scene with the right count, colour and shape, and nothing else. `named_groups` reads the
caption language of captions.py back (sizes and positions are optional there, so they are not
graded); `grade` scores COCO-format results ({'image_id', 'caption'} per image) of demo images.
"""

from __future__ import annotations

import json
import re
import sys

from cpeft_jax.data.demo import captions as captions_lib
from cpeft_jax.data.demo import examples, scenes

_COUNT = {w: n for n, words in captions_lib.COUNT_WORDS.items() for w in words}
_COUNT['an'] = 1  # 'an orange circle' (captions._article)
_SINGULAR = {**{p: s for s, p in captions_lib.PLURALS.items()}, **{s: s for s in scenes.SHAPES}}
_SIZES = '|'.join(w for words in captions_lib.SIZE_WORDS.values() for w in words)
_GROUP = re.compile(
    rf"\b({'|'.join(sorted(_COUNT, key=len, reverse=True))}) (?:(?:{_SIZES}) )?"
    rf"({'|'.join(scenes.COLORS)}) ({'|'.join(sorted(_SINGULAR, key=len, reverse=True))})\b")


def named_groups(text: str) -> list[tuple[int, str, str]]:
  """(count, colour, shape) of every group phrase in a caption, in order."""
  return [(_COUNT[m[1]], m[2], _SINGULAR[m[3]]) for m in _GROUP.finditer(text.lower())]


def grade(results, *, seed: int = 0, image_size: int = 64) -> dict[str, float | int]:
  """Groups named right (count, colour and shape) over all groups, and captions right (every
  group right, no other group named) over all captions, of demo images' generated captions."""
  groups = right = exact = 0
  for r in results:
    scene = examples.scene_of(int(r['image_id']), seed=seed, image_size=image_size)
    truth = {(g.count, g.color, g.shape) for g in scene.groups}
    named = named_groups(r['caption'])
    groups += len(truth)
    right += len(truth & set(named))
    exact += sorted(truth) == sorted(named)
  n = len(results)
  return {'groups_right': right / max(groups, 1), 'groups': groups,
          'captions_right': exact / max(n, 1), 'captions': n}


def main(paths: list[str]) -> None:
  if not paths:
    raise SystemExit(__doc__)
  for path in paths:
    with open(path) as f:
      g = grade(json.load(f))
    print(f"{path}: groups named right {g['groups_right']:.3f} of {g['groups']}, captions "
          f"right {g['captions_right']:.3f} of {g['captions']}")


if __name__ == '__main__':
  main(sys.argv[1:])
