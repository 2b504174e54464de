"""Config helpers: `get_config(arg)` argument strings, and dicts -> config dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config that cannot run; `problems` lists each as 'key=value: expected ...'.

  Raised by `schema.check` before any work, and by the few checks that need what the config
  builds (a schedule against the run's length, a rank against a checkpoint's widths); the
  command lines print it without a traceback.
  """

  def __init__(self, problems: str | Sequence[str]):
    self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
    head = 'Config error' if len(self.problems) == 1 else f'{len(self.problems)} config errors'
    super().__init__(head + ':\n  ' + '\n  '.join(self.problems))


def is_int(v) -> bool:
  """An int, not a bool (which Python counts as one)."""
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
  """An int or a float, not a bool."""
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' (big_vision style) over typed defaults.

  A bare word 'key' sets a boolean default to True. Unknown keys and values that do not
  convert to the default's type are errors naming the key.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    key, eq, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; expected some of '
                       f'{sorted(defaults)}.')
    kind = type(defaults[key])
    if not eq:
      if kind is not bool:
        raise ValueError(f'Config argument {key!r} needs a value ({key}=...).')
      out[key] = True
    elif kind is bool:
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config argument {key}={value!r}: expected true or false.')
      out[key] = value.lower() in ('true', '1')
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f'Config argument {key}={value!r}: expected {kind.__name__}.') from None
  return ml_collections.ConfigDict(out)


def context_specs(text: str) -> tuple[dict[str, Any], ...]:
  """Parses per-context specs 'lora:rank=64:alpha=32;lora+bitfit:rank=8;none' for peft.contexts.

  Contexts are separated by ';', a context's methods come first and its fields follow after
  ':', so the string fits inside a `get_config` argument (which splits on ','). Field types
  follow `adaptors.ContextSpec`; errors name the context and the field.
  """
  types = {'rank': int, 'alpha': float, 'rslora': bool, 'init': str, 'dropout': float}
  out = []
  for c, item in enumerate(s.strip() for s in text.split(';')):
    methods, *fields = item.split(':')
    spec: dict[str, Any] = {'methods': methods.strip()}
    for field in fields:
      key, eq, value = (p.strip() for p in field.partition('='))
      if key not in types or not eq:
        raise ValueError(f'Context spec for context {c} ({item!r}): field {key!r} must be one '
                         f'of {sorted(types)} as key=value.')
      try:
        if types[key] is bool:
          if value.lower() not in ('true', 'false', '1', '0'):
            raise ValueError
          spec[key] = value.lower() in ('true', '1')
        else:
          spec[key] = types[key](value)
      except ValueError:
        raise ValueError(f'Context spec for context {c} ({item!r}): {key}={value!r} is not '
                         f'a {types[key].__name__}.') from None
    out.append(spec)
  return tuple(out)


def config_from_dict(cls, d, where: str):
  """Builds config dataclass `cls` from a dict or ConfigDict; unknown keys name `where`."""
  if isinstance(d, cls):
    return d
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} in {where}; expected some of {sorted(names)}.')
  for k, v in d.items():
    if isinstance(v, list):
      d[k] = tuple(v)
  return cls(**d)
