"""Builds an experiment from its config and runs the training loop around the pure step.

All I/O lives here: data, checkpoints (latest for resuming, best-validation weights kept
apart), metric writers, signal handling. The loop dispatches step n+1 before it pulls step n's
metrics to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from cpeft_jax import adaptors, catalog, checkpoints, configlib, plugins, quantize
from cpeft_jax.data import pipeline, preprocess, sources
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.models import hf_configs, vlm
from cpeft_jax.models.connector import ConnectorConfig
from cpeft_jax.models.decoders import init_adaptors
from cpeft_jax.models.patch import PatchEncoder, PatchEncoderConfig
from cpeft_jax.train import checkpointing, metrics, sharding
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
  # Pixel normalisation (x / 255 - mean) / std: the vision checkpoint's, else [-1, 1].
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

  def batches(self, split: sources.Split, *, train: bool) -> pipeline.CaptionBatches:
    """This host's share of the batches: batch_size / process_count rows of each."""
    c = self.config
    size = c.train.batch_size if train else c.eval.batch_size
    return pipeline.CaptionBatches(
        split, self.tokenizer, batch_size=size // jax.process_count(),
        num_image_tokens=self.num_image_tokens, seq_len=c.data.seq_len,
        context_map=c.data.context_map, image_size=self.image_size, mean=self.image_mean,
        std=self.image_std, train=train, seed=c.seed,
        augment=pipeline.AugmentConfig(**c.data.augment), boundary=c.connector.boundary_tokens,
        host=(jax.process_index(), jax.process_count()), tasks=self.tasks,
        invocations=dict(c.data.get('invocations') or {}))

  @property
  def tasks(self) -> tuple[str, ...]:
    return pipeline.config_tasks(self.config)


def _tokenizer(config, workdir, train_split):
  saved = os.path.join(workdir, 'tokenizer')
  if os.path.isdir(saved):
    return tokenizer_lib.load(saved)
  if config.tokenizer == 'word_level' and config.text_model:
    return tokenizer_lib.load(config.text_model)  # a checkpoint brings its own tokenizer
  if config.tokenizer == 'word_level':  # the texts of every task the base is trained for
    tok = tokenizer_lib.word_level(train_split.corpus(pipeline.base_tasks(config)))
  else:
    tok = tokenizer_lib.load(config.tokenizer)
  if jax.process_index() == 0:
    tok.save_pretrained(saved)
  return tok


def _mesh(config) -> jax.sharding.Mesh:
  """The config's (data, fsdp, tensor) mesh; each batch must split over data x fsdp."""
  mesh = sharding.make_mesh(config.get('mesh'))
  for name in ('train', 'eval'):
    sharding.check_batch(mesh.shape, name, config[name].batch_size)
    if config[name].batch_size % jax.process_count():
      raise ValueError(f'{name}.batch_size={config[name].batch_size} must be divisible by the '
                       f'{jax.process_count()} processes (hosts).')
  sharding.parse_rules(config.get('partition_rules'))  # fail on bad rules before any work
  return mesh


