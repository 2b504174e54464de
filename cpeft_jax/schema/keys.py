"""The schema of a config: every key, its type and range (`CONFIG`).

The sections backed by a dataclass (model, connector, quantize, peft, peft.lora, data.augment)
take their keys and types from it, so a new field is known here the day it is added.
"""

from __future__ import annotations

import math

from cpeft_jax import adaptors, contexts, experiment, quantize, sharding, trainable
from cpeft_jax import invocations as invocations_lib
from cpeft_jax.checkpoints import io
from cpeft_jax.configlib import is_int
from cpeft_jax.data import pipeline, sources
from cpeft_jax.models import connector, decoder_config
from cpeft_jax.schema.fields import (Field, Section, boolean, custom, dataclass_section, integer,
                                     number, seq_of, string)

DTYPES = ('float32', 'bfloat16', 'float16')
SCHEDULES = ('constant', 'cosine', 'linear')  # train/state.py's; a test keeps them equal


def check_mesh(v):
  if v is not None:
    sharding.mesh_shape(dict(v), math.prod(n for n in dict(v).values() if is_int(n) and n > 0))


POSITIVE = integer(1)

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
}, extra={'lora': LORA, 'plugins': custom(experiment.plugin_dirs, '{context id: directory} or '
                                           'a list of directories', required=False)})

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
    'tasks': custom(lambda v: check_tasks(v), f'distinct task names among {list(sources.TASKS)}',
                    required=False),
    'embeddings': string(required=False),
    'invocations': custom(lambda v: check_invocations(v, None),
                          '{context id: token-id sequence}', required=False),
    'captions_json': string(required=False), 'eval_captions_json': string(required=False),
    'image_dir': string(required=False),
    # dataset='folder', Karpathy layout: 'restval' images join the train split
    'restval': boolean(required=False),
    # processes building batches (pipeline.CaptionBatches); 0: a thread, the same batches
    'workers': integer(0, required=False),
})

VISION_PRETRAIN = Section({
    'epochs': integer(0), 'batch_size': POSITIVE,
    'learning_rate': number(0.0, lo_open=True), 'image_size': integer(8),
    'patch_size': POSITIVE, 'hidden_size': POSITIVE, 'num_layers': POSITIVE,
    'num_heads': POSITIVE, 'intermediate_size': POSITIVE,
    'extra_scenes': integer(0, required=False)}, required=False)

PRETRAIN = Section({
    'epochs': integer(0), 'batch_size': integer(1, required=False),
    'learning_rate': number(0.0, lo_open=True, required=False),
    'tasks': custom(lambda v: check_tasks(v), f'distinct task names among {list(sources.TASKS)}',
                    required=False),
    'embeddings': string(required=False),
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
    'freeze_contexts': seq_of(lambda c: is_int(c) and c >= 0, 'context ids (ints >= 0)',
                               required=False),
    'freeze_connector': boolean(required=False), 'export': boolean(required=False),
    'plugins': boolean(required=False),
    # mode='full': the decoder's input embedding table trains too (default: frozen, the paper's)
    'full_embeddings': boolean(required=False),
    # per-token adaptor dropout on the context mask (the authors' adaptor_dropout; 0: off)
    'adaptor_dropout': number(0.0, 1.0, hi_open=True, required=False)})

EVAL = Section({
    'batch_size': POSITIVE, 'num_captions': integer(0, required=False),
    'num_beams': integer(1, required=False), 'max_new_tokens': integer(0, required=False),
    'length_penalty': number(required=False),
    # validation perplexity over every reference caption of each image (default: the first)
    'all_references': boolean(required=False)})

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
    'variants': custom(lambda v: check_variants(v), 'a tuple of distinct context maps among '
                       f'{list(contexts.PRESETS)}, e.g. (\'agnostic\', \'modality\')',
                       required=False),
    'data': DATA, 'tokenizer': string(nonempty=True), 'text_model': string(),
    'pretrain': PRETRAIN, 'vision': VISION, 'vision_model': string(required=False),
    'model': MODEL, 'connector': CONNECTOR, 'quantize': QUANTIZE, 'peft': PEFT,
    'train': TRAIN, 'eval': EVAL, 'optim': OPTIM,
    'mesh': custom(check_mesh, 'axis sizes like {"data": -1, "fsdp": 2}', required=False),
    'partition_rules': custom(lambda v: sharding.parse_rules(v), '(regex, axes) pairs',
                              required=False),
    # checkpoint tensors that may be missing from the frozen bases (checkpoints/io.py)
    'partial_load': custom(lambda v: check_partial_load(v), "a tuple of fnmatch patterns of "
                           "checkpoint tensor names, e.g. ('lm_head.weight',)", required=False),
})


def check_variants(v):
  if isinstance(v, str) or not isinstance(v, (tuple, list)) or not v:
    raise ValueError('not a non-empty tuple')
  if len(set(v)) != len(v):
    raise ValueError('a context map is given twice')
  bad = [x for x in v if x not in contexts.PRESETS]
  if bad:
    raise ValueError(f'{bad} are not presets')


def check_partial_load(v):
  if v is None:  # the loaders' default is (), which a config says as ()
    raise ValueError('None')
  io.partial_patterns(v)


def check_tasks(v):
  tasks = pipeline.check_tasks(v)
  unknown = [t for t in tasks if t not in sources.TASKS]
  if unknown:
    raise ValueError(f'unknown tasks {unknown}')


def check_invocations(v, num_contexts):
  inv = {int(k) if isinstance(k, str) and k.isdigit() else k: list(s) for k, s in dict(v).items()}
  invocations_lib.check_invocations(inv, num_contexts=num_contexts)
