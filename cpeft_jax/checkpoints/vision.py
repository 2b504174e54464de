"""Hugging Face vision checkpoints -> frozen Flax encoders, one name map per architecture.

config.json's model_type picks the architecture (CLIP, SigLIP, Swin V2): its config converter,
Flax module and name map. The tower is found inside any checkpoint that holds it (a bare vision
model, a full CLIP/SigLIP model, an image classifier) by the prefix of its patch-embedding
tensor. Only safetensors are read. Tensors outside the tower (text tower, heads, classifier) are
ignored; tensors of layers past `feature_layer` are skipped; anything else unused in the tower
is an error naming the file, as is a tensor the encoder needs but the checkpoint lacks, unless
`partial_load` allows it (it is then initialised fresh, with a warning). Locating, reading,
planning, filling and reporting are io.py's; hf_save.save_vision writes a CLIP tower back
through CLIP.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from cpeft_jax import trees
from cpeft_jax.checkpoints.io import (CONFIG, TORCH_LAYOUT, VECTOR, LoadReport, check_report,
                                      dense, fill_leaves, layer_norm, plan_leaves, read_config,
                                      resolve)
from cpeft_jax.checkpoints.tensors import open_weights
from cpeft_jax.models import clip, siglip, swinv2
from cpeft_jax.models.vision import ViT
from cpeft_jax.sharding import Placement

log = logging.getLogger(__name__)

# How a PyTorch tensor becomes a Flax leaf. LINEAR: [out, in] -> [in, out]; CONV: [out, in, kh,
# kw] -> [kh, kw, in, out]; VECTOR, SCALE: as is.
CONV = 'conv'
LAYOUT = {**TORCH_LAYOUT, CONV: (2, 3, 1, 0)}


@dataclasses.dataclass(frozen=True)
class VisionNames:
  """One architecture's tensor names, keyed by Flax parameter path ('/'-joined).

  Names are transformers' PyTorch state-dict names relative to the tower's prefix. '{layer}' in
  a name marks a tensor stacked into the leading (nn.scan) axis of its Flax leaf; '{stage}' and
  '{block}' appear in both path and name and are copied across. `anchor` is a tensor every
  checkpoint of the architecture has, to find the prefix; `unused` matches tensors of the tower
  that the encoder never needs (pooling heads, a norm of the pooled token, buffers).
  """
  anchor: str
  params: Mapping[str, tuple[str, str]]
  unused: tuple[str, ...] = ()


_VIT_LAYER = 'encoder.layers.{layer}.'
_VIT_LAYERS = {
    **layer_norm('layers/layer_norm1', _VIT_LAYER + 'layer_norm1'),
    **layer_norm('layers/layer_norm2', _VIT_LAYER + 'layer_norm2'),
    **{k: v for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')
       for k, v in dense(f'layers/{p}', _VIT_LAYER + f'self_attn.{p}').items()},
    **dense('layers/fc1', _VIT_LAYER + 'mlp.fc1'),
    **dense('layers/fc2', _VIT_LAYER + 'mlp.fc2'),
}
CLIP = VisionNames(
    anchor='embeddings.patch_embedding.weight',
    params={
        'patch_embedding/kernel': ('embeddings.patch_embedding.weight', CONV),
        'class_embedding': ('embeddings.class_embedding', VECTOR),
        'position_embedding': ('embeddings.position_embedding.weight', VECTOR),
        **layer_norm('pre_layrnorm', 'pre_layrnorm'),
        **_VIT_LAYERS,
    },
    unused=(r'post_layernorm\..*', r'embeddings\.position_ids'))
SIGLIP = VisionNames(
    anchor='embeddings.patch_embedding.weight',
    params={
        'patch_embedding/kernel': ('embeddings.patch_embedding.weight', CONV),
        'patch_embedding/bias': ('embeddings.patch_embedding.bias', VECTOR),
        'position_embedding': ('embeddings.position_embedding.weight', VECTOR),
        **_VIT_LAYERS,
        **layer_norm('post_layernorm', 'post_layernorm'),
    },
    unused=(r'head\..*', r'embeddings\.position_ids'))

_SWIN_BLOCK = 'encoder.layers.{stage}.blocks.{block}.'
_SWIN_PATH = 'stages_{stage}/blocks_{block}/'
SWINV2 = VisionNames(
    anchor='embeddings.patch_embeddings.projection.weight',
    params={
        'patch_embed/kernel': ('embeddings.patch_embeddings.projection.weight', CONV),
        'patch_embed/bias': ('embeddings.patch_embeddings.projection.bias', VECTOR),
        **layer_norm('embed_norm', 'embeddings.norm'),
        **dense(_SWIN_PATH + 'attn/query', _SWIN_BLOCK + 'attention.self.query'),
        **dense(_SWIN_PATH + 'attn/key', _SWIN_BLOCK + 'attention.self.key', bias=False),
        **dense(_SWIN_PATH + 'attn/value', _SWIN_BLOCK + 'attention.self.value'),
        _SWIN_PATH + 'attn/logit_scale': (_SWIN_BLOCK + 'attention.self.logit_scale', VECTOR),
        **dense(_SWIN_PATH + 'attn/cpb_mlp_0',
                _SWIN_BLOCK + 'attention.self.continuous_position_bias_mlp.0'),
        **dense(_SWIN_PATH + 'attn/cpb_mlp_2',
                _SWIN_BLOCK + 'attention.self.continuous_position_bias_mlp.2', bias=False),
        **dense(_SWIN_PATH + 'attn/output', _SWIN_BLOCK + 'attention.output.dense'),
        **layer_norm(_SWIN_PATH + 'layernorm_before', _SWIN_BLOCK + 'layernorm_before'),
        **dense(_SWIN_PATH + 'intermediate', _SWIN_BLOCK + 'intermediate.dense'),
        **dense(_SWIN_PATH + 'output', _SWIN_BLOCK + 'output.dense'),
        **layer_norm(_SWIN_PATH + 'layernorm_after', _SWIN_BLOCK + 'layernorm_after'),
        **dense('stages_{stage}/downsample/reduction',
                'encoder.layers.{stage}.downsample.reduction', bias=False),
        **layer_norm('stages_{stage}/downsample/norm', 'encoder.layers.{stage}.downsample.norm'),
        **layer_norm('layernorm', 'layernorm'),
    },
    unused=(r'embeddings\.mask_token', r'.*\.relative_coords_table',
            r'.*\.relative_position_index'))


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a model_type loads as: its config converter, Flax module and name map."""
  config_from_hf: Any
  module: type[nn.Module]
  names: VisionNames