def build(config: ml_collections.ConfigDict, workdir: str, train_split) -> Experiment:
  """Tokenizer, model and initial variables of the config.

  vision.kind 'patch' is the demo's frozen random patch encoder; 'hf' loads a Hugging Face
  vision checkpoint (vision.path: a directory or a cached hub id) whose config decides the
  image size and number of image tokens, and whose preprocessor_config.json (when present)
  the pixel normalisation. Parts loaded from checkpoints are never initialised: only what no
  checkpoint provides (connector, adaptor tables, a patch encoder, a decoder without
  text_model) is computed by the jitted init; the rest of it is dead code.

  peft.plugins (plug-in directories: a list, plug-in i in context i, or {context: dir}) starts
  the adaptor tables from plug-ins trained in other runs: they are assembled as rows of one
  model (their methods, targets and ranks replace peft's; peft.num_contexts may add unadapted
  contexts) and checked against this run's decoder, encoder and connector before any training.
  """
  tok = _tokenizer(config, workdir, train_split)
  peft = configlib.peft_config(config)
  plugged = _load_plugins(config, peft)
  if plugged:
    peft = plugged[0]
  qcfg = quantize.QuantConfig.from_dict(config.get('quantize'))  # '' or absent: full precision
  quantize.check_peft(qcfg, peft, config.train.mode)
  loaded = {}  # 'params' subtrees that come from checkpoints
  mean, std = Experiment.image_mean, Experiment.image_std
  vision = vision_config(config)
  if vision.kind == 'patch':
    enc_cfg = PatchEncoderConfig(vision.image_size, vision.patch_size, vision.width)
    encoder = PatchEncoder(enc_cfg)
  elif vision.kind == 'hf':
    if not vision.get('path'):
      raise ValueError("vision.kind='hf' needs vision.path (a checkpoint directory or a hub id "
                       'in the local Hugging Face cache).')
    directory = catalog.resolve(vision.path)
    encoder, loaded['encoder'] = checkpoints.load_vision(
        directory, dtype=vision.get('dtype', 'float32'),
        feature_layer=vision.get('feature_layer', -1), drop_cls=vision.get('drop_cls', True),
        leaf_fn=quantize.leaf_quantizer(qcfg, 'encoder/'))  # quantized as each tensor loads
    enc_cfg = encoder.cfg
    mean, std = _normalisation(directory, mean, std)
  else:
    raise ValueError(f"vision.kind={vision.kind!r}; expected 'patch' or 'hf'.")

  text_model = config.text_model
  if not text_model and config.pretrain.epochs:
    from cpeft_jax.train import pretrain
    text_model = pretrain.text_lm(config, workdir, train_split, tok, enc_cfg.num_tokens)
  # An uncached preset or hub id fails here, saying how to fetch it.
  text_dir = catalog.resolve(text_model) if text_model else None
  if text_dir:  # a pre-trained decoder: its config.json decides the shape
    overrides = {k: config.model[k] for k in ('residual_dropout', 'remat', 'param_dtype')
                 if k in config.model}
    dec_cfg = hf_configs.decoder_config(
        checkpoints.read_config(text_dir),
        **{'dtype': config.model.dtype, 'param_dtype': config.model.dtype, **overrides})
  else:
    model_dict = dict(config.model)
    if not model_dict.get('vocab_size'):
      model_dict['vocab_size'] = len(tok)
    dec_cfg = configlib.DecoderConfig.from_dict(model_dict)
  if dec_cfg.vocab_size < len(tok):
    raise ValueError(f'The decoder\'s vocab_size={dec_cfg.vocab_size} is smaller than the '
                     f'tokenizer ({len(tok)} tokens).')
  _check_lora_rank(dec_cfg, peft)

  model = vlm.VisionLanguageModel(encoder, dec_cfg, peft,
                                  ConnectorConfig.from_dict(config.connector))
  N, L, S = enc_cfg.num_tokens, config.data.seq_len, enc_cfg.image_size
  dummy = (jnp.zeros((1, S, S, 3)), jnp.zeros((1, L), jnp.int32),
           jnp.asarray(_dummy_kinds(N, L)), jnp.zeros((1, L), jnp.int32))
  skip = set(loaded) | ({'decoder'} if text_dir else set())

  def init(key, *inputs):
    v = model.init(key, *inputs)
    return {**v, 'params': {k: p for k, p in v['params'].items() if k not in skip}}
  variables = jax.jit(init)(jax.random.key(config.seed), *dummy)
  if text_dir:
    loaded['decoder'], _ = checkpoints.load_decoder_params(text_dir, dec_cfg,
                                                           leaf_fn=quantize.leaf_quantizer(qcfg))
  variables['params'].update(loaded)
  if plugged:
    variables[adaptors.ADAPTORS] = _plugin_tables(plugged, variables, dec_cfg, enc_cfg)
  elif text_dir and adaptors.ADAPTORS in variables:  # DoRA's magnitudes start at ||W|| of the
    variables[adaptors.ADAPTORS] = adaptors.init_dora_magnitudes(  # loaded base, not the random one
        variables['params'], variables[adaptors.ADAPTORS])
  variables['params'] = quantize.quantize_params(variables['params'], qcfg)
  return Experiment(config, tok, model, variables, N, S, _mesh(config), tuple(mean), tuple(std))


