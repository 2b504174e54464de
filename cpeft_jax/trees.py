"""Nested dicts of arrays as flat 'a/b/c' paths, and the one check that two trees agree.

Every module that names a leaf by its path (checkpoints, plug-ins, exports, partition rules)
goes through here, so paths are spelled alike everywhere and every "this does not fit"
error reads the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax

SEP = '/'


def flatten(tree, sep: str = SEP) -> dict[str, Any]:
  """{'a/b': leaf} of a nested dict (FrozenDicts included)."""
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=sep)


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict:
  """The nested dict of a {'a/b': leaf} mapping."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep=sep)


def key_name(key) -> str:
  """One entry of a jax key path as text (dict key, attribute name or sequence index)."""
  return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))


def path_str(keys: Iterable[Any]) -> str:
  """A jax key path (as from tree_flatten_with_path) as 'a/b/c'."""
  return SEP.join(key_name(k) for k in keys)


def shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'a/b': shape} of every array-like leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {path_str(path): tuple(x.shape) for path, x in leaves}


def some(items: list[str], n: int = 3) -> str:
  """The first `n` items, and how many more."""
  more = f' (and {len(items) - n} more)' if len(items) > n else ''
  return ', '.join(items[:n]) + more


def shape_problems(want: Mapping[str, Any], got: Mapping[str, Any], *, got_name: str,
                   want_name: str) -> list[str]:
  """What differs between two {path: shape} maps, worded with the two sides' names."""
  problems = []
  if only := sorted(got.keys() - want.keys()):
    problems.append(f'only in {got_name}: {some(only)}')
  if only := sorted(want.keys() - got.keys()):
    problems.append(f'only in {want_name}: {some(only)}')
  if differ := [f'{k} is {tuple(got[k])} in {got_name}, {tuple(want[k])} in {want_name}'
                for k in sorted(got.keys() & want.keys()) if tuple(got[k]) != tuple(want[k])]:
    problems.append(f'different shapes: {some(differ)}')
  return problems


def require_same_shapes(want, got, what: str, *, got_name: str = 'the saved tensors',
                        want_name: str = 'the model', hint: str = '', note: str = '',
                        error: type[Exception] = ValueError) -> None:
  """Raises `error` naming every difference when two trees (or {path: shape} maps) disagree.

  `want` and `got` are nested trees of arrays or flat {path: shape} maps; `what` names the
  thing checked ("The checkpoint DIR"), `hint` a likely cause (in parentheses) and `note` more
  context, appended after the list.
  """
  want_shapes = want if _is_shape_map(want) else shapes(want)
  got_shapes = got if _is_shape_map(got) else shapes(got)
  problems = shape_problems(want_shapes, got_shapes, got_name=got_name, want_name=want_name)
  if problems:
    raise error(f'{what} does not fit {want_name}'
                f'{f" ({hint})" if hint else ""}: mismatched tensors: {"; ".join(problems)}.{note}')


def _is_shape_map(tree) -> bool:
  return isinstance(tree, Mapping) and all(
      isinstance(v, tuple) and all(isinstance(d, int) for d in v) for v in tree.values())
