"""Hugging Face decoder checkpoints -> the Flax decoder's trees, one name map per architecture.

config.json's model_type picks the name map (Llama, Mistral and Qwen2 share Llama's; GPT-2;
OPT), which says which checkpoint tensor, or `Split`/`Concat` piece of tensors, fills each leaf.
Per-layer tensors go straight into the stacked [layers, ...] leaves of 'params'. A missing
tensor is an error naming the file unless `partial_load` allows it (it is then freshly
initialised, with a warning); so is an unexpected one, except known buffers (`ignore`) and the
stored copy of tied embeddings. Adaptor tables always start fresh (models.decoders.init_adaptors).
Locating, reading, planning and filling are io.py's; the writers that invert these maps are
hf_save.py's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from cpeft_jax import trees
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.checkpoints.io import (CONFIG, CONV1D, EMBED, FLAX_LAYOUT, LINEAR, TORCH_LAYOUT,
                                      VECTOR, LoadReport, check_report, dense, fill_leaves,
                                      layer_norm, plan_leaves, read_config, resolve)
from cpeft_jax.checkpoints.tensors import Arrays, Concat, Split, Views, open_weights
from cpeft_jax.models import hf_configs
from cpeft_jax.models.decoders import init_adaptors, make_decoder
from cpeft_jax.models.llama import DecoderConfig
from cpeft_jax.sharding import Placement


@dataclasses.dataclass(frozen=True)
class DecoderNames:
  """One decoder architecture's checkpoint names, keyed by the Flax parameter path ('/'-joined).

  Names are transformers' PyTorch state-dict names (or a `Split`/`Concat` of them); '{layer}'
  marks a per-layer tensor, stacked into the leading layer axis of the Flax leaf. `prefix` is
  the base model's prefix, absent from checkpoints of the bare base model. `ignore` matches
  buffers that hold no weights, and `tied_copies` the stored copies of tied embeddings
  (transformers ties them and ignores them).
  """
  params: Mapping[str, tuple[str | Split | Concat, str]]
  prefix: str = 'model.'
  ignore: tuple[str, ...] = ()
  tied_copies: tuple[str, ...] = ()


_LAYER = 'model.layers.{layer}.'
LLAMA = DecoderNames(
    params={
        'embed_tokens/embedding': ('model.embed_tokens.weight', EMBED),
        'norm/weight': ('model.norm.weight', VECTOR),
        'lm_head/kernel': ('lm_head.weight', LINEAR),
        'layers/input_layernorm/weight': (_LAYER + 'input_layernorm.weight', VECTOR),
        'layers/post_attention_layernorm/weight': (_LAYER + 'post_attention_layernorm.weight',
                                                   VECTOR),
        **{f'layers/attn/{p}/kernel': (_LAYER + f'self_attn.{p}.weight', LINEAR)
           for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj')},
        **{f'layers/attn/{p}/bias': (_LAYER + f'self_attn.{p}.bias', VECTOR)
           for p in ('q_proj', 'k_proj', 'v_proj')},  # Qwen2 only (cfg.qkv_bias)
        **{f'layers/mlp/{p}/kernel': (_LAYER + f'mlp.{p}.weight', LINEAR)
           for p in ('gate_proj', 'up_proj', 'down_proj')},
        'layers/mlp/gate_up_proj/kernel': (Concat((_LAYER + 'mlp.gate_proj.weight',
                                                   _LAYER + 'mlp.up_proj.weight')), LINEAR),
    },
    # RoPE buffers of older transformers, with or without the base model's prefix.
    ignore=(r'(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq',),
    tied_copies=('lm_head.weight',))

_H = 'transformer.h.{layer}.'
GPT2 = DecoderNames(
    params={
        'embed_tokens/embedding': ('transformer.wte.weight', EMBED),
        'embed_positions/embedding': ('transformer.wpe.weight', EMBED),
        **layer_norm('norm', 'transformer.ln_f'),
        **layer_norm('layers/ln_1', _H + 'ln_1'),
        **layer_norm('layers/ln_2', _H + 'ln_2'),
        **{f'layers/attn/{p}/{leaf}': (Split(f'{_H}attn.c_attn.{w}', i, 3), kind)
           for i, p in enumerate(('q_proj', 'k_proj', 'v_proj'))
           for leaf, w, kind in (('kernel', 'weight', CONV1D), ('bias', 'bias', VECTOR))},
        **dense('layers/attn/c_proj', _H + 'attn.c_proj', CONV1D),
        **dense('layers/mlp/c_fc', _H + 'mlp.c_fc', CONV1D),
        **dense('layers/mlp/c_proj', _H + 'mlp.c_proj', CONV1D),
    },
    prefix='transformer.',
    ignore=(r'(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)',),  # causal-mask buffers
    tied_copies=('lm_head.weight',))

_D, _L = 'model.decoder.', 'model.decoder.layers.{layer}.'
OPT = DecoderNames(
    params={
        'embed_tokens/embedding': (_D + 'embed_tokens.weight', EMBED),
        'embed_positions/embedding': (_D + 'embed_positions.weight', EMBED),
        'project_in/kernel': (_D + 'project_in.weight', LINEAR),
        'project_out/kernel': (_D + 'project_out.weight', LINEAR),
        'lm_head/kernel': ('lm_head.weight', LINEAR),
        **layer_norm('norm', _D + 'final_layer_norm'),
        **layer_norm('layers/self_attn_layer_norm', _L + 'self_attn_layer_norm'),
        **layer_norm('layers/final_layer_norm', _L + 'final_layer_norm'),
        **{k: v for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')
           for k, v in dense(f'layers/attn/{p}', f'{_L}self_attn.{p}').items()},
        **dense('layers/mlp/fc1', _L + 'fc1'),
        **dense('layers/mlp/fc2', _L + 'fc2'),
    },
    tied_copies=('lm_head.weight',))
# Mistral and Qwen2 name their tensors as Llama does.
NAME_MAPS = {'llama': LLAMA, 'mistral': LLAMA, 'qwen2': LLAMA, 'gpt2': GPT2, 'opt': OPT}
# The decoder architecture (DecoderConfig.arch) of each model_type.
ARCH_OF = {'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama', 'gpt2': 'gpt2', 'opt': 'opt'}


class Pretrained(NamedTuple):
  """A loaded decoder: its config, frozen 'params', fresh 'adaptors' tables, and the report."""
  config: DecoderConfig
  params: dict
  adaptors: dict
  report: LoadReport


# ----------------------------------------------------------------------------- entry points


def load_decoder(path_or_id: str | os.PathLike, peft: PeftConfig | None = None,
                 dtype: str = 'float32', *, partial_load=(), strict: bool = True, seed: int = 0,
                 revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                 **overrides) -> Pretrained:
  """A pre-trained decoder: (config, params in `dtype`, fresh adaptor tables, load report).

  `dtype` is that of the frozen weights and of the computation; `overrides` set other
  `DecoderConfig` fields (e.g. dtype='bfloat16' with param_dtype='float32', remat=True).
  `partial_load`: fnmatch patterns of checkpoint tensor names allowed to be missing (e.g.
  ('lm_head.weight',) for a new head); `strict=False` only warns of any mismatch.
  """
  directory = resolve(path_or_id, revision=revision, cache_dir=cache_dir)
  hf = read_config(directory)
  try:
    cfg = hf_configs.decoder_config(hf, **{'dtype': dtype, 'param_dtype': dtype, **overrides})
  except ValueError as e:
    raise ValueError(f'{directory / CONFIG}: {e}') from e
  params, report = load_decoder_params(directory, cfg, partial_load=partial_load, strict=strict,
                                       seed=seed)
  return Pretrained(cfg, params, init_adaptors(cfg, peft, seed), report)


def load_decoder_params(path: str | os.PathLike, cfg: DecoderConfig, *, partial_load=(),
                        strict: bool = True, seed: int = 0, leaf_fn: Callable | None = None,
                        placement: Placement | None = None) -> tuple[dict, LoadReport]:
  """The 'params' tree of `cfg` (in cfg.param_dtype) from a checkpoint directory or cached id.

  `leaf_fn(path, array)`, if given, transforms each leaf as soon as it is filled (e.g.
  cpeft_jax.quantize.leaf_quantizer), so the whole tree never exists untransformed.
  `placement` (e.g. sharding.Placement(mesh, rules, 'params/decoder/')) creates each leaf in
  its NamedSharding, each device reading only its block of the file (io.fill_leaves); None:
  the default device. `partial_load` and `strict` are as in `load_decoder`.
  """
  directory = resolve(path)
  model_type = read_config(directory).get('model_type')
  names = _name_map(model_type, cfg, f'{directory / CONFIG} has model_type')
  return _assemble_decoder(open_weights(directory), cfg, names, partial_load, strict, seed,
                           leaf_fn, placement)


def params_from_state_dict(state_dict: Mapping[str, Any], cfg: DecoderConfig, *,
                           model_type: str = 'llama', partial_load=(), strict: bool = True,
                           seed: int = 0) -> tuple[dict, LoadReport]:
  """The 'params' tree from an in-memory PyTorch state dict (numpy-convertible tensors)."""
  names = _name_map(model_type, cfg, 'model_type')
  return _assemble_decoder(Arrays(state_dict, torch_layout=True), cfg, names, partial_load,
                           strict, seed)


def _name_map(model_type, cfg: DecoderConfig, what: str) -> DecoderNames:
  if model_type not in NAME_MAPS:
    raise ValueError(f'{what}={model_type!r}; supported model types: {", ".join(NAME_MAPS)}.')
  if ARCH_OF[model_type] != cfg.arch:
    raise ValueError(f'{what}={model_type!r}, a {ARCH_OF[model_type]} checkpoint, but the '
                     f'decoder config has arch={cfg.arch!r}.')
  return NAME_MAPS[model_type]


# ----------------------------------------------------------------------------- assembling


def _assemble_decoder(source, cfg: DecoderConfig, names: DecoderNames, partial_load,
                      strict: bool, seed: int, leaf_fn: Callable | None = None,
                      placement: Placement | None = None) -> tuple[dict, LoadReport]:
  where = source.where
  model = make_decoder(cfg)
  tokens = np.zeros((1, 1), np.int32)  # host: shapes only, nothing on a device
  init = lambda key: model.init(key, tokens)['params']
  shapes = trees.flatten(jax.eval_shape(init, jax.random.key(0)))
  keys = set(source.keys())
  base_only = not any(k.startswith(names.prefix.replace('.', source.sep)) for k in keys)
  layout = TORCH_LAYOUT if source.torch_layout else FLAX_LAYOUT
  views = Views(source, layout)

  def lookup(hf_name, kind):
    if base_only and hf_name.startswith(names.prefix):
      hf_name = hf_name[len(names.prefix):]
    return source.name(hf_name, kind)

  def key_of(spec, kind, i):
    if isinstance(spec, str):
      return lookup(spec.format(layer=i), kind)
    if isinstance(spec, Split):
      return views.define(Split(lookup(spec.name.format(layer=i), kind), spec.index,
                                spec.parts), kind)
    return views.define(Concat(tuple(lookup(n.format(layer=i), kind) for n in spec.names)),
                        kind)

  def tensor_of(path):
    if path not in names.params:
      raise ValueError(f'The name map has no checkpoint tensor for the Flax parameter {path!r}; '
                       f'this DecoderConfig cannot be loaded from {where}.')
    spec, kind = names.params[path]
    text = spec if isinstance(spec, str) else repr(spec)
    return (lambda i: key_of(spec, kind, i)), '{layer}' in text, kind

  for path, leaf in shapes.items():  # define every piece first: plan_leaves lists keys once
    name_of, stacked, _ = tensor_of(path)
    for i in range(leaf.shape[0]) if stacked else [None]:
      name_of(i)
  plan, missing = plan_leaves(
      shapes, views, tensor_of, layout, where,
      mismatch='{key}: the checkpoint has {got}, the model expects {want}')
  used = {r for slots, _, _ in plan.values() for k in slots if k is not None
          for r in views.sources(k)}
  missing = list(dict.fromkeys(a for k in missing for a in views.absent(k)))
  skip = [re.compile(p) for p in names.ignore]
  if cfg.tie_embeddings:
    skip += [re.compile(re.escape(lookup(n, LINEAR))) for n in names.tied_copies]
  unexpected = sorted(k for k in keys - used if not any(p.fullmatch(k) for p in skip))
  report = LoadReport(tuple(missing), tuple(unexpected))
  check_report(report, where, partial_load, strict, what='decoder')
  return fill_leaves(plan, shapes, views, layout, init, seed, cfg.param_dtype, where,
                     leaf_fn, placement), report


def input_embeddings(path_or_id: str | os.PathLike):
  """The input embedding table [vocabulary, width] of a decoder checkpoint (any supported
  model_type), read alone: e.g. OPT-125m's, which the paper's language model keeps frozen."""
  directory = resolve(path_or_id)
  model_type = read_config(directory).get('model_type')
  if model_type not in NAME_MAPS:
    raise ValueError(f'{directory / CONFIG} has model_type={model_type!r}; supported model '
                     f'types: {", ".join(NAME_MAPS)}.')
  names = NAME_MAPS[model_type]
  source = open_weights(directory)
  name = names.params['embed_tokens/embedding'][0]
  keys = set(source.keys())
  for key in (name, name.removeprefix(names.prefix)):  # a whole model's, or a bare base's
    key = source.name(key, EMBED)
    if key in keys:
      return source.read(key)  # numpy, on the host
  raise ValueError(f'{source.where} has no input embedding table {name!r}.')
