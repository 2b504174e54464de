"""Hugging Face vision checkpoints -> frozen Flax encoders, one name map per architecture.

A checkpoint is a directory (or a hub id already in the local Hugging Face cache: loading never
goes online) with config.json and model.safetensors or shards listed in
model.safetensors.index.json. config.json's model_type picks the architecture; the tower is
found inside any checkpoint that holds it (a bare vision model, a full CLIP/SigLIP model, an
image classifier) by the prefix of its patch-embedding tensor. Tensors are read one at a time
with safetensors.safe_open, after every shape has been checked. Tensors outside the tower (text
tower, heads, classifier) are ignored; tensors of layers past `feature_layer` are skipped;
anything else unused is reported as unexpected, and tensors the encoder needs but the checkpoint
lacks are reported missing and initialised fresh (`strict=True` turns either into an error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax.models import clip, siglip, swinv2
from cpeft_jax.models.llama import DTYPES
from cpeft_jax.models.vision import ViT

log = logging.getLogger(__name__)

CONFIG = 'config.json'
SAFETENSORS, SAFETENSORS_INDEX = 'model.safetensors', 'model.safetensors.index.json'

# How a PyTorch tensor becomes a Flax leaf. LINEAR: [out, in] -> [in, out]; CONV: [out, in, kh,
# kw] -> [kh, kw, in, out]; VECTOR: as is.
LINEAR, CONV, VECTOR = 'linear', 'conv', 'vector'
_LAYOUT = {LINEAR: (1, 0), CONV: (2, 3, 1, 0), VECTOR: None}


@dataclasses.dataclass(frozen=True)
class NameMap:
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


def _norm(flax_name: str, hf_name: str) -> dict[str, tuple[str, str]]:
  return {f'{flax_name}/scale': (f'{hf_name}.weight', VECTOR),
          f'{flax_name}/bias': (f'{hf_name}.bias', VECTOR)}


def _dense(flax_name: str, hf_name: str, bias: bool = True) -> dict[str, tuple[str, str]]:
  out = {f'{flax_name}/kernel': (f'{hf_name}.weight', LINEAR)}
  if bias:
    out[f'{flax_name}/bias'] = (f'{hf_name}.bias', VECTOR)
  return out


_VIT_LAYER = 'encoder.layers.{layer}.'
_VIT_LAYERS = {
    **_norm('layers/layer_norm1', _VIT_LAYER + 'layer_norm1'),
    **_norm('layers/layer_norm2', _VIT_LAYER + 'layer_norm2'),
    **{k: v for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj')
       for k, v in _dense(f'layers/{p}', _VIT_LAYER + f'self_attn.{p}').items()},
    **_dense('layers/fc1', _VIT_LAYER + 'mlp.fc1'),
    **_dense('layers/fc2', _VIT_LAYER + 'mlp.fc2'),
}
CLIP = NameMap(
    anchor='embeddings.patch_embedding.weight',
    params={
        'patch_embedding/kernel': ('embeddings.patch_embedding.weight', CONV),
        'class_embedding': ('embeddings.class_embedding', VECTOR),
        'position_embedding': ('embeddings.position_embedding.weight', VECTOR),
        **_norm('pre_layrnorm', 'pre_layrnorm'),
        **_VIT_LAYERS,
    },
    unused=(r'post_layernorm\..*', r'embeddings\.position_ids'))
SIGLIP = NameMap(
    anchor='embeddings.patch_embedding.weight',
    params={
        'patch_embedding/kernel': ('embeddings.patch_embedding.weight', CONV),
        'patch_embedding/bias': ('embeddings.patch_embedding.bias', VECTOR),
        'position_embedding': ('embeddings.position_embedding.weight', VECTOR),
        **_VIT_LAYERS,
        **_norm('post_layernorm', 'post_layernorm'),
    },
    unused=(r'head\..*', r'embeddings\.position_ids'))

_SWIN_BLOCK = 'encoder.layers.{stage}.blocks.{block}.'
_SWIN_PATH = 'stages_{stage}/blocks_{block}/'
SWINV2 = NameMap(
    anchor='embeddings.patch_embeddings.projection.weight',
    params={
        'patch_embed/kernel': ('embeddings.patch_embeddings.projection.weight', CONV),
        'patch_embed/bias': ('embeddings.patch_embeddings.projection.bias', VECTOR),
        **_norm('embed_norm', 'embeddings.norm'),
        **_dense(_SWIN_PATH + 'attn/query', _SWIN_BLOCK + 'attention.self.query'),
        **_dense(_SWIN_PATH + 'attn/key', _SWIN_BLOCK + 'attention.self.key', bias=False),
        **_dense(_SWIN_PATH + 'attn/value', _SWIN_BLOCK + 'attention.self.value'),
        _SWIN_PATH + 'attn/logit_scale': (_SWIN_BLOCK + 'attention.self.logit_scale', VECTOR),
        **_dense(_SWIN_PATH + 'attn/cpb_mlp_0',
                 _SWIN_BLOCK + 'attention.self.continuous_position_bias_mlp.0'),
        **_dense(_SWIN_PATH + 'attn/cpb_mlp_2',
                 _SWIN_BLOCK + 'attention.self.continuous_position_bias_mlp.2', bias=False),
        **_dense(_SWIN_PATH + 'attn/output', _SWIN_BLOCK + 'attention.output.dense'),
        **_norm(_SWIN_PATH + 'layernorm_before', _SWIN_BLOCK + 'layernorm_before'),
        **_dense(_SWIN_PATH + 'intermediate', _SWIN_BLOCK + 'intermediate.dense'),
        **_dense(_SWIN_PATH + 'output', _SWIN_BLOCK + 'output.dense'),
        **_norm(_SWIN_PATH + 'layernorm_after', _SWIN_BLOCK + 'layernorm_after'),
        **_dense('stages_{stage}/downsample/reduction',
                 'encoder.layers.{stage}.downsample.reduction', bias=False),
        **_norm('stages_{stage}/downsample/norm', 'encoder.layers.{stage}.downsample.norm'),
        **_norm('layernorm', 'layernorm'),
    },
    unused=(r'embeddings\.mask_token', r'.*\.relative_coords_table',
            r'.*\.relative_position_index'))


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a model_type loads as: its config converter, Flax module and name map."""
  config_from_hf: Any
  module: type[nn.Module]
  names: NameMap


