"""What a config builds: the tokenizer, the model and its initial variables, the data splits.

`build` is shared by training, evaluation, plug-ins and exports, so each rebuilds a run's model
exactly as training built it: frozen parts come from their checkpoints (a Hugging Face vision
tower or decoder, the workdir's stage-0 decoder), the rest (connector, adaptor tables, a patch
encoder) from the jitted init, or the adaptor tables from plug-ins (peft.plugins).
`device_batch` places a host's rows of a batch as global arrays split over (data, fsdp).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cpeft_jax import (adaptors, catalog, checkpoints, configlib, plugins, quantize, sharding,
                       trees, workdir as workdir_lib)
from cpeft_jax.contexts import Kind
from cpeft_jax.data import pipeline, preprocess, sources
from cpeft_jax.data import tokenizer as tokenizer_lib
from cpeft_jax.data.demo import builder as demo_builder
from cpeft_jax.models import hf_configs, vlm
from cpeft_jax.models.connector import ConnectorConfig
from cpeft_jax.models.decoders import init_adaptors
from cpeft_jax.models.decoder_config import DecoderConfig
from cpeft_jax.models.patch import PatchEncoder, PatchEncoderConfig

# The arrays of a batch that the model reads (plus 'tasks' where a run has several).
BATCH_KEYS = ('pixels', 'tokens', 'targets', 'kinds', 'context_ids', 'attention_mask',
              'loss_mask')
# (config, workdir, train split, tokenizer, image tokens) -> directory of a pre-trained decoder.
TextLM = Callable[[ml_collections.ConfigDict, str, Any, Any, int], str]


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

  def batches(self, split: sources.Split, *, train: bool,
              all_references: bool | None = None) -> pipeline.CaptionBatches:
    """This host's share of the batches: batch_size / process_count rows of each.

    Evaluation batches hold every reference caption of each image when `all_references`
    (None: the config's eval.all_references, default False: each image's first caption).
    """
    c = self.config
    if all_references is None:
      all_references = bool(c.eval.get('all_references', False))
    size = c.train.batch_size if train else c.eval.batch_size
    return pipeline.CaptionBatches(
        split, self.tokenizer, batch_size=size // jax.process_count(),
        num_image_tokens=self.num_image_tokens, seq_len=c.data.seq_len,
        context_map=c.data.context_map, image_size=self.image_size, mean=self.image_mean,
        std=self.image_std, train=train, seed=c.seed,
        augment=pipeline.AugmentConfig(**c.data.augment), boundary=c.connector.boundary_tokens,
        host=(jax.process_index(), jax.process_count()), tasks=self.tasks,
        invocations=dict(c.data.get('invocations') or {}),
        all_references=not train and all_references, workers=c.data.get('workers', 0))

  @property
  def tasks(self) -> tuple[str, ...]:
    return pipeline.config_tasks(self.config)


def peft_config(config: ml_collections.ConfigDict) -> adaptors.PeftConfig:
  """config.peft as a PeftConfig; peft.plugins (plug-in directories that `build` loads into the
  tables) is not one of its fields."""
  d = config.peft.to_dict() if hasattr(config.peft, 'to_dict') else dict(config.peft)
  return adaptors.PeftConfig.from_dict({k: v for k, v in d.items() if k != 'plugins'})


def decoder_config(config: ml_collections.ConfigDict) -> DecoderConfig:
  return DecoderConfig.from_dict(config.model)


def tokenizer(config: ml_collections.ConfigDict, workdir: str, train_split):
  """The workdir's saved tokenizer, else the text model's, else one built from the captions."""
  saved = os.path.join(workdir, workdir_lib.TOKENIZER)
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


def make_mesh(config) -> jax.sharding.Mesh:
  """The config's (data, fsdp, tensor) mesh; each batch must split over data x fsdp."""
  mesh = sharding.make_mesh(config.get('mesh'))
  for name in ('train', 'eval'):
    sharding.check_batch(mesh.shape, name, config[name].batch_size)
    if config[name].batch_size % jax.process_count():
      raise ValueError(f'{name}.batch_size={config[name].batch_size} must be divisible by the '
                       f'{jax.process_count()} processes (hosts).')
  sharding.parse_rules(config.get('partition_rules'))  # fail on bad rules before any work
  return mesh


