"""One check of a whole config at the boundary, before any work: `check(config)`.

`keys` declares every key (type, range, whether required), `fields` the vocabulary and the walk,
`check` the walk plus the checks between keys, `cli` what the command lines add (flag overrides
of unknown keys, problems printed without a traceback). train.py, evaluate.py, the demo and
`train_and_evaluate` call `check`.
"""

from cpeft_jax.schema.check import ConfigError, check
from cpeft_jax.schema.cli import (apply_mesh_flag, define_mesh_flag, exit_on_config_error,
                                  override_problem, parse_flags)
from cpeft_jax.schema.keys import CONFIG, OPTIM, SCHEDULES

__all__ = ['CONFIG', 'ConfigError', 'OPTIM', 'SCHEDULES', 'apply_mesh_flag', 'check',
           'define_mesh_flag', 'exit_on_config_error', 'override_problem', 'parse_flags']
