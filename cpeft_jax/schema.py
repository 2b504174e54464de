"""One check of a whole config at the boundary, before any work: `check(config)`.

Every key must be known (a misspelled one gets a "did you mean"), every value of its type
(no strings for booleans, no booleans for numbers, no inf or nan), every number in its range,
and the parts must agree: the context ids that the context map, rules and invocations can
produce fit peft.num_contexts, LoRA ranks (per context too) fit the projections they adapt,
a run trains something. All problems are reported at once in one `ConfigError`, each naming
the key, the value and what was expected.

The sections backed by a dataclass (model, connector, quantize, peft, data.augment) take their
keys and types from it, so a new field is known here the day it is added; the dataclass's own
checks then run too. train.py, evaluate.py, the demo and `train_and_evaluate` call `check`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from cpeft_jax import adaptors, configlib, contexts, experiment, quantize, sharding, trainable
from cpeft_jax.data import pipeline, sources
from cpeft_jax.models import connector, decoder_config, patch

DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('constant', 'cosine', 'linear')  # train/state.py's; a test keeps them equal
OPTIM_FIELDS = ('learning_rate', 'b1', 'b2', 'eps', 'weight_decay', 'schedule', 'warmup_steps',
                'total_steps', 'grad_clip_norm')


ConfigError = configlib.ConfigError


# ----------------------------------------------------------------------------- fields


@dataclasses.dataclass(frozen=True)
class Field:
  """One key: `test(value)` is None when the value is good, else what was expected."""
  test: Callable[[Any], str | None]
  required: bool = True


@dataclasses.dataclass(frozen=True)
class Section:
  fields: Mapping[str, Field | Section]
  required: bool = True
  free: bool = False  # keys not listed are allowed (their consumer checks them)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, *, none: bool = False,
            required: bool = True) -> Field:
  want = 'an int' + (f' >= {lo}' if lo is not None else '') + (
      f' and <= {hi}' if hi is not None else '') + (' or None' if none else '')

  def test(v):
    if v is None and none:
      return None
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
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
    if not _is_num(v) or not math.isfinite(v):
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


def _from_annotation(hint) -> Field:
  """A field from a dataclass field's type: int, float, bool, str, X | None, tuples."""
  args = typing.get_args(hint)
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1 and type(None) in args:
      f = _from_annotation(inner[0])
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
  fields = {f.name: _from_annotation(hints[f.name]) for f in dataclasses.fields(cls)}
  fields.update(dict(overrides))
  fields.update(dict(extra))
  return Section(fields, required)


def _seq_of(test: Callable[[Any], bool], what: str, *, nonempty=False,
            required=True) -> Field:
  def check(v):
    if isinstance(v, str) or not isinstance(v, (tuple, list)) or (nonempty and not v):
      return f'a {"non-empty " if nonempty else ""}tuple of {what}'
    if not all(test(x) for x in v):
      return f'a tuple of {what}'
    return None
  return Field(check, required)


def _mesh(v):
  if v is not None:
    sharding.mesh_shape(dict(v), math.prod(n for n in dict(v).values() if _is_int(n) and n > 0))


# ----------------------------------------------------------------------------- the schema

POSITIVE = integer(1)
DROPOUT = number(0.0, 1.0, hi_open=True)

MODEL = dataclass_section(decoder_config.DecoderConfig, {
    'vocab_size': integer(0, required=False),  # 0: the tokenizer's size
    'hidden_size': integer(1, required=False), 'num_layers': integer(1, required=False),
    'num_heads': integer(1, required=False), 'intermediate_size': integer(1, required=False),
    'num_kv_heads': integer(1, none=True, required=False),
    'head_dim': integer(1, none=True, required=False),
    'rope_theta': number(0.0, lo_open=True, required=False),
    'rms_norm_eps': number(0.0, lo_open=True, required=False),
    'layer_norm_eps': number(0.0, lo_open=True, required=False),
    'residual_dropout': number(0.0, 1.0, hi_open=True, required=False),
    'dtype': string(DTYPES, required=False), 'param_dtype': string(DTYPES, required=False),
    'max_positions': integer(1, required=False),
})