def build(config: ml_collections.ConfigDict, workdir: str, train_split, *,
          text_lm: TextLM | None = None) -> Experiment:
  """Tokenizer, model and initial variables of the config.

  vision.kind 'patch' is the demo's frozen random patch encoder; 'hf' loads a Hugging Face
  vision checkpoint (vision.path: a directory or a cached hub id) whose config decides the
  image size and number of image tokens, and whose preprocessor_config.json (when present)
  the pixel normalisation. Parts loaded from checkpoints are never initialised: only what no
  checkpoint provides (connector, adaptor tables, a patch encoder, a decoder without
  text_model) is computed by the jitted init; the rest of it is dead code.

  Without text_model, a config with pretrain.epochs reads the decoder pre-trained into
  DIR/base_lm; `text_lm` (training passes the demo's stage 0) makes it when it is missing.

  peft.plugins (plug-in directories: a list, plug-in i in context i, or {context: dir}) starts
  the adaptor tables from plug-ins trained in other runs: they are assembled as rows of one
  model (their methods, targets and ranks replace peft's; peft.num_contexts may add unadapted
  contexts) and checked against this run's decoder, encoder and connector before any training.
  """
  mesh = make_mesh(config)  # every array below is created in the rules' sharding on it
  placement = sharding.Placement(mesh, config.get('partition_rules'))
  # The loaders' leaves go straight to their shards on a mesh; one device keeps the host path
  # (a quantized leaf is then quantized layer by layer from host memory).
  loading = placement if mesh.devices.size > 1 else None
  tok = tokenizer(config, workdir, train_split)
  peft = peft_config(config)
  plugged = load_plugins(config, peft)
  if plugged:
    peft = plugged[0]
  qcfg = quantize.QuantConfig.from_dict(config.get('quantize'))  # '' or absent: full precision
  quantize.check_peft(qcfg, peft, config.train.mode)
  loaded = {}  # 'params' subtrees that come from checkpoints
  encoder, loaded_encoder, mean, std = _encoder(config, qcfg, loading)
  if loaded_encoder is not None:
    loaded['encoder'] = loaded_encoder
  enc_cfg = encoder.cfg
  text_dir = _text_model(config, workdir, train_split, tok, enc_cfg.num_tokens, text_lm)
  dec_cfg = _decoder_config(config, text_dir, tok)
  check_lora_rank(dec_cfg, peft)

  model = vlm.VisionLanguageModel(encoder, dec_cfg, peft,
                                  ConnectorConfig.from_dict(config.connector))
  N, L, S = enc_cfg.num_tokens, config.data.seq_len, enc_cfg.image_size
  dummy = (jnp.zeros((1, S, S, 3)), jnp.zeros((1, L), jnp.int32),
           jnp.asarray(dummy_kinds(N, L)), jnp.zeros((1, L), jnp.int32))
  skip = set(loaded) | ({'decoder'} if text_dir else set())
  variables = init_variables(model, dummy, config.seed, skip, placement)
  if text_dir:
    at = loading and loading.under('params/decoder/')
    loaded['decoder'], _ = checkpoints.load_decoder_params(
        text_dir, dec_cfg, partial_load=config.get('partial_load', ()),
        leaf_fn=quantize.leaf_quantizer(qcfg, placement=at), placement=at)
  variables['params'].update(loaded)
  if plugged:
    variables[adaptors.ADAPTORS] = plugin_tables(plugged, variables, dec_cfg, enc_cfg, placement)
  elif text_dir and adaptors.ADAPTORS in variables:  # DoRA's magnitudes start at ||W|| of the
    variables[adaptors.ADAPTORS] = jax.jit(  # loaded base, not the random one
        adaptors.init_dora_magnitudes,
        out_shardings=placement.tree(variables[adaptors.ADAPTORS], adaptors.ADAPTORS))(
            variables['params'], variables[adaptors.ADAPTORS])
  variables['params'] = quantize.quantize_params(variables['params'], qcfg,
                                                 placement.under('params/'))
  return Experiment(config, tok, model, variables, N, S, mesh, tuple(mean), tuple(std))


