"""Trains and evaluates every cell of a config's grid over seeds, and tabulates them.

    python -m cpeft_jax.sweep --config=configs/demo.py[:args] --grid=paper --seeds=0,1 \
        --workdir=DIR [--cells=PATTERN,...] [--nocompile_cache]

--config: a config file with `get_config(arg)` and a grid function; `:args` are prepended to
every cell's arg string (e.g. `configs/demo.py:epochs=1`). --grid=paper runs its `grid()`
(other names: `grid_<name>()`). --cells keeps the cells whose names match an fnmatch pattern
(a cell's name is its arg values joined by '_', e.g. lora_8_AF_modality). Each cell x seed
trains in DIR/cells/<cell>/seed<k> and leaves sweep_result.json; a rerun skips finished ones
and resumes an interrupted one. DIR/RESULTS.md is rewritten after every run.
"""

import os
import shlex
import sys
import time

from absl import app, flags, logging

from cpeft_jax import xla_flags

# Before anything starts JAX; as a command, restarted first with glibc's malloc tunables.
xla_flags.set_training_defaults(restart=__name__ == '__main__')

from cpeft_jax import schema  # noqa: E402
from cpeft_jax.sweep import report, runner  # noqa: E402

flags.DEFINE_string('config', 'configs/demo.py', 'Config file[:args]; args go before each '
                    "cell's own.")
flags.DEFINE_string('grid', 'paper', "The config's grid: paper = grid(), NAME = grid_NAME().")
flags.DEFINE_string('seeds', '0', 'Seeds, comma separated (config.seed of each run).')
flags.DEFINE_string('workdir', None, 'Directory of the sweep.', required=True)
flags.DEFINE_list('cells', None, 'Only cells whose names match one of these fnmatch patterns.')
flags.DEFINE_bool('compile_cache', True, "JAX's persistent compilation cache in DIR/jax_cache.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  started = time.time()
  path, _, base = FLAGS.config.partition(':')
  try:
    module = runner.load_config_module(path)
    cells = runner.select(runner.grid_cells(module, FLAGS.grid), FLAGS.cells)
    seeds = runner.parse_seeds(FLAGS.seeds)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.compile_cache:
    runner.enable_compile_cache(FLAGS.workdir)
  command = shlex.join(['python', '-m', 'cpeft_jax.sweep', *sys.argv[1:]])
  with schema.exit_on_config_error():
    results = runner.run(lambda arg: module.get_config(','.join(filter(None, (base, arg)))),
                         cells, seeds, FLAGS.workdir, command=command)
  print(f'{len(results)} of {len(cells) * len(seeds)} runs finished in '
        f'{(time.time() - started) / 60:.1f} min; wrote '
        f'{os.path.join(FLAGS.workdir, report.RESULTS)}')


if __name__ == '__main__':
  app.run(main)