ARCHITECTURES = {
    **{t: Architecture(clip.config_from_hf, ViT, CLIP) for t in clip.MODEL_TYPES},
    **{t: Architecture(siglip.config_from_hf, ViT, SIGLIP) for t in siglip.MODEL_TYPES},
    **{t: Architecture(swinv2.config_from_hf, swinv2.SwinV2, SWINV2) for t in swinv2.MODEL_TYPES},
}


# ----------------------------------------------------------------------------- entry points


def load_vision(path_or_dir: str | os.PathLike, dtype: str = 'float32', feature_layer: int = -1,
                drop_cls: bool = True, *, partial_load=(), strict: bool = True, seed: int = 0,
                leaf_fn: Callable | None = None, placement: Placement | None = None
                ) -> tuple[nn.Module, dict]:
  """A frozen vision encoder and its 'params' tree, from a Hugging Face checkpoint.

  `dtype` is that of the weights and of the computation. `feature_layer` indexes transformers'
  `hidden_states` (-1: `last_hidden_state`; see models/vision.py and models/swinv2.py);
  `drop_cls` drops CLIP's class token and does nothing for encoders without one. Call it as
  `module.apply({'params': params}, pixels_BHWC)` -> [B, N, D]. `leaf_fn(path, array)`
  transforms each leaf as soon as it is read, e.g. `quantize.leaf_quantizer(qcfg, 'encoder/')`
  stores the projections quantized without a full-precision copy of the whole tower.
  `partial_load`: fnmatch patterns of checkpoint tensor names allowed to be missing;
  `strict=False` only warns of missing and unexpected tensors. `placement` (e.g.
  sharding.Placement(mesh, rules, 'params/encoder/')) creates each leaf in its NamedSharding.
  """
  directory = resolve(path_or_dir)
  hf = read_config(directory)
  try:
    module = encoder_module(hf, dtype, feature_layer, drop_cls)
  except ValueError as e:
    raise ValueError(f'{directory / CONFIG}: {e}') from e
  params, _ = load_vision_params(directory, module, partial_load=partial_load, strict=strict,
                                 seed=seed, leaf_fn=leaf_fn, placement=placement)
  return module, params


def encoder_module(hf: Mapping[str, Any], dtype: str = 'float32', feature_layer: int = -1,
                   drop_cls: bool = True) -> nn.Module:
  """The encoder `load_vision` builds from a config.json dict (`drop_cls` only where a class
  token exists); its cfg.num_tokens is the number of image tokens it gives."""
  overrides = dict(dtype=dtype, param_dtype=dtype, feature_layer=feature_layer)
  model_type = hf.get('model_type')
  if model_type in ARCHITECTURES and ARCHITECTURES[model_type].module is ViT:
    overrides['drop_cls'] = drop_cls
  return vision_module(hf, **overrides)


