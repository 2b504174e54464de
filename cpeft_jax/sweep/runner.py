"""Runs a grid of cells x seeds: each trains in DIR/cells/<cell>/seed<k> and is evaluated.

A cell is one arg string of the config module's grid (`get_config(arg)`); its name is its
values joined by '_' (`method=lora,rank=8,targets=A,contexts=agnostic` -> `lora_8_A_agnostic`).
Every cell's frozen bases come from `demo.with_bases` (the demo's stage 0 runs once in DIR; the
paper's configured checkpoints load as they are). A cell x seed that left its result JSON is
skipped; one that did not resumes from its last checkpoint (`trainer.train_and_evaluate`).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from cpeft_jax import configlib, demo, runs, schema
from cpeft_jax.evaluation import captioning
from cpeft_jax.evaluation import captions as captions_lib
from cpeft_jax.sweep import report
from cpeft_jax.train import trainer

RESULT = 'sweep_result.json'
CELLS = 'cells'
CACHE = 'jax_cache'
# The paper's adaptors by their method names; LoRA is named with its rank.
METHOD_NAMES = {'ia3': 'IA3', 'bitfit': 'BitFit', 'lora': 'LoRA', 'dora': 'DoRA'}


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str
  arg: str  # the config module's get_config argument of this cell (the grid's own string)


def load_config_module(path: str):
  """The config file at `path` as a module (configs/ is a folder of files, not a package)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config={path}: no such config file.')
  spec = importlib.util.spec_from_file_location(
      'sweep_config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def grid_cells(module, grid: str = 'paper') -> list[Cell]:
  """The cells a config module declares: 'paper' is its `grid()` (the paper's grid), any other
  name its `grid_<name>()`; each returns arg strings."""
  fn_name = 'grid' if grid == 'paper' else f'grid_{grid}'
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    have = sorted(n for n in dir(module) if n == 'grid' or n.startswith('grid_'))
    raise ValueError(f'--grid={grid}: the config {module.__file__} has no {fn_name}() '
                     f'(grid functions it has: {have}; --grid=paper is grid()).')
  return cells_of(fn())


def cells_of(args: Sequence[str]) -> list[Cell]:
  """Cells named by their args' values; two cells of one name are an error."""
  cells, seen = [], {}
  for arg in args:
    values = [item.partition('=')[2] or item for item in arg.split(',') if item.strip()]
    name = '_'.join(v.replace('/', '-').replace(';', '-') for v in values) or 'default'
    if name in seen:
      raise ValueError(f'Grid cells {seen[name]!r} and {arg!r} would share the name {name!r}.')
    seen[name] = arg
    cells.append(Cell(name, arg))
  return cells


def select(cells: list[Cell], patterns: Sequence[str] | None) -> list[Cell]:
  """The cells whose names match any of the fnmatch `patterns` (all cells for none); a pattern
  matching no cell is an error listing the names."""
  if not patterns:
    return cells
  for p in patterns:
    if not any(fnmatch.fnmatchcase(c.name, p) for c in cells):
      raise ValueError(f'--cells pattern {p!r} matches no cell; the grid has '
                       f'{[c.name for c in cells]}.')
  return [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def parse_seeds(text: str) -> list[int]:
  """'0,1' -> [0, 1]: distinct integers >= 0."""
  try:
    seeds = [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds={text!r}: expected distinct integers >= 0, comma separated.')
  return seeds


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Where a cell sits in the paper's tables, read off its config: method (the row), targets
  and contexts ('agnostic' for one adaptor group, else 'specific'), and its encoder (cells of
  different encoders make separate tables)."""
  mode = config.train.mode
  encoder = config.vision.get('path') or config.vision.kind
  if mode != 'peft':
    return {'method': report.PROJECTION_ONLY if mode == 'connector' else report.FULL, 'targets': '',
            'contexts': '', 'encoder': encoder}
  names = []
  for m in config.peft.methods:
    name = METHOD_NAMES.get(m, m)
    names.append(f'{name} r={config.peft.lora.rank}' if m in ('lora', 'dora') else name)
  targets = config.peft.targets
  return {'method': '+'.join(names),
          'targets': targets if isinstance(targets, str) else ','.join(targets),
          'contexts': 'agnostic' if config.peft.num_contexts == 1 else 'specific',
          'encoder': encoder}


def cell_dir(workdir: str, cell: Cell, seed: int) -> str:
  return os.path.join(workdir, CELLS, cell.name, f'seed{seed}')


def trainable_params(run_dir: str) -> int:
  """Parameters of the run's best trainable tree, from its checkpoint's metadata."""
  tree = runs.saved_tree(runs.find_checkpoint(run_dir, 'best').path)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def run_cell(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  """Trains (or resumes) one cell x seed, then evaluates its best weights on the validation
  split: perplexity and captions scored with the COCO metrics."""
  start = time.time()
  out = trainer.train_and_evaluate(config, run_dir)
  trained = time.time() - start
  m = captioning.evaluate_workdir(config, run_dir, checkpoint='best', show=0)
  split = m['splits'][config.data.eval_split]
  return {'val_ppl': split['perplexity'], 'val_loss': split['loss'],
          'best_val_ppl': out['val_ppl'], 'steps': out['steps'],
          'trainable_params': trainable_params(run_dir),
          'metrics': {k: split[k] for k in captions_lib.METRICS if k in split},
          'train_seconds': trained, 'seconds': time.time() - start}


def enable_compile_cache(workdir: str) -> str:
  """JAX's persistent compilation cache in DIR/jax_cache: a cell's later seeds (and cells of
  equal shapes) load their compiled steps instead of compiling them again."""
  path = os.path.join(workdir, CACHE)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return path


def run(get_config: Callable[[str], ml_collections.ConfigDict], cells: Sequence[Cell],
        seeds: Sequence[int], workdir: str, *, command: str = '') -> list[dict]:
  """Every cell x seed in order; returns their results (finished ones read back) and rewrites
  DIR/RESULTS.md after each (`command` heads it)."""
  started = time.time()
  configs = {c.name: get_config(c.arg) for c in cells}
  for name, config in configs.items():  # every cell's config, before any work
    try:
      schema.check(config)
    except configlib.ConfigError as e:
      raise configlib.ConfigError([f'grid cell {name}: {p}' for p in e.problems]) from None
  os.makedirs(workdir, exist_ok=True)
  results = _finished(cells, seeds, workdir)
  order = {c.name: i for i, c in enumerate(cells)}

  def write_results():
    if jax.process_index() == 0:
      report.write(os.path.join(workdir, report.RESULTS), results, command=command,
                   wall_seconds=time.time() - started, runs_total=len(cells) * len(seeds))

  for cell in cells:
    for seed in seeds:
      path = os.path.join(cell_dir(workdir, cell, seed), RESULT)
      if os.path.exists(path):
        continue
      c = copy.deepcopy(demo.with_bases(configs[cell.name], workdir))  # stage 0 runs once
      c.seed = seed
      print(f'sweep: cell {cell.name} ({cell.arg}), seed {seed}', flush=True)
      result = {'cell': cell.name, 'arg': cell.arg, 'seed': seed, **describe(c),
                **run_cell(c, os.path.dirname(path))}
      if jax.process_index() == 0:
        with open(path, 'w') as f:
          json.dump(result, f, indent=2)
      results.append(result)
      results.sort(key=lambda r: (order[r['cell']], r['seed']))
      write_results()
  write_results()
  return results


def _finished(cells, seeds, workdir) -> list[dict]:
  out = []
  for cell in cells:
    for seed in seeds:
      path = os.path.join(cell_dir(workdir, cell, seed), RESULT)
      if os.path.exists(path):
        with open(path) as f:
          out.append(json.load(f))
  return out
