"""Templated questions about a scene with their true answers: the demo's VQA-style task.

Only questions that a scene answers unambiguously are asked: a shape's colour only when one
group has that shape, a position only when the group's cells share a region. Answers are a
word or two ('red', 'three', 'top left'); prompts read 'question : ... ? answer :'.
"""

from __future__ import annotations

import numpy as np

from cpeft_jax.data.demo.captions import NUMBER_WORDS, PLURALS
from cpeft_jax.data.demo.scenes import Group, Scene

PROMPT = 'question : {} answer :'


def _noun(group: Group) -> str:
  return group.shape if group.count == 1 else PLURALS[group.shape]


def _be(count: int) -> str:
  return 'is' if count == 1 else 'are'


def questions(scene: Scene) -> list[tuple[str, str]]:
  """Every (question, answer) the scene answers unambiguously, in a fixed order."""
  out = []
  total = sum(g.count for g in scene.groups)
  out.append(('how many shapes are there ?', NUMBER_WORDS[total]))
  shapes = sorted({g.shape for g in scene.groups})
  for shape in shapes:
    same = [g for g in scene.groups if g.shape == shape]
    out.append((f'how many {PLURALS[shape]} are there ?', NUMBER_WORDS[sum(g.count for g in same)]))
    if len(same) == 1:  # colours are distinct per group, so one group means one colour
      g = same[0]
      out.append((f'what color {_be(g.count)} the {_noun(g)} ?', g.color))
  for g in scene.groups:  # a colour names one group
    out.append((f'how many {g.color} shapes are there ?', NUMBER_WORDS[g.count]))
    one = 'one' if g.count == 1 else 'ones'
    out.append((f'what shape {_be(g.count)} the {g.color} {one} ?', g.shape))
    if g.position is not None:
      out.append((f'where {_be(g.count)} the {g.color} {_noun(g)} ?', g.position))
  return out


def qa_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
  """(prompt, answer) of every question of the scene, in a random order (so that the first
  pair, which evaluation uses, varies in kind between images)."""
  qs = questions(scene)
  return [(PROMPT.format(q), a) for q, a in (qs[i] for i in rng.permutation(len(qs)))]