CONNECTOR = dataclass_section(connector.ConnectorConfig, {
    'dropout': number(0.0, 1.0, hi_open=True, required=False),
    'mlp_hidden': integer(1, none=True, required=False),
})

QUANTIZE = dataclass_section(quantize.QuantConfig, {
    'block_size': integer(1, required=False)}, required=False)

LORA = dataclass_section(adaptors.LoraConfig, {
    'rank': integer(1, required=False), 'alpha': number(0.0, lo_open=True, required=False),
    'dropout': number(0.0, 1.0, hi_open=True, required=False)}, required=False)

PEFT = dataclass_section(adaptors.PeftConfig, {
    'num_contexts': integer(1, required=False), 'tile': integer(1, required=False),
    'strategy': string(adaptors.LORA_STRATEGIES, required=False),
    'methods': Field(lambda v: None if isinstance(v, str) or (
        isinstance(v, (tuple, list)) and all(isinstance(m, str) for m in v)) else
        f"a tuple of method names among {list(adaptors.METHODS)} or a string like "
        "'lora+bitfit'", required=False),
}, extra={'lora': LORA, 'plugins': Field(lambda v: None, False)})  # plug-ins: load_plugins

AUGMENT = dataclass_section(pipeline.AugmentConfig, {
    'crop_min_scale': number(0.0, 1.0, lo_open=True, required=False),
    # colour jitter draws factors in [1 - x, 1 + x]: above 1 they could turn negative
    'brightness': number(0.0, 1.0, required=False),
    'contrast': number(0.0, 1.0, required=False),
    'saturation': number(0.0, 1.0, required=False),
}, required=False)

DEMO_DATA = Section({
    'image_size': integer(16), 'num_train': POSITIVE, 'num_validation': POSITIVE,
    'num_test': POSITIVE, 'captions_per_image': integer(1, required=False),
    'seed': integer(0, required=False)}, required=False)

DATA = Section({
    'dataset': string(sources.DATASETS), 'data_dir': string(),
    'train_split': string(nonempty=True), 'eval_split': string(nonempty=True),
    'demo': DEMO_DATA, 'seq_len': integer(4),
    'context_map': custom(lambda v: contexts.check_context_map(v, sources.TASKS),
                          "a preset name, a kind map or rules like 'kind=image:1;*:0'"),
    'augment': AUGMENT,
    'tasks': custom(lambda v: _tasks(v), f'distinct task names among {list(sources.TASKS)}',
                    required=False),
    'invocations': custom(lambda v: _invocations(v, None),
                          '{context id: token-id sequence}', required=False),
    'captions_json': string(required=False), 'eval_captions_json': string(required=False),
    'image_dir': string(required=False),
})

VISION_PRETRAIN = Section({
    'epochs': integer(0), 'batch_size': POSITIVE,
    'learning_rate': number(0.0, lo_open=True), 'image_size': integer(8),
    'patch_size': POSITIVE, 'hidden_size': POSITIVE, 'num_layers': POSITIVE,
    'num_heads': POSITIVE, 'intermediate_size': POSITIVE}, required=False)

PRETRAIN = Section({
    'epochs': integer(0), 'batch_size': integer(1, required=False),
    'learning_rate': number(0.0, lo_open=True, required=False),
    'tasks': custom(lambda v: _tasks(v), f'distinct task names among {list(sources.TASKS)}',
                    required=False),
    'vision': VISION_PRETRAIN}, required=False)

VISION = Section({
    'kind': string(('patch', 'hf')), 'image_size': integer(1, required=False),
    'patch_size': integer(1, required=False), 'width': integer(1, required=False),
    'path': string(required=False), 'dtype': string(DTYPES, required=False),
    'feature_layer': integer(required=False), 'drop_cls': boolean(required=False)},
    required=False)