def vision_module(hf: Mapping[str, Any], **overrides) -> nn.Module:
  """The Flax encoder a config.json dict describes; `overrides` set config fields."""
  arch = architecture(hf.get('model_type'))
  return arch.module(arch.config_from_hf(hf, **overrides))


def architecture(model_type) -> Architecture:
  if model_type not in ARCHITECTURES:
    raise ValueError(f'config.json has model_type={model_type!r}, which no Flax vision encoder '
                     f'loads; supported model types: {", ".join(ARCHITECTURES)}.')
  return ARCHITECTURES[model_type]


def load_vision_params(directory: str | os.PathLike, module: nn.Module, *, partial_load=(),
                       strict: bool = True, seed: int = 0, leaf_fn: Callable | None = None,
                       placement: Placement | None = None) -> tuple[dict, LoadReport]:
  """The 'params' tree of `module` (in its param_dtype) from a checkpoint directory; each
  leaf goes through `leaf_fn(path, array)`, if given, as soon as it is filled, and is created
  in `placement`'s sharding if given (io.fill_leaves)."""
  directory = resolve(directory)
  model_type = read_config(directory).get('model_type')
  try:
    names = architecture(model_type).names
  except ValueError as e:
    raise ValueError(f'{directory / CONFIG}: {e}') from e
  return _assemble_vision(open_weights(directory, msgpack=False), module, names, partial_load,
                          strict, seed, leaf_fn, placement)


# ----------------------------------------------------------------------------- assembling


def _placeholder_regex(template: str, groups: bool) -> re.Pattern:
  parts = re.split(r'\{(\w+)\}', template)  # literal, name, literal, name, ...
  out = ''.join(re.escape(p) if i % 2 == 0 else (f'(?P<{p}>\\d+)' if groups else r'\d+')
                for i, p in enumerate(parts))
  return re.compile(out)


def _find_prefix(keys, anchor: str, where: str) -> str:
  prefixes = sorted(k[:-len(anchor)] for k in keys if k.endswith(anchor)
                    and (k == anchor or k[-len(anchor) - 1] == '.'))
  if len(prefixes) != 1:
    raise ValueError(f'{where} should hold exactly one tensor named *{anchor} (the vision '
                     f'tower\'s patch embedding); found {prefixes or "none"}.')
  return prefixes[0]


def _assemble_vision(source, module: nn.Module, names: VisionNames, partial_load, strict: bool,
                     seed: int, leaf_fn: Callable | None = None,
                     placement: Placement | None = None) -> tuple[dict, LoadReport]:
  where = source.where
  cfg = module.cfg
  # host: shapes only, nothing on a device
  pixels = np.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), np.float32)
  init = lambda key: module.init(key, pixels)['params']
  shapes = trees.flatten(jax.eval_shape(init, jax.random.key(0)))
  keys = set(source.keys())
  prefix = _find_prefix(keys, names.anchor, where)
  patterns = [(_placeholder_regex(p, groups=True), hf) for p, hf in names.params.items()]

  def tensor_of(path):
    found = [(m, hf) for rx, hf in patterns if (m := rx.fullmatch(path))]
    if len(found) != 1:
      raise ValueError(f'The name map has no checkpoint tensor for the Flax parameter {path!r}; '
                       f'this config cannot be loaded from {where}.')
    match, (template, kind) = found[0]
    name_of = lambda i: prefix + template.format(layer=i, **match.groupdict())
    return name_of, '{layer}' in template, kind

  plan, missing = plan_leaves(shapes, source, tensor_of, LAYOUT, where)
  used = {k for slots, _, _ in plan.values() for k in slots if k is not None}
  known = [_placeholder_regex(hf, groups=False) for hf, _ in names.params.values()]
  unused = [re.compile(p) for p in names.unused]
  unexpected, skipped, outside = [], 0, 0
  for key in sorted(keys - used):
    if not key.startswith(prefix):
      outside += 1  # another tower, a head, a classifier
      continue
    rel = key[len(prefix):]
    if any(p.fullmatch(rel) for p in unused):
      continue
    if any(p.fullmatch(rel) for p in known):
      skipped += 1  # layers or a final norm past feature_layer
      continue
    unexpected.append(key)
  log.info('%s: vision tower at prefix %r; %d tensors outside it ignored, %d past the feature '
           'layer skipped.', where, prefix, outside, skipped)
  report = LoadReport(tuple(missing), tuple(unexpected))
  check_report(report, where, partial_load, strict, what='vision encoder')
  return fill_leaves(plan, shapes, source, LAYOUT, init, seed, cfg.param_dtype, where,
                     leaf_fn, placement), report
