"""The config check at the boundary (cpeft_jax/schema.py): every bad value a clear error.

The fuzz test states each key's domain here, apart from the schema (a bad value generator per
key), draws configs with one to three bad values or misspelled keys with hypothesis, and asserts
that `schema.check` (what train.py, evaluate.py and the demo call first) raises a ConfigError
naming every bad key, never another exception and never nothing.
"""

import math
import subprocess
import sys

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from configs import demo, demo_vqa, paper
from cpeft_jax import experiment, schema

ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]


def single():
  """The demo's single-run config as plain dicts, so that any value can be put anywhere (a
  config file can hold any value; a ConfigDict refuses a type change after creation)."""
  return demo.get_config('contexts=modality').to_dict()


def _set(config, key, value):
  *parents, last = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[last] = value


def _errors(config):
  with pytest.raises(schema.ConfigError) as e:
    schema.check(config)
  return str(e.value)


@pytest.mark.parametrize('get', [
    lambda: demo.get_config(), lambda: demo.get_config('contexts=agnostic,method=ia3'),
    lambda: demo.get_config('specs=lora+bitfit:rank=8;lora:rank=32'),
    lambda: demo.get_config('method=none'), lambda: demo.get_config('mode=full'),
    lambda: demo_vqa.get_config(), lambda: paper.get_config(),
    lambda: paper.get_config('method=ia3,contexts=agnostic,targets=A'),
])
def test_shipped_configs_pass(get):
  schema.check(get())


# The nonsense that the first tries found accepted in silence or ending in a traceback.
@pytest.mark.parametrize('key, value, expect', [
    ('train.log_every', 0, 'config.train.log_every=0: expected an int >= 1'),
    ('data.seq_len', -1, 'config.data.seq_len=-1'),
    ('seed', -1, 'config.seed=-1'),
    ('data.augment.brightness', -1.0, 'config.data.augment.brightness=-1.0'),
    ('optim.b1', 1.5, 'config.optim.b1=1.5: expected a finite number >= 0.0 and < 1.0'),
    ('optim.eps', -1e-8, 'config.optim.eps=-1e-08'),
    ('optim.learning_rate', math.inf, 'config.optim.learning_rate=inf'),
    ('train.export', 'no', "config.train.export='no': expected True or False"),
    ('model.remat', 'False', "config.model.remat='False': expected True or False"),
    ('train.batch_size', True, 'config.train.batch_size=True: expected an int >= 1'),
    ('train.epochs', 2.0, 'config.train.epochs=2.0'),
    ('peft.num_contexts', 1, 'gives tokens context ids up to 1'),
    ('data.context_map', 'kind=image:7;*:0', 'gives tokens context ids up to 7'),
    ('peft.lora.rank', 999, 'peft.lora.rank=999 is larger than the adapted projection'),
    ('train.freeze_contexts', (5,), 'contexts [5] are out of range'),
    ('train.micro_steps', 5, 'not divisible by train.micro_steps=5'),
    ('data.seq_len', 12, 'expected room for BOS, 16 image tokens'),
    ('vision.patch_size', 7, 'not a multiple of patch_size=7'),
    ('mesh', {'data': 0}, 'config.mesh'),
    ('quantize.format', 'int3', "quantize.format='int3'"),
])
def test_bad_values_name_the_key_value_and_expectation(key, value, expect):
  config = single()
  _set(config, key, value)
  assert expect in _errors(config)


def test_per_context_rank_against_width():
  config = demo.get_config('contexts=modality,specs=lora:rank=8;lora:rank=999').to_dict()
  assert 'peft.contexts[1].rank=999 is larger than' in _errors(config)


@pytest.mark.parametrize('section, typo, meant', [
    ('train', 'lerning_rate', None), ('train', 'epoch', 'epochs'),
    ('data', 'seq_length', 'seq_len'), ('eval', 'batchsize', 'batch_size'),
    ('vision', 'patchsize', 'patch_size'), ('optim', 'warmup', 'warmup_steps'),
])
def test_misspelled_keys_in_a_config_file(section, typo, meant):
  config = single()
  config[section][typo] = 1
  text = _errors(config)
  assert f'config.{section}.{typo} is not a known key' in text
  if meant:
    assert f'did you mean config.{section}.{meant}?' in text


