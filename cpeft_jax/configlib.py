"""Config helpers: `get_config(arg)` argument strings and ConfigDict -> model objects."""

from __future__ import annotations

from typing import Any

import ml_collections

from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.llama import DecoderConfig


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


def peft_config(config: ml_collections.ConfigDict) -> PeftConfig:
  return PeftConfig.from_dict(config.peft)


def decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
  return DecoderConfig.from_dict(config.model)
