"""The vocabulary of the config schema: typed fields, sections and the walk that checks them.

A `Field` tests one value and says what it expected; a `Section` is a dict of fields and
sections. `walk` reports unknown keys (with a "did you mean"), missing required keys and values
their field refuses, each naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from cpeft_jax.configlib import is_int, is_number


@dataclasses.dataclass(frozen=True)
class Field:
  """One key: `test(value)` is None when the value is good, else what was expected."""
  test: Callable[[Any], str | None]
  required: bool = True


@dataclasses.dataclass(frozen=True)
class Section:
  fields: Mapping[str, Field | Section]
  required: bool = True


def integer(lo: int | None = None, hi: int | None = None, *, none: bool = False,
            required: bool = True) -> Field:
  want = 'an int' + (f' >= {lo}' if lo is not None else '') + (
      f' and <= {hi}' if hi is not None else '') + (' or None' if none else '')

  def test(v):
    if v is None and none:
      return None
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
      return want
    return None
  return Field(test, required)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, none: bool = False, required: bool = True) -> Field:
  parts = []
  if lo is not None:
    parts.append(f'{">" if lo_open else ">="} {lo}')
  if hi is not None:
    parts.append(f'{"<" if hi_open else "<="} {hi}')
  want = 'a finite number' + (' ' + ' and '.join(parts) if parts else '') + (
      ' or None' if none else '')

  def test(v):
    if v is None and none:
      return None
    if not is_number(v) or not math.isfinite(v):
      return want
    if lo is not None and (v <= lo if lo_open else v < lo):
      return want
    if hi is not None and (v >= hi if hi_open else v > hi):
      return want
    return None
  return Field(test, required)


def boolean(*, none: bool = False, required: bool = True) -> Field:
  return Field(lambda v: None if isinstance(v, bool) or (v is None and none) else
               'True or False' + (' or None' if none else ''), required)


def string(choices: Sequence[str] | None = None, *, nonempty: bool = False,
           required: bool = True) -> Field:
  if choices is not None:
    want = f'one of {list(choices)}'
  else:
    want = 'a non-empty string' if nonempty else 'a string'

  def test(v):
    if not isinstance(v, str) or (choices is not None and v not in choices) or (
        nonempty and not v.strip()):
      return want
    return None
  return Field(test, required)


def custom(check: Callable[[Any], None], want: str, *, required: bool = True) -> Field:
  """A value checked by `check` (raising ValueError/TypeError); `want` says what it expects."""
  def test(v):
    try:
      check(v)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      return f'{want} ({e})'
    return None
  return Field(test, required)


def from_annotation(hint) -> Field:
  """A field from a dataclass field's type: int, float, bool, str, X | None, tuples."""
  args = typing.get_args(hint)
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1 and type(None) in args:
      f = from_annotation(inner[0])
      return Field(lambda v: None if v is None else (
          None if f.test(v) is None else f.test(v) + ' or None'), False)
  if hint is bool:
    return boolean(required=False)
  if hint is int:
    return integer(required=False)
  if hint is float:
    return number(required=False)
  if hint is str:
    return string(required=False)
  return Field(lambda v: None, False)  # structured fields: the dataclass checks them


def dataclass_section(cls, overrides: Mapping[str, Field] = (), *, extra=(),
                      required: bool = True) -> Section:
  hints = typing.get_type_hints(cls)
  fields = {f.name: from_annotation(hints[f.name]) for f in dataclasses.fields(cls)}
  fields.update(dict(overrides))
  fields.update(dict(extra))
  return Section(fields, required)


def seq_of(test: Callable[[Any], bool], what: str, *, nonempty=False,
           required=True) -> Field:
  def check(v):
    if isinstance(v, str) or not isinstance(v, (tuple, list)) or (nonempty and not v):
      return f'a {"non-empty " if nonempty else ""}tuple of {what}'
    if not all(test(x) for x in v):
      return f'a tuple of {what}'
    return None
  return Field(check, required)


def plain(x):
  if isinstance(x, ml_collections.FieldReference):
    return plain(x.get())
  if isinstance(x, (ml_collections.ConfigDict, Mapping)):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, list):
    return [plain(v) for v in x]
  if isinstance(x, tuple):
    return tuple(plain(v) for v in x)
  return x


def walk(section: Section, values, where: str, problems: list[str]) -> None:
  if not isinstance(values, Mapping):
    problems.append(f'{where}={values!r}: expected a dict of {sorted(section.fields)}.')
    return
  for key, value in values.items():
    name = f'{where}.{key}'
    spec = section.fields.get(key)
    if spec is None:
      close = difflib.get_close_matches(str(key), list(section.fields), n=1, cutoff=0.6)
      hint = f'; did you mean {where}.{close[0]}?' if close else ''
      problems.append(f'{name} is not a known key{hint} ({where} has '
                      f'{sorted(section.fields)}).')
    elif isinstance(spec, Section):
      walk(spec, value, name, problems)
    else:
      want = spec.test(value)
      if want is not None:
        problems.append(f'{name}={value!r}: expected {want}.')
  for key, spec in section.fields.items():
    if spec.required and key not in values:
      problems.append(f'{where}.{key} is missing.')
