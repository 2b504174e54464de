"""`check(config)`: the whole config at the boundary, before any work.

Every key known, typed and in range (`keys.CONFIG`, walked by `fields.walk`); then the parts
must agree: each dataclass's own rules, the context ids that the context map, rules and
invocations can produce against peft.num_contexts, LoRA ranks (per context too) against the
projections they adapt, a run that trains something. All problems are reported at once in one
`ConfigError`, each naming the key, the value and what was expected.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from cpeft_jax import adaptors, configlib, contexts, experiment, quantize
from cpeft_jax.data import pipeline
from cpeft_jax.models import connector, decoder_config, patch
from cpeft_jax.schema import keys
from cpeft_jax.schema.fields import plain, walk

ConfigError = configlib.ConfigError


def _build(problems: list[str], where: str, make: Callable[[], Any]):
  """Runs a dataclass's own checks; their error names `where` as well as the field."""
  try:
    return make()
  except (ValueError, TypeError) as e:
    problems.append(f'{where}: {e}')
    return None


def check(config: ml_collections.ConfigDict | Mapping, *, where: str = 'config') -> None:
  """Raises ConfigError listing every problem of `config`; returns None when it can run."""
  c = plain(config)
  problems: list[str] = []
  walk(keys.CONFIG, c, where, problems)
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
  C = max([peft.num_contexts] + [k + 1 for k in experiment.plugin_dirs(
      c['peft'].get('plugins'))])
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
      keys.check_invocations(c['data']['invocations'], C)
    except ValueError as e:
      problems.append(f'{where}.data.invocations: {e}')
  frozen = c['train'].get('freeze_contexts') or ()
  bad = sorted(set(frozen) - set(range(C)))
  if bad:
    problems.append(f'{where}.train.freeze_contexts={tuple(frozen)}: contexts {bad} are out of '
                    f'range for peft.num_contexts={C}.')


def _trains_something(c, peft, where, problems):
  mode, train = c['train']['mode'], c['train']
  connector_trains = not train.get('freeze_connector')  # every mode trains it unless frozen
  adapted = set(peft.rows) if peft.methods and mode != 'connector' else set()
  adapted -= set(train.get('freeze_contexts') or ())
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