def init_variables(model, inputs, seed: int, skip, placement: sharding.Placement) -> dict:
  """`model.init`'s variables without the 'params' subtrees in `skip` (those a checkpoint
  provides: dead code in the jit), created by a jit whose outputs are already in the rules'
  shardings: shapes first (jax.eval_shape), so no device ever holds a whole table or kernel
  that the rules split."""
  def init(key, *inputs):
    v = model.init(key, *inputs)
    return {**v, 'params': {k: p for k, p in v['params'].items() if k not in skip}}
  key = jax.random.key(seed)
  shardings = placement.tree(jax.eval_shape(init, key, *inputs))
  return jax.jit(init, out_shardings=shardings)(key, *inputs)


def _encoder(config, qcfg, placement: sharding.Placement | None = None):
  """(encoder module, its loaded params or None, pixel mean, pixel std) of config.vision; a
  loaded tower's leaves are created in `placement`'s shardings where given."""
  mean, std = Experiment.image_mean, Experiment.image_std
  vision = vision_config(config)
  if vision.kind == 'patch':
    enc_cfg = PatchEncoderConfig(vision.image_size, vision.patch_size, vision.width)
    return PatchEncoder(enc_cfg), None, mean, std
  if vision.kind != 'hf':
    raise ValueError(f"vision.kind={vision.kind!r}; expected 'patch' or 'hf'.")
  if not vision.get('path'):
    raise ValueError("vision.kind='hf' needs vision.path (a checkpoint directory or a hub id "
                     'in the local Hugging Face cache).')
  directory = catalog.resolve(vision.path)
  at = placement and placement.under('params/encoder/')
  encoder, params = checkpoints.load_vision(
      directory, dtype=vision.get('dtype', 'float32'),
      feature_layer=vision.get('feature_layer', -1), drop_cls=vision.get('drop_cls', True),
      partial_load=config.get('partial_load', ()),
      leaf_fn=quantize.leaf_quantizer(qcfg, 'encoder/', at),  # quantized as each tensor loads
      placement=at)
  mean, std = normalisation(directory, mean, std)
  return encoder, params, mean, std


def _text_model(config, workdir, train_split, tok, num_image_tokens, text_lm):
  """The resolved directory of the frozen pre-trained decoder, or None (a random decoder)."""
  text_model = config.text_model
  if not text_model and config.pretrain.epochs:
    base = os.path.join(workdir, workdir_lib.BASE_LM)
    if text_lm is not None:
      text_model = text_lm(config, workdir, train_split, tok, num_image_tokens)
    elif os.path.exists(os.path.join(base, checkpoints.CONFIG)):
      text_model = base
    else:
      raise FileNotFoundError(f'{base} is missing: this config pre-trains its base decoder '
                              '(pretrain.epochs), which training does before it builds.')
  # An uncached preset or hub id fails here, saying how to fetch it.
  return catalog.resolve(text_model) if text_model else None