ARCHITECTURES = {
    **{t: Architecture(clip.config_from_hf, ViT, CLIP) for t in clip.MODEL_TYPES},
    **{t: Architecture(siglip.config_from_hf, ViT, SIGLIP) for t in siglip.MODEL_TYPES},
    **{t: Architecture(swinv2.config_from_hf, swinv2.SwinV2, SWINV2) for t in swinv2.MODEL_TYPES},
}


class LoadReport(NamedTuple):
  """Tower tensors the encoder needed but did not find, and found but did not use."""
  missing: tuple[str, ...]
  unexpected: tuple[str, ...]


# ----------------------------------------------------------------------------- entry points


def load_vision(path_or_dir: str | os.PathLike, dtype: str = 'float32', feature_layer: int = -1,
                drop_cls: bool = True, *, strict: bool = False,
                seed: int = 0) -> tuple[nn.Module, dict]:
  """A frozen vision encoder and its 'params' tree, from a Hugging Face checkpoint.

  `dtype` is that of the weights and of the computation. `feature_layer` indexes transformers'
  `hidden_states` (-1: `last_hidden_state`; see models/vision.py and models/swinv2.py);
  `drop_cls` drops CLIP's class token and does nothing for encoders without one. Call it as
  `module.apply({'params': params}, pixels_BHWC)` -> [B, N, D].
  """
  directory = resolve(path_or_dir)
  hf = read_config(directory)
  overrides = dict(dtype=dtype, param_dtype=dtype, feature_layer=feature_layer)
  model_type = hf.get('model_type')
  if model_type in ARCHITECTURES and ARCHITECTURES[model_type].module is ViT:
    overrides['drop_cls'] = drop_cls
  module = vision_module(hf, **overrides)
  params, _ = load_params(directory, module, strict=strict, seed=seed)
  return module, params


def vision_module(hf: Mapping[str, Any], **overrides) -> nn.Module:
  """The Flax encoder a config.json dict describes; `overrides` set config fields."""
  arch = architecture(hf.get('model_type'))
  return arch.module(arch.config_from_hf(hf, **overrides))


def architecture(model_type) -> Architecture:
  if model_type not in ARCHITECTURES:
    raise ValueError(f'config.json has model_type={model_type!r}, which no Flax vision encoder '
                     f'loads; supported model types: {", ".join(ARCHITECTURES)}.')
  return ARCHITECTURES[model_type]


def resolve(path_or_id: str | os.PathLike) -> pathlib.Path:
  """A checkpoint directory: the path itself, or a hub id's snapshot in the local HF cache."""
  path = pathlib.Path(path_or_id).expanduser()
  if path.is_dir():
    return path
  text = str(path_or_id)
  if path.exists() or text.startswith(('/', '.', '~')) or text.count('/') > 1:
    raise FileNotFoundError(f'Checkpoint {text!r} is not a directory.')
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
  try:
    return pathlib.Path(snapshot_download(text, local_files_only=True))
  except (LocalEntryNotFoundError, HFValidationError) as e:
    raise FileNotFoundError(
        f'Checkpoint {text!r} is not a local directory and not in the local Hugging Face cache; '
        f'loading never downloads. Download it first (`hf download {text}`) or pass its '
        'directory.') from e


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'No {CONFIG} in checkpoint directory {directory}.')
  return json.loads(path.read_text())


def load_params(directory: str | os.PathLike, module: nn.Module, *, strict: bool = False,
                seed: int = 0) -> tuple[dict, LoadReport]:
  """The 'params' tree of `module` (in its param_dtype) from a checkpoint directory."""
  directory = resolve(directory)
  names = architecture(read_config(directory).get('model_type')).names
  with _Safetensors(_weight_files(directory)) as source:
    return _assemble(source, module, names, strict, seed, str(directory))