def test_a_run_that_trains_nothing():
  config = demo.get_config('contexts=modality,method=none').to_dict()
  _set(config, 'train.freeze_connector', True)
  assert 'this run trains nothing' in _errors(config)


def test_every_problem_at_once():
  config = single()
  _set(config, 'train.log_every', 0)
  _set(config, 'optim.b2', 2.0)
  config['eval']['beams'] = 4
  e = pytest.raises(schema.ConfigError, schema.check, config).value
  assert len(e.problems) == 3 and str(e).startswith('3 config errors')


def test_optim_schedules_and_fields_match_the_optimizer():
  from cpeft_jax.train import state
  import dataclasses
  assert schema.SCHEDULES == state.SCHEDULES
  assert set(schema.OPTIM.fields) == {f.name for f in dataclasses.fields(state.OptimConfig)}


def test_out_of_range_context_ids_in_a_batch_are_an_error():
  experiment.check_context_ids(np.array([[0, 1, 1]]), 2)
  with pytest.raises(ValueError, match=r'context ids \[2\], outside \[0, 2\)'):
    experiment.check_context_ids(np.array([[0, 1, 2]]), 2)


@pytest.mark.parametrize('flag, expect', [
    ('--config.train.lerning_rate=1', "config.train has no key 'lerning_rate'"),
    ('--config.trian.epochs=1', "Did you mean config.train?"),
    ('--config.optim.b1=1.5', 'config.optim.b1=1.5: expected a finite number'),
])
def test_command_line_errors_without_a_traceback(tmp_path, flag, expect):
  out = subprocess.run([sys.executable, 'train.py', '--config=configs/demo.py:contexts=modality',
                        flag, f'--workdir={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1 and expect in out.stderr and 'Traceback' not in out.stderr, (
      out.stderr[-2000:])
  assert not any(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- fuzzing

NOT_NUMBERS = st.sampled_from(['', '1', 'abc', None, True, False, [1], {'a': 1}])
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def ints_below(lo):
  return st.one_of(st.integers(max_value=lo - 1), st.integers().map(lambda i: i + 0.5),
                   NOT_NUMBERS, NON_FINITE)


def floats_outside(lo, hi, *, lo_open=False, hi_open=False):
  below = st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False,
                    allow_infinity=False) if lo is not None else st.nothing()
  above = st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False,
                    allow_infinity=False) if hi is not None else st.nothing()
  return st.one_of(below, above, NON_FINITE, NOT_NUMBERS.filter(lambda v: v is not None))


NOT_BOOLS = st.sampled_from(['True', 'false', 'yes', '', 0, 1, None, 1.0, [True]])


def not_one_of(choices):
  return st.one_of(st.text(max_size=8).filter(lambda s: s not in choices),
                   st.sampled_from([None, 0, 1.5, True, ['linear']]))