TRAIN = Section({
    'mode': string(tuple(trainable.TRAINABLE)), 'batch_size': POSITIVE, 'epochs': POSITIVE,
    'micro_steps': integer(1, required=False), 'log_every': POSITIVE,
    'checkpoint_every': integer(0),  # 0: at each epoch's end only
    'max_zero_grad_steps': integer(1, required=False),
    'freeze_contexts': _seq_of(lambda c: _is_int(c) and c >= 0, 'context ids (ints >= 0)',
                               required=False),
    'freeze_connector': boolean(required=False), 'export': boolean(required=False),
    'plugins': boolean(required=False)})

EVAL = Section({
    'batch_size': POSITIVE, 'num_captions': integer(0, required=False),
    'num_beams': integer(1, required=False), 'max_new_tokens': integer(0, required=False),
    'length_penalty': number(required=False)})

OPTIM = Section({
    'learning_rate': number(0.0, lo_open=True),
    'b1': number(0.0, 1.0, hi_open=True, required=False),
    'b2': number(0.0, 1.0, hi_open=True, required=False),
    'eps': number(0.0, lo_open=True, required=False),
    'weight_decay': number(0.0, required=False),
    'schedule': string(SCHEDULES, required=False),
    'warmup_steps': integer(0, required=False), 'total_steps': integer(0, required=False),
    'grad_clip_norm': number(0.0, required=False)})

CONFIG = Section({
    'seed': integer(0, 2**31 - 1),
    'variants': custom(lambda v: _variants(v), 'a tuple of distinct context maps among '
                       f'{list(contexts.PRESETS)}, e.g. (\'agnostic\', \'modality\')',
                       required=False),
    'data': DATA, 'tokenizer': string(nonempty=True), 'text_model': string(),
    'pretrain': PRETRAIN, 'vision': VISION, 'vision_model': string(required=False),
    'model': MODEL, 'connector': CONNECTOR, 'quantize': QUANTIZE, 'peft': PEFT,
    'train': TRAIN, 'eval': EVAL, 'optim': OPTIM,
    'mesh': custom(_mesh, 'axis sizes like {"data": -1, "fsdp": 2}', required=False),
    'partition_rules': custom(lambda v: sharding.parse_rules(v), '(regex, axes) pairs',
                              required=False),
    # checkpoint tensors that may be missing from the frozen bases (checkpoints/io.py)
    'partial_load': Field(lambda v: None if isinstance(v, str) or (
        isinstance(v, (tuple, list)) and all(isinstance(p, str) and p for p in v)) else
        "a tuple of fnmatch patterns of checkpoint tensor names, e.g. ('lm_head.weight',)",
        required=False),
})


def _variants(v):
  if isinstance(v, str) or not isinstance(v, (tuple, list)) or not v:
    raise ValueError('not a non-empty tuple')
  if len(set(v)) != len(v):
    raise ValueError('a context map is given twice')
  bad = [x for x in v if x not in contexts.PRESETS]
  if bad:
    raise ValueError(f'{bad} are not presets')


def _tasks(v):
  tasks = pipeline.check_tasks(v)
  unknown = [t for t in tasks if t not in sources.TASKS]
  if unknown:
    raise ValueError(f'unknown tasks {unknown}')


def _invocations(v, num_contexts):
  inv = {int(k) if isinstance(k, str) and k.isdigit() else k: list(s) for k, s in dict(v).items()}
  contexts.check_invocations(inv, num_contexts=num_contexts)


# ----------------------------------------------------------------------------- checking


def _plain(x):
  if isinstance(x, ml_collections.FieldReference):
    return _plain(x.get())
  if isinstance(x, (ml_collections.ConfigDict, Mapping)):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_plain(v) for v in x]
  if isinstance(x, tuple):
    return tuple(_plain(v) for v in x)
  return x


