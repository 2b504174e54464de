"""Builds an experiment from its config and runs the training loop around the pure step.

All I/O lives here: data, checkpoints (latest for resuming, best-validation weights kept
apart), metric writers, signal handling. The loop dispatches step n+1 before it pulls step n's
metrics to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cpeft_jax import adaptors, checkpoints, configlib
from cpeft_jax.data import pipeline, sources
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.models import vlm
from cpeft_jax.models.connector import ConnectorConfig
from cpeft_jax.models.patch import PatchEncoder, PatchEncoderConfig
from cpeft_jax.train import checkpointing, metrics
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  tokenizer: Any
  model: vlm.VisionLanguageModel
  variables: dict
  num_image_tokens: int
  image_size: int
  mesh: jax.sharding.Mesh

  def batches(self, split: sources.Split, *, train: bool) -> pipeline.CaptionBatches:
    c = self.config
    return pipeline.CaptionBatches(
        split, self.tokenizer, batch_size=c.train.batch_size if train else c.eval.batch_size,
        num_image_tokens=self.num_image_tokens, seq_len=c.data.seq_len,
        context_map=c.data.context_map, image_size=self.image_size, train=train, seed=c.seed,
        augment=pipeline.AugmentConfig(**c.data.augment), boundary=c.connector.boundary_tokens,
        host=(jax.process_index(), jax.process_count()))


def _tokenizer(config, workdir, train_split):
  saved = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(saved):
    return tokenizer_lib.load(saved)
  if config.tokenizer == 'word_level' and config.text_model:
    return tokenizer_lib.load(config.text_model)  # a checkpoint brings its own tokenizer
  if config.tokenizer == 'word_level':
    tok = tokenizer_lib.word_level(t for caps in train_split.captions for t in caps)
  else:
    tok = tokenizer_lib.load(config.tokenizer)
  if jax.process_index() == 0:
    tok.save_pretrained(saved)
  return tok


def _mesh(config) -> jax.sharding.Mesh:
  n = jax.device_count()
  for name in ('train', 'eval'):
    if config[name].batch_size % n:
      raise ValueError(f'{name}.batch_size={config[name].batch_size} must be divisible by the '
                       f'{n} devices of the data mesh axis.')
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def build(config: ml_collections.ConfigDict, workdir: str, train_split) -> Experiment:
  """Tokenizer, model and initial variables of the config."""
  tok = _tokenizer(config, workdir, train_split)
  if config.vision.kind != 'patch':
    raise ValueError(f"vision.kind={config.vision.kind!r}; expected 'patch'.")
  enc_cfg = PatchEncoderConfig(config.vision.image_size, config.vision.patch_size,
                               config.vision.width)
  peft = configlib.peft_config(config)
  text_model = config.text_model
  if not text_model and config.pretrain.epochs:
    from cpeft_jax.train import pretrain
    text_model = pretrain.text_lm(config, workdir, train_split, tok)
  if text_model:  # a pre-trained decoder: its config.json decides the shape
    overrides = {k: config.model[k] for k in ('residual_dropout', 'remat', 'param_dtype')
                 if k in config.model}
    pre = checkpoints.load_decoder(text_model, peft, dtype=config.model.dtype, **overrides)
    dec_cfg = pre.config
  else:
    model_dict = dict(config.model)
    if not model_dict.get('vocab_size'):
      model_dict['vocab_size'] = len(tok)
    dec_cfg = configlib.DecoderConfig.from_dict(model_dict)
  if dec_cfg.vocab_size < len(tok):
    raise ValueError(f'The decoder\'s vocab_size={dec_cfg.vocab_size} is smaller than the '
                     f'tokenizer ({len(tok)} tokens).')
  model = vlm.VisionLanguageModel(PatchEncoder(enc_cfg), dec_cfg, peft,
                                  ConnectorConfig.from_dict(config.connector))
  N, L = enc_cfg.num_tokens, config.data.seq_len
  dummy = (jnp.zeros((1, enc_cfg.image_size, enc_cfg.image_size, 3)),
           jnp.zeros((1, L), jnp.int32), jnp.asarray(_dummy_kinds(N, L)), jnp.zeros((1, L),
                                                                                  jnp.int32))
  variables = jax.jit(model.init)(jax.random.key(config.seed), *dummy)
  if text_model:
    variables['params']['decoder'] = pre.params
  return Experiment(config, tok, model, variables, N, enc_cfg.image_size, _mesh(config))


def _dummy_kinds(N, L):
  from cpeft_jax.contexts import Kind
  k = np.full((1, L), Kind.TEXT, np.int32)
  k[0, 0], k[0, 1:1 + N] = Kind.BOS, Kind.IMAGE
  return k


def evaluate_loss(exp: Experiment, trainable, frozen, data: pipeline.CaptionBatches, eval_fn):
  """(mean caption-token loss, perplexity) over a whole split."""
  total, count = 0.0, 0.0
  for batch in data.epoch(0):
    out = jax.device_get(eval_fn(trainable, frozen, _device_batch(exp, batch)))
    total += float(out['loss_sum'])
    count += float(out['tokens'])
  loss = total / max(count, 1.0)
  return loss, math.exp(min(loss, 50.0))


MODEL_KEYS = ('pixels', 'tokens', 'targets', 'kinds', 'context_ids', 'attention_mask',
              'loss_mask')


def _device_batch(exp: Experiment, batch):
  sharding = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec('data'))
  return {k: jax.device_put(batch[k], sharding) for k in MODEL_KEYS}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains; returns the final metrics. Resumes from the latest checkpoint in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  data_dir = config.data.data_dir or os.path.join(workdir, 'tfds')
  demo = None
  if config.data.dataset == 'demo':
    from cpeft_jax.data.demo import builder
    demo = builder.make_config(**config.data.demo)
  d = config.data
  # dataset='folder': a user's images plus a COCO- or Karpathy-format captions JSON (a COCO file
  # is one split: give the evaluation split its own file in eval_captions_json).
  folder = dict(captions_json=d.get('captions_json') or None, image_dir=d.get('image_dir') or None)
  train_split = sources.load(d.dataset, d.train_split, data_dir, demo, **folder)
  folder['captions_json'] = d.get('eval_captions_json') or folder['captions_json']
  eval_split = sources.load(d.dataset, d.eval_split, data_dir, demo, **folder)
  exp = build(config, workdir, train_split)
  train_data, eval_data = exp.batches(train_split, train=True), exp.batches(eval_split, train=False)

  trainable, frozen = state_lib.split(exp.variables, config.train.mode)
  counts = {m: sum(v.values()) for m, v in adaptor_counts(exp, trainable).items()}
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  logging.info('trainable parameters: %s (%s)', f'{n_train:,}', counts)
  steps_per_epoch = len(train_data)
  optim = state_lib.OptimConfig.from_dict(
      dict(config.optim, total_steps=config.optim.total_steps or
           steps_per_epoch * config.train.epochs))
  # The base, the trainable tree and its optimizer state are replicated over the data axis.
  replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  frozen = jax.device_put(frozen, replicated)
  state = jax.device_put(state_lib.TrainState.create(trainable, state_lib.optimizer(optim)),
                         replicated)
  mgr = checkpointing.manager(os.path.join(workdir, 'checkpoints'))
  meta = {'epoch': 0, 'batch': 0, 'best_val_loss': None}
  if mgr.latest_step() is not None:
    state, meta = checkpointing.restore(mgr, state)
    logging.info('resumed from step %d (epoch %d, batch %d)', int(state.step), meta['epoch'],
                 meta['batch'])

  apply = vlm.apply_fn(exp.model)
  step_fn = jax.jit(functools.partial(step_lib.train_step, apply_fn=apply,
                                      micro_steps=config.train.micro_steps), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, apply_fn=apply))
  writer = metrics.Writer(workdir, enabled=jax.process_index() == 0)
  stop = {'signal': None}
  old = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
  rng = jax.random.key(config.seed + 1)
  last = {}
  try:
    for epoch in range(meta['epoch'], config.train.epochs):
      pending, t0 = None, time.time()
      for k, batch in enumerate(train_data.epoch(epoch, start=meta['batch']), meta['batch']):
        state, m = step_fn(state, frozen, _device_batch(exp, batch),
                           jax.random.fold_in(rng, epoch * steps_per_epoch + k))
        if pending is not None:  # pull step n-1's metrics after dispatching step n
          last = _check(jax.device_get(pending[1]), pending[0])
          if pending[0] % config.train.log_every == 0:
            writer.write(pending[0], {**last, 'steps_per_s': config.train.log_every /
                                      max(time.time() - t0, 1e-9)})
            t0 = time.time()
        pending = (int(epoch * steps_per_epoch + k + 1), m)
        meta.update(epoch=epoch, batch=k + 1)
        if stop['signal'] is not None or (config.train.checkpoint_every and
                                          pending[0] % config.train.checkpoint_every == 0):
          checkpointing.save(mgr, state, meta)
          if stop['signal'] is not None:
            raise SystemExit(f'Stopped by signal {stop["signal"]} at step {pending[0]}; '
                             'checkpoint saved, rerun the same command to resume.')
      if pending is not None:
        last = _check(jax.device_get(pending[1]), pending[0])
      val_loss, val_ppl = evaluate_loss(exp, state.trainable, frozen, eval_data, eval_fn)
      step = int(jax.device_get(state.step))
      writer.write(step, {'epoch': epoch + 1, 'train_loss': last.get('loss', float('nan')),
                          'val_loss': val_loss, 'val_ppl': val_ppl})
      meta.update(epoch=epoch + 1, batch=0)
      if meta['best_val_loss'] is None or val_loss < meta['best_val_loss']:
        meta['best_val_loss'] = val_loss
        _save_best(workdir, state.trainable, {'step': step, 'epoch': epoch + 1,
                                              'val_loss': val_loss, 'val_ppl': val_ppl})
      checkpointing.save(mgr, state, meta)
  except KeyboardInterrupt:
    checkpointing.save(mgr, state, meta)
    raise
  finally:
    signal.signal(signal.SIGTERM, old)
  truncated, dropped = train_data.truncated
  if truncated:
    logging.warning('%d training captions were truncated (%d tokens dropped) to fit seq_len=%d.',
                    truncated, dropped, config.data.seq_len)
  best = meta['best_val_loss']
  return {'val_loss': best, 'val_ppl': math.exp(best) if best is not None else float('nan'),
          'steps': int(jax.device_get(state.step))}


def _check(m, step):
  m = {k: float(v) for k, v in m.items()}
  if not math.isfinite(m['loss']):
    raise FloatingPointError(f'Loss is {m["loss"]} at step {step}; the last checkpoint in the '
                             'workdir holds the state before it.')
  return m


def _save_best(workdir, trainable, info):
  path = os.path.abspath(os.path.join(workdir, 'best'))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, trainable, force=True)
  with open(os.path.join(workdir, 'best.json'), 'w') as f:
    json.dump(info, f, indent=2)


def adaptor_counts(exp: Experiment, trainable) -> dict[str, dict[int, int]]:
  from cpeft_jax import params
  tables = trainable.get(adaptors.ADAPTORS, {}).get('decoder', {})
  return params.count_adaptors(tables, exp.model.peft) if tables else {}