def _load_plugins(config, peft: adaptors.PeftConfig):
  """(assembled PeftConfig, tables, {context: (dir, Plugin)}) of peft.plugins, or None."""
  spec = config.peft.get('plugins')
  if not spec:
    return None
  if isinstance(spec, str):
    spec = [d for d in spec.split(',') if d]
  if isinstance(spec, (dict, ml_collections.ConfigDict)):
    try:
      dirs = {int(c): d for c, d in dict(spec).items()}
    except ValueError:
      raise ValueError(f'peft.plugins={dict(spec)!r}: expected context ids (integers) as keys.')
  else:
    dirs = dict(enumerate(spec))
  loaded = {}
  for c, d in sorted(dirs.items()):
    try:
      loaded[c] = plugins.load(d)  # the bases are checked once this run's are loaded
    except FileNotFoundError as e:
      raise FileNotFoundError(f'peft.plugins[{c}]: {e}') from None
  num_contexts = max(peft.num_contexts, max(dirs) + 1)
  assembled, tables = plugins.assemble(loaded, num_contexts=num_contexts, strategy=peft.strategy)
  return assembled, tables, {c: (dirs[c], p) for c, p in loaded.items()}


def _plugin_tables(plugged, variables, dec_cfg, enc_cfg):
  """The assembled plug-ins' tables in place of fresh ones, once each plug-in's bases (decoder,
  encoder, connector) are found to be this run's and their tables fit this model."""
  _, tables, by_context = plugged
  bases = plugins.model_bases(variables['params'], dec_cfg, enc_cfg)
  for c, (d, p) in by_context.items():
    try:
      plugins.check_plugin(p, bases, f'Plug-in {d} (peft.plugins, context {c})')
    except ValueError as e:
      hint = (' A plug-in carries its connector as part of its base: train plug-ins for '
              'assembly with train.freeze_connector=True and the same seed.'
              if 'connector' in str(e) else '')
      raise ValueError(f'{e}{hint}') from None
  want = flax.traverse_util.flatten_dict(variables[adaptors.ADAPTORS], sep='/')
  got = flax.traverse_util.flatten_dict(flax.core.unfreeze(tables), sep='/')
  bad = sorted(set(want) ^ set(got)) + sorted(
      k for k in set(want) & set(got) if want[k].shape != got[k].shape)
  if bad:
    raise ValueError(f'The tables of peft.plugins {sorted(d for d, _ in by_context.values())} '
                     f'do not fit this model: mismatched tensors {bad[:5]} (plug-ins of another '
                     'kind of model, e.g. a text-only decoder?).')
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, want[k].dtype) for k, v in got.items()}, sep='/')


def optimizer(config: ml_collections.ConfigDict, optim: state_lib.OptimConfig,
              peft: adaptors.PeftConfig) -> optax.GradientTransformation:
  """The run's optimizer, with train.freeze_contexts' rows and (train.freeze_connector) the
  connector kept exactly as they are: their updates are zeroed after the optimizer."""
  tx = state_lib.optimizer(optim)
  frozen = tuple(int(c) for c in config.train.get('freeze_contexts') or ())
  if frozen:
    rows = _adapted(peft)
    unknown = sorted(set(frozen) - set(rows))
    if unknown:
      raise ValueError(f'train.freeze_contexts={frozen}: contexts {unknown} have no adaptor rows '
                       f'(this model adapts contexts {tuple(rows)}).')
    tx = optax.chain(tx, plugins.freeze_contexts(peft, [c for c in rows if c not in frozen]))
  if config.train.get('freeze_connector'):
    is_connector = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: [getattr(k, 'key', k) for k in path[:2]] == ['params', 'connector'],
        tree)
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), is_connector))
  return tx