def _walk(section: Section, values, where: str, problems: list[str]) -> None:
  if not isinstance(values, Mapping):
    problems.append(f'{where}={values!r}: expected a dict of {sorted(section.fields)}.')
    return
  for key, value in values.items():
    name = f'{where}.{key}'
    spec = section.fields.get(key)
    if spec is None:
      if section.free:
        continue
      close = difflib.get_close_matches(str(key), list(section.fields), n=1, cutoff=0.6)
      hint = f'; did you mean {where}.{close[0]}?' if close else ''
      problems.append(f'{name} is not a known key{hint} ({where} has '
                      f'{sorted(section.fields)}).')
    elif isinstance(spec, Section):
      _walk(spec, value, name, problems)
    else:
      want = spec.test(value)
      if want is not None:
        problems.append(f'{name}={value!r}: expected {want}.')
  for key, spec in section.fields.items():
    if spec.required and key not in values:
      problems.append(f'{where}.{key} is missing.')


def _build(problems: list[str], where: str, make: Callable[[], Any]):
  """Runs a dataclass's own checks; their error names `where` as well as the field."""
  try:
    return make()
  except (ValueError, TypeError) as e:
    problems.append(f'{where}: {e}')
    return None


def check(config: ml_collections.ConfigDict | Mapping, *, where: str = 'config') -> None:
  """Raises ConfigError listing every problem of `config`; returns None when it can run."""
  c = _plain(config)
  problems: list[str] = []
  _walk(CONFIG, c, where, problems)
  if problems:  # the cross-checks below read values that must first be well-formed
    raise ConfigError(problems)
  _agree(c, where, problems)
  if problems:
    raise ConfigError(problems)


def _agree(c: dict, where: str, problems: list[str]) -> None:
  """Checks between keys: each dataclass's own rules, contexts, ranks, data, training."""
  peft = _build(problems, f'{where}.peft', lambda: adaptors.PeftConfig.from_dict(
      {k: v for k, v in c['peft'].items() if k != 'plugins'}))
  _build(problems, f'{where}.connector', lambda: connector.ConnectorConfig.from_dict(
      c['connector']))
  if 'quantize' in c:
    _build(problems, f'{where}.quantize', lambda: quantize.QuantConfig.from_dict(c['quantize']))
  _build(problems, f'{where}.data.augment', lambda: pipeline.AugmentConfig(
      **c['data'].get('augment', {})))
  data, train = c['data'], c['train']
  if data['dataset'] == 'demo' and 'demo' not in data:
    problems.append(f"{where}.data.demo is missing: data.dataset='demo' needs its sizes.")
  if data['dataset'] == 'folder' and not data.get('captions_json'):
    problems.append(f"{where}.data.captions_json is missing: data.dataset='folder' reads a "
                    'COCO or Karpathy captions JSON.')
  _vision(c, where, problems)
  if c.get('variants') and (c['text_model'] or (c.get('vision') or {}).get('kind') == 'hf'):
    problems.append(f'{where}.variants: the two-variant demo pre-trains its own base models '
                    "(stage 0); it takes neither vision.kind='hf' nor text_model. Give a "
                    'contexts=... argument for a single run on other checkpoints.')
  if train['batch_size'] % train.get('micro_steps', 1):
    problems.append(f'{where}.train.batch_size={train["batch_size"]} is not divisible by '
                    f'train.micro_steps={train.get("micro_steps", 1)}.')
  o = c['optim']
  if (o.get('schedule', 'constant') != 'constant' and o.get('total_steps')
      and o['total_steps'] <= o.get('warmup_steps', 0)):
    problems.append(f'{where}.optim.total_steps={o["total_steps"]}: expected 0 (the run\'s '
                    f'length) or more than optim.warmup_steps={o.get("warmup_steps", 0)}.')
  if peft is not None:
    _contexts(c, peft, where, problems)
    _trains_something(c, peft, where, problems)
    _ranks(c, peft, where, problems)