def decoder_numerics(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What config.model sets on a decoder whose shape comes from elsewhere (a checkpoint's
  config.json): its dtypes (param_dtype defaults to dtype), dropout and remat."""
  m = config.model
  return {'dtype': m.get('dtype', 'float32'), 'param_dtype': m.get('dtype', 'float32'),
          **{k: m[k] for k in ('residual_dropout', 'remat', 'param_dtype') if k in m}}


def _decoder_config(config, text_dir, tok) -> DecoderConfig:
  if text_dir:  # a pre-trained decoder: its config.json decides the shape
    dec_cfg = hf_configs.decoder_config(checkpoints.read_config(text_dir),
                                        **decoder_numerics(config))
  else:
    model_dict = dict(config.model)
    if not model_dict.get('vocab_size'):
      model_dict['vocab_size'] = len(tok)
    dec_cfg = DecoderConfig.from_dict(model_dict)
  if dec_cfg.vocab_size < len(tok):
    raise ValueError(f'The decoder\'s vocab_size={dec_cfg.vocab_size} is smaller than the '
                     f'tokenizer ({len(tok)} tokens).')
  return dec_cfg


def plugin_dirs(spec) -> dict[int, str]:
  """peft.plugins as {context id: plug-in directory}: a dict keyed by context, or a list (or a
  comma-separated string) of directories for contexts 0, 1, ...; empty when unset."""
  if not spec:
    return {}
  if isinstance(spec, str):
    spec = [d for d in spec.split(',') if d]
  if isinstance(spec, (Mapping, ml_collections.ConfigDict)):
    try:
      return {int(c): d for c, d in dict(spec).items()}
    except ValueError:
      raise ValueError(f'peft.plugins={dict(spec)!r}: expected context ids (integers) as keys.')
  return dict(enumerate(spec))


def load_plugins(config, peft: adaptors.PeftConfig):
  """(assembled PeftConfig, tables, {context: (dir, Plugin)}) of peft.plugins, or None."""
  dirs = plugin_dirs(config.peft.get('plugins'))
  if not dirs:
    return None
  loaded = {}
  for c, d in sorted(dirs.items()):
    try:
      loaded[c] = plugins.load(d)  # the bases are checked once this run's are loaded
    except FileNotFoundError as e:
      raise FileNotFoundError(f'peft.plugins[{c}]: {e}') from None
  num_contexts = max(peft.num_contexts, max(dirs) + 1)
  assembled, tables = plugins.assemble(loaded, num_contexts=num_contexts, strategy=peft.strategy)
  return assembled, tables, {c: (dirs[c], p) for c, p in loaded.items()}


def plugin_tables(plugged, variables, dec_cfg, enc_cfg,
                  placement: sharding.Placement | None = None):
  """The assembled plug-ins' tables in place of fresh ones, once each plug-in's bases (decoder,
  encoder, connector) are found to be this run's and their tables fit this model; each table
  is put in its sharding by `placement` (each device receives its slice) where given."""
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
  want = trees.flatten(variables[adaptors.ADAPTORS])
  got = trees.flatten(tables)
  trees.require_same_shapes(
      trees.shapes(want), trees.shapes(got),
      f'The tables of peft.plugins {sorted(d for d, _ in by_context.values())}',
      got_name='the plug-ins', want_name='this model',
      hint='plug-ins of another kind of model, e.g. a text-only decoder?')
  if placement is None:
    return trees.unflatten({k: jnp.asarray(v, want[k].dtype) for k, v in got.items()})
  return trees.unflatten({k: placement.put(f'{adaptors.ADAPTORS}/{k}',
                                           np.asarray(v, want[k].dtype)) for k, v in got.items()})


def vision_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.vision, or with config.vision_model (a catalog name, hub id or directory) a Hugging
  Face encoder with the catalog's recommended settings; config.vision's own entries win."""
  name = config.get('vision_model')
  if not name:
    return config.vision
  return ml_collections.ConfigDict({**catalog.vision_settings(name), **config.get('vision', {}),
                                    'kind': 'hf', 'path': name})


def check_lora_rank(dec_cfg, peft):
  """Refuses a LoRA rank (any context's) above min(d_in, d_out) of a projection it adapts.

  Such a rank adds parameters that cannot raise the update's rank; it is a config mistake.
  Checked on shapes only (jax.eval_shape), before any weights load.
  """
  ranks = {c: s.rank for c, s in enumerate(peft.specs) if s.methods and s.low_rank}
  if not ranks:
    return
  flat = trees.flatten(jax.eval_shape(lambda: init_adaptors(dec_cfg, peft)))
  for path, a in flat.items():
    if not path.endswith('/lora_a'):
      continue
    d_in, d_out = a.shape[-2], flat[path[:-1] + 'b'].shape[-1]
    for c, rank in ranks.items():
      if rank > min(d_in, d_out):
        name = path.removesuffix('/lora_a').removeprefix('decoder/')
        key = f'peft.contexts[{c}].rank' if peft.contexts is not None else 'peft.lora.rank'
        raise configlib.ConfigError(
            f'{key}={rank} is larger than the adapted projection {name} ({d_in} -> {d_out}) of '
            f'the decoder (hidden_size={dec_cfg.hidden_size}); expected a rank <= '
            f'{min(d_in, d_out)}.')


def normalisation(directory, mean, std):
  """The pixel mean and std of a vision checkpoint's preprocessor_config.json, if it has one."""
  if not (directory / preprocess.PREPROCESSOR_CONFIG).is_file():
    logging.warning('%s has no %s; normalising pixels with mean=%s, std=%s.', directory,
                    preprocess.PREPROCESSOR_CONFIG, mean, std)
    return mean, std
  proc = preprocess.ImageProcessing.from_pretrained(directory)
  if not proc.do_normalize:
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return proc.image_mean, proc.image_std


def dummy_kinds(N, L):
  """Token kinds [1, L] of a row with N image tokens after BOS, for shape-only inits."""
  k = np.full((1, L), Kind.TEXT, np.int32)
  k[0, 0], k[0, 1:1 + N] = Kind.BOS, Kind.IMAGE
  return k


def device_batch(exp: Experiment, batch):
  """Global arrays split over ('data', 'fsdp') from each host's rows of the batch.

  A context id outside [0, peft.num_contexts) is an error here: inside the jitted step it
  would select no adaptor group and the token would silently see the frozen base.
  """
  check_context_ids(batch['context_ids'], exp.model.peft.num_contexts)
  s = sharding.batch_sharding(exp.mesh)
  return {k: jax.make_array_from_process_local_data(s, np.asarray(batch[k]))
          for k in BATCH_KEYS + ('tasks',) if k in batch}


def check_context_ids(ids, num_contexts: int) -> None:
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= num_contexts):
    bad = sorted({int(i) for i in np.unique(ids) if not 0 <= i < num_contexts})
    raise ValueError(f'A batch has context ids {bad}, outside [0, {num_contexts}) of '
                     f'peft.num_contexts={num_contexts}: data.context_map, its rules or '
                     'data.invocations give ids the model has no adaptor group for.')


def open_split(config: ml_collections.ConfigDict, workdir: str, name: str) -> sources.Split:
  """One split of the config's dataset (the demo builds into workdir/tfds unless data_dir).

  dataset='folder': a user's images plus a COCO- or Karpathy-format captions JSON. A COCO file
  is one split: training's file for the train split, eval_captions_json for any other.
  data.restval (default False, the paper's train split only): Karpathy's 'restval' images join
  'train' (a Karpathy JSON's entries; coco_captions opens 'train+restval').
  """
  d = config.data
  demo = demo_builder.make_config(**d.demo) if d.dataset == 'demo' else None
  captions_json = d.get('captions_json') or None
  if name != d.train_split:
    captions_json = d.get('eval_captions_json') or captions_json
  restval = bool(d.get('restval', False))
  if restval and d.dataset == 'coco_captions' and name == 'train':
    name = 'train+restval'
  return sources.load(d.dataset, name, d.data_dir or os.path.join(workdir, workdir_lib.TFDS),
                      demo, captions_json=captions_json, image_dir=d.get('image_dir') or None,
                      restval_in_train=restval)
