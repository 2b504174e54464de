"""The config check on a command line: flag overrides of unknown keys, no tracebacks."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Sequence

from absl import app, flags

from cpeft_jax import configlib, sharding
from cpeft_jax.schema.fields import Section
from cpeft_jax.schema.keys import CONFIG


def override_problem(key: str) -> str:
  """Why `--config.<key>=...` cannot be applied to a config that lacks the key."""
  spec, where = CONFIG, 'config'
  for part in key.split('.'):
    if not isinstance(spec, Section) or part not in spec.fields:
      known = sorted(spec.fields) if isinstance(spec, Section) else []
      close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
      hint = f' Did you mean {where}.{close[0]}?' if close else ''
      return f'--config.{key}: {where} has no key {part!r}.{hint} It has {known}.'
    where, spec = f'{where}.{part}', spec.fields[part]
  return (f'--config.{key}: config.{key} is a known key, but this config file does not set '
          'it, so a flag cannot override it; set it in the config file.')


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing for train.py and evaluate.py (`app.run(main, flags_parser=...)`):
  an override of a key the config lacks is a usage error naming the key, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    for arg in argv[1:]:
      if arg.startswith('--config.'):
        key = arg[len('--config.'):].partition('=')[0]
        problem = override_problem(key)
        if any(part in str(e) for part in key.split('.')):
          raise SystemExit(f'FATAL Flags parsing error: {problem}') from None
    raise SystemExit(f'FATAL Flags parsing error: {e}') from None


@contextlib.contextmanager
def exit_on_config_error():
  """For a command line's main: a ConfigError (from `check` or later) ends the process with
  its problems on stderr and exit status 1, without a traceback."""
  try:
    yield
  except configlib.ConfigError as e:
    raise SystemExit(str(e)) from None


def define_mesh_flag() -> None:
  """--mesh, which both CLIs take (train.py, evaluate.py)."""
  flags.DEFINE_string('mesh', None, 'Device mesh, e.g. data=2,fsdp=2,tensor=2 (-1: the '
                      'remaining devices); sets config.mesh. Default: config.mesh, else data=-1 '
                      '(all devices).')


def apply_mesh_flag(config) -> None:
  """config.mesh from --mesh when given; a bad value is a usage error naming it."""
  if not flags.FLAGS.mesh:
    return
  try:
    mesh = sharding.parse_mesh(flags.FLAGS.mesh)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  with config.unlocked():
    config.mesh = mesh