# The domain of each key, stated here (not read from the schema): what is nonsense for it.
BAD = {
    'seed': ints_below(0),
    'train.batch_size': ints_below(1), 'train.epochs': ints_below(1),
    'train.micro_steps': ints_below(1), 'train.log_every': ints_below(1),
    'train.checkpoint_every': ints_below(0),  # 0: at epoch ends only 'train.max_zero_grad_steps': ints_below(1),
    'train.mode': not_one_of(('peft', 'connector', 'full')),
    'train.export': NOT_BOOLS, 'train.freeze_connector': NOT_BOOLS,
    'eval.batch_size': ints_below(1), 'eval.num_captions': ints_below(0),
    'eval.num_beams': ints_below(1), 'eval.max_new_tokens': ints_below(0),
    'optim.learning_rate': floats_outside(0.0, None, lo_open=False),
    'optim.b1': floats_outside(0.0, 1.0), 'optim.b2': floats_outside(0.0, 1.0),
    'optim.eps': floats_outside(0.0, None), 'optim.weight_decay': floats_outside(None, None)
    .filter(lambda v: not isinstance(v, float) or not math.isfinite(v)),
    'optim.schedule': not_one_of(('constant', 'cosine', 'linear')),
    'optim.warmup_steps': ints_below(0), 'optim.total_steps': ints_below(0),
    'optim.grad_clip_norm': st.one_of(st.floats(max_value=-1e-9, allow_infinity=False),
                                      NON_FINITE, NOT_NUMBERS),
    'data.seq_len': ints_below(4), 'data.dataset': not_one_of(('demo', 'coco_captions', 'folder')),
    'data.train_split': st.sampled_from(['', '  ', None, 3, True]),
    'data.context_map': st.sampled_from(['modal', '', 'kind=image:x', 'kind=pixels:1;*:0', 3,
                                         None, 'task=vqa:1;*:0', 'kind=image:9;*:0']),
    'data.augment.flip': NOT_BOOLS,
    'data.augment.crop_min_scale': floats_outside(0.0, 1.0, lo_open=False, hi_open=True),
    'data.augment.brightness': floats_outside(0.0, 1.0),
    'data.augment.contrast': floats_outside(0.0, 1.0),
    'data.augment.saturation': floats_outside(0.0, 1.0),
    'data.demo.num_train': ints_below(1), 'data.demo.image_size': ints_below(16),
    'model.hidden_size': ints_below(1), 'model.num_layers': ints_below(1),
    'model.num_heads': ints_below(1), 'model.intermediate_size': ints_below(1),
    'model.vocab_size': ints_below(0),
    'model.residual_dropout': floats_outside(0.0, 1.0),
    'model.rope_theta': floats_outside(0.0, None, lo_open=False),
    'model.dtype': not_one_of(('float32', 'bfloat16', 'float16')), 'model.remat': NOT_BOOLS,
    'connector.kind': not_one_of(('linear', 'mlp')), 'connector.dropout': floats_outside(0.0, 1.0),
    'connector.pre_norm': NOT_BOOLS, 'connector.boundary_tokens': NOT_BOOLS,
    'vision.kind': not_one_of(('patch', 'hf')), 'vision.width': ints_below(1),
    'vision.image_size': ints_below(1), 'vision.patch_size': ints_below(1),
    'peft.num_contexts': ints_below(1), 'peft.lora.rank': ints_below(1),
    'peft.lora.alpha': floats_outside(0.0, None, lo_open=False),
    'peft.lora.dropout': floats_outside(0.0, 1.0),
    'peft.methods': st.sampled_from([('lora9',), ('lora', 'lora'), ('lora', 'dora'), 'x', 3]),
    'peft.strategy': not_one_of(('auto', 'onehot', 'grouped', 'ragged')),
    'quantize.format': not_one_of(('', 'int8', 'int4', 'nf4')),
    'quantize.block_size': ints_below(1),
    'partial_load': st.sampled_from([3, None, True, [1], ('lm_head.weight', 2), ('',)]),
    'pretrain.epochs': ints_below(0), 'pretrain.vision.epochs': ints_below(0),
    'pretrain.vision.learning_rate': floats_outside(0.0, None, lo_open=False),
}


def _typo(draw, config):
  section = draw(st.sampled_from(['train', 'data', 'eval', 'vision', 'optim', 'model', 'peft',
                                  'connector', None]))
  keys = list((config[section] if section else config).keys())
  key = draw(st.sampled_from(keys))
  i = draw(st.integers(0, len(key)))
  typo = draw(st.sampled_from([key[:i] + key[i + 1:], key[:i] + 'x' + key[i:], key + '_',
                               key.upper()]))
  hypothesis.assume(typo and typo not in keys and typo not in schema.CONFIG.fields.get(
      section, schema.CONFIG).fields if section else typo not in schema.CONFIG.fields)
  return (f'{section}.{typo}' if section else typo), 1


@st.composite
def broken_configs(draw):
  config = single()
  picks = draw(st.lists(st.one_of(st.sampled_from(sorted(BAD)), st.just('typo')), min_size=1,
                        max_size=3, unique=True))
  changed = []
  for pick in picks:
    key, value = _typo(draw, config) if pick == 'typo' else (pick, draw(BAD[pick]))
    _set(config, key, value)
    changed.append(key)
  return config, changed


@hypothesis.settings(max_examples=1000, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(broken_configs())
def test_fuzz_every_generated_nonsense_is_a_clear_error(case):
  config, changed = case
  try:
    schema.check(config)
  except schema.ConfigError as e:
    text = str(e)
  else:
    raise AssertionError(f'accepted in silence: {changed}')
  # Each bad key is named; with several, a cross-check (e.g. context ids against num_contexts)
  # waits until every value is well-formed, so one at least.
  named = [k for k in changed if f'config.{k}' in text or k.split('.')[-1] in text]
  assert named == changed if len(changed) == 1 else named, (changed, text)