def vision_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.vision, or with config.vision_model (a catalog name, hub id or directory) a Hugging
  Face encoder with the catalog's recommended settings; config.vision's own entries win."""
  name = config.get('vision_model')
  if not name:
    return config.vision
  return ml_collections.ConfigDict({**catalog.vision_settings(name), **config.get('vision', {}),
                                    'kind': 'hf', 'path': name})


def _check_lora_rank(dec_cfg, peft):
  """Refuses a LoRA rank above min(d_in, d_out) of a projection it adapts (the model's width).

  Such a rank adds parameters that cannot raise the update's rank; it is a config mistake.
  Checked on shapes only (jax.eval_shape), before any weights load.
  """
  if 'lora' not in peft.methods:
    return
  tables = jax.eval_shape(lambda: init_adaptors(dec_cfg, peft))
  flat = flax.traverse_util.flatten_dict(tables, sep='/')
  for path, a in flat.items():
    if not path.endswith('/lora_a'):
      continue
    d_in, d_out = a.shape[-2], flat[path[:-1] + 'b'].shape[-1]
    if peft.lora.rank > min(d_in, d_out):
      name = path.removesuffix('/lora_a').removeprefix('decoder/')
      raise ValueError(f'peft.lora.rank={peft.lora.rank} is larger than the adapted projection '
                       f'{name} ({d_in} -> {d_out}) of the decoder (hidden_size='
                       f'{dec_cfg.hidden_size}); expected a rank <= {min(d_in, d_out)}.')


def _normalisation(directory, mean, std):
  """The pixel mean and std of a vision checkpoint's preprocessor_config.json, if it has one."""
  if not (directory / preprocess.PREPROCESSOR_CONFIG).is_file():
    logging.warning('%s has no %s; normalising pixels with mean=%s, std=%s.', directory,
                    preprocess.PREPROCESSOR_CONFIG, mean, std)
    return mean, std
  proc = preprocess.ImageProcessing.from_pretrained(directory)
  if not proc.do_normalize:
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return proc.image_mean, proc.image_std


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
  """Global arrays split over ('data', 'fsdp') from each host's rows of the batch."""
  s = sharding.batch_sharding(exp.mesh)
  return {k: jax.make_array_from_process_local_data(s, np.asarray(batch[k]))
          for k in MODEL_KEYS + ('tasks',) if k in batch}


def open_split(config: ml_collections.ConfigDict, workdir: str, name: str) -> sources.Split:
  """One split of the config's dataset (the demo builds into workdir/tfds unless data_dir).

  dataset='folder': a user's images plus a COCO- or Karpathy-format captions JSON. A COCO file
  is one split: training's file for the train split, eval_captions_json for any other.
  """
  d = config.data
  demo = None
  if d.dataset == 'demo':
    from cpeft_jax.data.demo import builder
    demo = builder.make_config(**d.demo)
  captions_json = d.get('captions_json') or None
  if name != d.train_split:
    captions_json = d.get('eval_captions_json') or captions_json
  return sources.load(d.dataset, name, d.data_dir or os.path.join(workdir, 'tfds'), demo,
                      captions_json=captions_json, image_dir=d.get('image_dir') or None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains; returns the final metrics. Resumes from the latest checkpoint in `workdir`."""
  _mesh(config)  # a bad mesh, batch size or partition rule fails before any data or model work
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  train_split = open_split(config, workdir, config.data.train_split)
  eval_split = open_split(config, workdir, config.data.eval_split)
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
  placed = place(exp, trainable, frozen, optimizer(config, optim, exp.model.peft))
  state, frozen = placed.state, placed.frozen
  mgr = checkpointing.manager(os.path.join(workdir, 'checkpoints'))
  meta = {'epoch': 0, 'batch': 0, 'best_val_loss': None}
  if mgr.latest_step() is not None:
    state, meta = checkpointing.restore(mgr, state)
    logging.info('resumed from step %d (epoch %d, batch %d)', int(state.step), meta['epoch'],
                 meta['batch'])

  apply = vlm.apply_fn(exp.model)
  rows = exp.model.peft.rows if exp.model.peft.methods else ()
  num_contexts = exp.model.peft.num_contexts
  tasks = exp.tasks if len(exp.tasks) > 1 else ()  # per-task losses of a multi-task run
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, apply_fn=apply, micro_steps=config.train.micro_steps,
                        num_contexts=num_contexts, num_tasks=len(tasks)),
      in_shardings=(placed.state_sh, placed.frozen_sh, placed.batch_sh, placed.replicated),
      out_shardings=(placed.state_sh, placed.replicated), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, apply_fn=apply),
                    in_shardings=(placed.state_sh.trainable, placed.frozen_sh, placed.batch_sh),
                    out_shardings=placed.replicated)
  lr_at = state_lib.schedule(optim)
  lead = jax.process_index() == 0
  writer = metrics.Writer(workdir, enabled=lead)
  stop = {'signal': None}
  old = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
  rng = jax.random.key(config.seed + 1)
  last = {}
  seq_tokens = config.train.batch_size * config.data.seq_len  # positions a step computes
  try:
    for epoch in range(meta['epoch'], config.train.epochs):
      pending, t0, n0 = None, time.time(), meta['batch']
      bar = tqdm.tqdm(total=steps_per_epoch, initial=meta['batch'], disable=not lead,
                      desc=f'epoch {epoch + 1}/{config.train.epochs}', unit='step',
                      dynamic_ncols=True, leave=False, mininterval=1.0)
      for k, batch in enumerate(train_data.epoch(epoch, start=meta['batch']), meta['batch']):
        state, m = step_fn(state, frozen, _device_batch(exp, batch),
                           jax.random.fold_in(rng, epoch * steps_per_epoch + k))
        if pending is not None:  # pull step n-1's metrics after dispatching step n
          last = _check(jax.device_get(pending[1]), pending[0], rows, tasks)
          bar.update(1)
          bar.set_postfix(loss=f'{last["loss"]:.3f}', refresh=False)
          if pending[0] % config.train.log_every == 0:
            dt = max(time.time() - t0, 1e-9) / max(k - n0, 1)
            writer.write(pending[0], {**last, **_rates(last, dt, seq_tokens),
                                      'learning_rate': float(lr_at(pending[0] - 1))})
            t0, n0 = time.time(), k
        pending = (int(epoch * steps_per_epoch + k + 1), m)
        meta.update(epoch=epoch, batch=k + 1)
        if stop['signal'] is not None or (config.train.checkpoint_every and
                                          pending[0] % config.train.checkpoint_every == 0):
          # never save a NaN state
          last = _check(jax.device_get(pending[1]), pending[0], rows, tasks)
          checkpointing.save(mgr, state, meta)
          if stop['signal'] is not None:
            raise SystemExit(f'Stopped by signal {stop["signal"]} at step {pending[0]}; '
                             'checkpoint saved, rerun the same command to resume.')
      if pending is not None:
        last = _check(jax.device_get(pending[1]), pending[0], rows, tasks)
        bar.update(1)
      bar.close()
      val_loss, val_ppl = evaluate_loss(exp, state.trainable, frozen, eval_data, eval_fn)
      step = int(jax.device_get(state.step))
      writer.write(step, {'epoch': epoch + 1, 'train_loss': last.get('loss', float('nan')),
                          'val_loss': val_loss, 'val_ppl': val_ppl})
      meta.update(epoch=epoch + 1, batch=0)
      if meta['best_val_loss'] is None or val_loss < meta['best_val_loss']:
        meta['best_val_loss'] = val_loss
        checkpointing.save_best(workdir, state.trainable, {
            'step': step, 'epoch': epoch + 1, 'val_loss': val_loss, 'val_ppl': val_ppl})
      checkpointing.save(mgr, state, meta)
  except KeyboardInterrupt:
    checkpointing.save(mgr, state, meta)
    raise
  finally:
    signal.signal(signal.SIGTERM, old)
    writer.close()
  truncated, dropped = train_data.truncated
  if truncated:
    logging.warning('%d training captions were truncated (%d tokens dropped) to fit seq_len=%d.',
                    truncated, dropped, config.data.seq_len)
  if lead and config.train.get('export', True):  # the small adaptor-only copy, DIR/export
    from cpeft_jax.train import export
    try:
      export.export(workdir)
    except (OSError, ValueError) as e:  # training itself succeeded: say so, keep its result
      logging.error('Export to %s/export failed (%s); retry with python -m '
                    'cpeft_jax.train.export --workdir=%s', workdir, e, workdir)
  if lead and config.train.get('plugins') and meta['best_val_loss'] is not None:
    write_plugins(workdir, exp.model.peft)
  best = meta['best_val_loss']
  return {'val_loss': best, 'val_ppl': math.exp(best) if best is not None else float('nan'),
          'steps': int(jax.device_get(state.step))}


def _adapted(peft: adaptors.PeftConfig) -> tuple[int, ...]:
  """The contexts that have an adaptor group (some method in their spec)."""
  return tuple(c for c, spec in zip(peft.rows, peft.row_specs) if spec.methods)


def write_plugins(workdir: str, peft: adaptors.PeftConfig) -> list[str]:
  """train.plugins: every adapted context's plug-in of the best weights, DIR/plugins/<context>
  (as `python -m cpeft_jax.plugins --workdir=DIR --context=N` writes it)."""
  run = plugins.restore_run(workdir)
  out = []
  for c in _adapted(peft):
    out.append(str(plugins.save(os.path.join(workdir, 'plugins', str(c)),
                                plugins.from_run(run, c, name=f'context {c}'))))
  logging.info('plug-ins of the best weights: %s', out)
  return out


@dataclasses.dataclass
class Placed:
  """The train state and frozen base on the mesh, with the shardings the jitted steps use."""
  state: state_lib.TrainState
  frozen: Any
  state_sh: Any
  frozen_sh: Any
  batch_sh: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding


def place(exp: Experiment, trainable, frozen, tx) -> Placed:
  """Shards the frozen base and builds the optimizer state directly in its shardings.

  Shapes come from jax.eval_shape, so each leaf's sharding is known before its memory is
  used; the optimizer state is created by a jit whose outputs are already sharded.
  """
  rules = sharding.parse_rules(exp.config.get('partition_rules'))
  create = lambda t: state_lib.TrainState.create(t, tx)
  state_sh = sharding.tree_shardings(jax.eval_shape(create, trainable), exp.mesh, rules)
  frozen_sh = sharding.tree_shardings(frozen, exp.mesh, rules)
  logging.info('sharded leaves on mesh %s: %s', dict(exp.mesh.shape),
               sharding.describe({'frozen': frozen_sh, 'state': state_sh}))
  trainable = jax.device_put(trainable, state_sh.trainable)
  state = jax.jit(create, out_shardings=state_sh)(trainable)
  return Placed(state, jax.device_put(frozen, frozen_sh), state_sh, frozen_sh,
                sharding.batch_sharding(exp.mesh), sharding.replicated(exp.mesh))


def _rates(m, step_s, seq_tokens):
  return {'perplexity': math.exp(min(m['loss'], 50.0)), 'step_s': step_s,
          'tokens_per_s': seq_tokens / step_s}


def _check(m, step, rows=(), tasks=()):
  """Host floats of a step's metrics (per-context and per-task arrays flattened); raises on a
  NaN loss."""
  out = {}
  for k, v in m.items():
    v = np.asarray(v)
    if k.endswith('_row'):  # grad_norm_row, update_ratio_row: one figure per context row
      out.update({f'{k[:-4]}/ctx{c}': float(x) for c, x in zip(rows, v)})
    elif k.endswith('_task'):  # loss_task, tokens_task: one figure per task
      out.update({f'{k[:-5]}/{t}': float(x) for t, x in zip(tasks, v)})
    elif k.endswith('_ctx'):
      out.update({f'{k[:-4]}/ctx{c}': float(x) for c, x in enumerate(v)})
    else:
      out[k] = float(v)
  if not math.isfinite(out['loss']):
    raise FloatingPointError(f'Loss is {out["loss"]} at step {step}; the last checkpoint in the '
                             'workdir holds the state before it.')
  return out


def adaptor_counts(exp: Experiment, trainable) -> dict[str, dict[int, int]]:
  from cpeft_jax import params
  tables = trainable.get(adaptors.ADAPTORS, {}).get('decoder', {})
  return params.count_adaptors(tables, exp.model.peft) if tables else {}