# ----------------------------------------------------------------------------- reading


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  if (directory / SAFETENSORS).is_file():
    return [directory / SAFETENSORS]
  if (directory / SAFETENSORS_INDEX).is_file():
    weight_map = json.loads((directory / SAFETENSORS_INDEX).read_text())['weight_map']
    files = [directory / f for f in dict.fromkeys(weight_map.values())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
      raise FileNotFoundError(f'{directory / SAFETENSORS_INDEX} lists shards that are not '
                              f'there: {absent}.')
    return files
  present = sorted(p.name for p in directory.iterdir())
  raise FileNotFoundError(f'No weights in {directory}: expected {SAFETENSORS} or '
                          f'{SAFETENSORS_INDEX}; found {present}.')


class _Safetensors:
  """Safetensors files read one tensor at a time (framework 'flax': numpy has no bfloat16)."""

  def __init__(self, files):
    from safetensors import safe_open
    self._file_of = {}
    with jax.default_device(jax.devices('cpu')[0]):
      for file in files:
        handle = safe_open(str(file), framework='flax')
        for key in handle.keys():
          self._file_of[key] = handle

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file_of.clear()

  def keys(self):
    return self._file_of.keys()

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self._file_of[key].get_slice(key).get_shape())

  def read(self, key) -> np.ndarray:
    with jax.default_device(jax.devices('cpu')[0]):
      return np.asarray(self._file_of[key].get_tensor(key))


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


def _assemble(source, module: nn.Module, names: NameMap, strict: bool, seed: int,
              where: str) -> tuple[dict, LoadReport]:
  cfg = module.cfg
  pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  init = lambda key: module.init(key, pixels)['params']
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0)), sep='/')
  keys = set(source.keys())
  prefix = _find_prefix(keys, names.anchor, where)
  patterns = [(_placeholder_regex(p, groups=True), hf) for p, hf in names.params.items()]

  # Plan every leaf, and check every shape, before reading a single tensor.
  plan, missing, mismatched = {}, [], []
  for path, leaf in shapes.items():
    found = [(m, hf) for rx, hf in patterns if (m := rx.fullmatch(path))]
    if len(found) != 1:
      raise ValueError(f'The name map has no checkpoint tensor for the Flax parameter {path!r}; '
                       f'this config cannot be loaded from {where}.')
    match, (template, kind) = found[0]
    stacked = '{layer}' in template
    want = tuple(leaf.shape[1:] if stacked else leaf.shape)
    if _LAYOUT[kind]:
      want = tuple(want[i] for i in np.argsort(_LAYOUT[kind]))
    slots = []
    for i in range(leaf.shape[0]) if stacked else [None]:
      key = prefix + template.format(layer=i, **match.groupdict())
      if key not in keys:
        missing.append(key)
        key = None
      elif source.shape(key) != want:
        mismatched.append(f'{key}: checkpoint {source.shape(key)}, model {want}')
      slots.append(key)
    plan[path] = (slots, stacked, kind)
  if mismatched:
    raise ValueError(f'Shape mismatch between {where} and the model config (nothing loaded):\n  '
                     + '\n  '.join(mismatched))

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
  _log_report(report, where, strict)

  fresh = {}
  if missing:  # Initialise only the leaves with missing tensors: the rest is dead code.
    needed = [p for p, (slots, _, _) in plan.items() if None in slots]
    fresh = jax.jit(lambda key: {p: flax.traverse_util.flatten_dict(init(key), sep='/')[p]
                                 for p in needed})(jax.random.key(seed))
  dtype = np.dtype(DTYPES[cfg.param_dtype])
  out = {}
  for path, (slots, stacked, kind) in plan.items():
    buf = np.empty(shapes[path].shape, dtype)
    for i, key in enumerate(slots):
      at = i if stacked else ...
      if key is None:
        buf[at] = np.asarray(fresh[path][at])
      else:
        x = source.read(key)
        buf[at] = x.transpose(_LAYOUT[kind]) if _LAYOUT[kind] else x
    out[path] = jnp.asarray(buf)
    del buf
  return flax.traverse_util.unflatten_dict(out, sep='/'), report


def _log_report(report: LoadReport, where: str, strict: bool):
  def brief(keys):
    return ', '.join(keys[:20]) + (f' and {len(keys) - 20} more' if len(keys) > 20 else '')
  problems = []
  if report.missing:
    problems.append(f'{len(report.missing)} tensor(s) missing from {where}, initialised fresh: '
                    f'{brief(report.missing)}')
  if report.unexpected:
    problems.append(f'{len(report.unexpected)} unexpected tensor(s) in {where}, not loaded: '
                    f'{brief(report.unexpected)}')
  if problems and strict:
    raise ValueError('Checkpoint does not match the vision encoder (strict=True): '
                     + '; '.join(problems) + '.')
  for p in problems:
    log.warning(p)