def _vision(c, where, problems):
  if c.get('vision_model') or c.get('variants'):  # the demo's variants load its stage-0 tower
    return
  v = c.get('vision')
  if v is None:
    problems.append(f'{where}.vision is missing (or give {where}.vision_model).')
    return
  if v['kind'] == 'hf' and not v.get('path'):
    problems.append(f"{where}.vision.path is missing: vision.kind='hf' loads a checkpoint "
                    '(a directory or a hub id).')
  if v['kind'] == 'patch':
    missing = [k for k in ('image_size', 'patch_size', 'width') if k not in v]
    if missing:
      problems.append(f"{where}.vision: kind='patch' needs {missing}.")
      return
    enc = _build(problems, f'{where}.vision', lambda: patch.PatchEncoderConfig(
        v['image_size'], v['patch_size'], v['width']))
    if enc is not None:
      tokens = (v['image_size'] // v['patch_size']) ** 2
      boundary = 2 if c['connector'].get('boundary_tokens') else 0
      if c['data']['seq_len'] < tokens + boundary + 3:
        problems.append(f'{where}.data.seq_len={c["data"]["seq_len"]}: expected room for BOS, '
                        f'{tokens + boundary} image tokens, a caption token and EOS '
                        f'(>= {tokens + boundary + 3}).')


def _contexts(c, peft, where, problems):
  """Context ids that data can produce must have a row: peft.num_contexts (plug-ins add)."""
  C = peft.num_contexts
  plugged = c['peft'].get('plugins')
  if isinstance(plugged, Mapping) and plugged:
    keys = [int(k) for k in plugged if str(k).isdigit()]
    C = max([C] + [k + 1 for k in keys])
  elif isinstance(plugged, (list, tuple)) and plugged:
    C = max(C, len(plugged))
  try:
    produced = contexts.num_contexts(c['data']['context_map'])
  except ValueError as e:
    problems.append(f'{where}.data.context_map: {e}')
    return
  if produced > C and not c.get('variants'):  # the demo sets num_contexts per variant
    problems.append(f'{where}.data.context_map={c["data"]["context_map"]!r} gives tokens context '
                    f'ids up to {produced - 1}, but {where}.peft.num_contexts={C}: expected '
                    f'num_contexts >= {produced} (ids beyond it would get no adaptor).')
  if 'invocations' in c['data']:
    try:
      _invocations(c['data']['invocations'], C)
    except ValueError as e:
      problems.append(f'{where}.data.invocations: {e}')
  frozen = c['train'].get('freeze_contexts') or ()
  bad = sorted(set(frozen) - set(range(C)))
  if bad:
    problems.append(f'{where}.train.freeze_contexts={tuple(frozen)}: contexts {bad} are out of '
                    f'range for peft.num_contexts={C}.')


def _trains_something(c, peft, where, problems):
  mode, train = c['train']['mode'], c['train']
  connector_trains = mode in ('peft', 'connector', 'full') and not train.get('freeze_connector')
  adapted = set(peft.adapted_contexts if peft.adapted_contexts is not None
                else range(peft.num_contexts)) if peft.methods else set()
  adapted -= set(train.get('freeze_contexts') or ())
  if mode == 'connector':
    adapted = set()
  if not connector_trains and not adapted and mode != 'full':
    problems.append(f'{where}.train: this run trains nothing (train.mode={mode!r}, peft.methods='
                    f'{peft.methods}, train.freeze_connector={train.get("freeze_connector")}, '
                    f'train.freeze_contexts={tuple(train.get("freeze_contexts") or ())}).')


def _ranks(c, peft, where, problems):
  """LoRA ranks (each context's too) against the widths, when the config gives the shape."""
  if c['text_model'] or not peft.methods:
    return  # a checkpoint's shape: experiment.build checks once its config.json is read
  model = dict(c['model'])
  model['vocab_size'] = model.get('vocab_size') or 1
  dec = _build(problems, f'{where}.model', lambda: decoder_config.DecoderConfig.from_dict(model))
  if dec is not None:
    _build(problems, f'{where}.peft', lambda: _check_ranks(dec, peft))


@functools.lru_cache(maxsize=64)
def _check_ranks(dec, peft) -> None:  # an eval_shape per new (model, peft) pair, not per check
  experiment.check_lora_rank(dec, peft)


# ----------------------------------------------------------------------------- command lines


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
  """For a command line's main: a ConfigError (from `check` or later) ends the process with its
  problems on stderr and exit status 1, without a traceback."""
  try:
    yield
  except ConfigError as e:
    raise SystemExit(str(e)) from None
