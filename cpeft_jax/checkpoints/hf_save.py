"""Flax trees -> Hugging Face checkpoints: the loaders' name maps read backwards.

`save_decoder` writes a Llama, GPT-2 or OPT checkpoint (config.json + model.safetensors) that
transformers' PyTorch models and decoder.load_decoder both read; `save_vision` writes a CLIP
vision tower. Both write to a temporary directory and swap it in (io.swap_in), so an interrupted
save leaves no half-written checkpoint. safetensors and transformers are imported inside the
writers, deliberately: only writing needs them.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cpeft_jax import trees
from cpeft_jax.checkpoints.decoder import NAME_MAPS, DecoderNames
from cpeft_jax.checkpoints.io import CONFIG, LINEAR, SAFETENSORS, swap_in
from cpeft_jax.checkpoints.tensors import Concat, Split
from cpeft_jax.checkpoints import vision
from cpeft_jax.models.llama import DecoderConfig
from cpeft_jax.models.vision import ViTConfig

# ----------------------------------------------------------------------------- decoders


def save_decoder(directory: str | os.PathLike, cfg: DecoderConfig, params,
                 tokenizer=None) -> pathlib.Path:
  """Writes a Hugging Face checkpoint (config.json + model.safetensors) of `params`.

  The inverse of `decoder.load_decoder_params`: a Llama checkpoint for arch 'llama', GPT-2 or
  OPT for theirs; transformers' PyTorch models and this project's loader both read it. Written
  to a temporary name and renamed, so an interrupted save leaves no half-written checkpoint.
  Fused pieces go back to transformers' layout (gate+up split, GPT-2's q/k/v joined into
  c_attn).
  """
  import safetensors.numpy  # the writers' own dependencies, imported when they write
  if cfg.arch == 'llama' and cfg.qkv_bias:
    raise ValueError('save_decoder writes Llama checkpoints, which have no q/k/v biases; '
                     'this decoder has qkv_bias=True.')
  hf = _hf_config(cfg, tokenizer)
  directory = pathlib.Path(directory)
  tmp = directory.with_name(directory.name + '.tmp')
  tmp.mkdir(parents=True, exist_ok=True)
  flat = trees.flatten(params)
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
  tensors = _checkpoint_tensors(flat, NAME_MAPS[hf.model_type], cfg.num_layers)
  safetensors.numpy.save_file(tensors, str(tmp / SAFETENSORS), metadata={'format': 'pt'})
  hf.to_json_file(str(tmp / CONFIG))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
  return swap_in(tmp, directory)


def _checkpoint_tensors(flat: dict[str, np.ndarray], names: DecoderNames,
                        num_layers: int) -> dict[str, np.ndarray]:
  """Flax leaves -> transformers' tensors by the name map read backwards (consumes `flat`)."""
  tensors, pieces = {}, {}
  for path, (spec, kind) in names.params.items():
    if path not in flat:
      continue
    value = flat.pop(path)
    if isinstance(spec, Concat):  # equal parts along the leaf's output axis
      parts = zip(spec.names, np.split(value, len(spec.names), axis=-1))
    elif isinstance(spec, Split):  # joined below, once every piece is there
      pieces.setdefault((spec.name, spec.parts), {})[spec.index] = (value, kind)
      continue
    else:
      parts = [(spec, value)]
    for name, v in parts:
      tensors.update(_per_layer(name, v, kind, num_layers))
  for (name, parts), got in pieces.items():
    if sorted(got) != list(range(parts)):
      raise ValueError(f'save_decoder has only pieces {sorted(got)} of {name} (of {parts}).')
    kind = got[0][1]
    value = np.concatenate([got[i][0] for i in range(parts)], axis=-1)
    tensors.update(_per_layer(name, value, kind, num_layers))
  if flat:
    raise ValueError(f'save_decoder has no checkpoint name for {sorted(flat)}.')
  return tensors


def _per_layer(name: str, value: np.ndarray, kind: str, num_layers: int):
  values = [value[i] for i in range(num_layers)] if '{layer}' in name else [value]
  return {name.format(layer=i): np.ascontiguousarray(v.T if kind == LINEAR else v)
          for i, v in enumerate(values)}


def _hf_config(cfg: DecoderConfig, tokenizer=None):
  """transformers' config of `cfg` (the inverse of hf_configs.decoder_config)."""
  import transformers
  ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id)
  if cfg.arch == 'gpt2':
    hf = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
        activation_function=cfg.activation, layer_norm_epsilon=cfg.layer_norm_eps,
        tie_word_embeddings=True, **ids)
    hf.architectures = ['GPT2LMHeadModel']
  elif cfg.arch == 'opt':
    if cfg.layer_norm_eps != 1e-5:
      raise ValueError(f'save_decoder writes OPT checkpoints, whose LayerNorms have eps 1e-5; '
                       f'this decoder has layer_norm_eps={cfg.layer_norm_eps}.')
    hf = transformers.OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        ffn_dim=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
        activation_function=cfg.activation, do_layer_norm_before=cfg.pre_norm,
        word_embed_proj_dim=cfg.embed_dim or cfg.hidden_size,
        tie_word_embeddings=cfg.tie_embeddings, **ids)
    hf.architectures = ['OPTForCausalLM']
  else:
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.dims,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        **({} if cfg.rope_type == 'default' else {'rope_scaling': _rope_scaling(cfg)}), **ids)
    hf.architectures = ['LlamaForCausalLM']
  return hf


def _rope_scaling(cfg: DecoderConfig) -> dict[str, Any]:
  """transformers' rope_scaling dict of a scaled rotary embedding."""
  out = {'rope_type': cfg.rope_type, 'factor': cfg.rope_factor}
  if cfg.rope_type == 'llama3':
    out.update(low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_positions)
  return out


# ----------------------------------------------------------------------------- vision towers

# model_type -> (transformers config class, architecture name, tensor-name prefix) of the towers
# save_vision writes; the layout of each tensor is the inverse of the loader's.
_SAVERS = {'clip_vision_model': ('CLIPVisionConfig', 'CLIPVisionModel', 'vision_model.')}


def save_vision(directory: str | os.PathLike, cfg: ViTConfig, params, *,
                extra: Mapping[str, Any] | None = None, processor=None) -> str:
  """Writes a Hugging Face CLIPVisionModel checkpoint (config.json + model.safetensors) of a
  CLIP-style `ViT`'s 'params'; the inverse of `vision.load_vision` through the same name map.

  `extra` holds tensors the encoder does not compute, by HF name relative to the tower (e.g.
  'post_layernorm.weight' of a pooled-token head); CLIP's post_layernorm is written as the
  identity when absent, so transformers loads the file with no missing weights. `processor`
  (a transformers image processor) is saved beside it as preprocessor_config.json. Written to a
  temporary name and renamed, so an interrupted save leaves no half-written checkpoint.
  """
  import safetensors.numpy  # the writers' own dependencies, imported when they write
  import transformers
  if not (cfg.class_token and not cfg.patch_bias and cfg.pre_norm and not cfg.final_norm):
    raise ValueError('save_vision writes CLIP vision towers (class token, no patch bias, '
                     f'pre_layrnorm, no final norm); got {cfg}.')
  config_cls, arch_name, prefix = _SAVERS['clip_vision_model']
  names = vision.CLIP
  flat = trees.flatten(params)
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
  if cfg.run_layers != cfg.num_layers:
    raise ValueError(f'save_vision needs every layer; this ViT runs {cfg.run_layers} of '
                     f'{cfg.num_layers} (feature_layer={cfg.feature_layer}).')
  tensors = {}
  for path, (hf_name, kind) in names.params.items():
    if path not in flat:
      raise ValueError(f'save_vision: the params lack {path!r} (checkpoint name {hf_name}).')
    value = flat.pop(path)
    # The loader permutes a torch tensor by vision.LAYOUT[kind]; the inverse undoes it.
    inverse = tuple(np.argsort(vision.LAYOUT[kind])) if kind in vision.LAYOUT else None
    values = list(value) if '{layer}' in hf_name else [value]
    for i, v in enumerate(values):
      tensors[prefix + hf_name.format(layer=i)] = np.ascontiguousarray(
          v if inverse is None else v.transpose(inverse))
  if flat:
    raise ValueError(f'save_vision has no checkpoint name for {sorted(flat)}.')
  D = cfg.hidden_size
  head = {'post_layernorm.weight': np.ones(D, np.float32),
          'post_layernorm.bias': np.zeros(D, np.float32)}
  head.update({k: np.asarray(jax.device_get(v), np.float32) for k, v in (extra or {}).items()})
  tensors.update({prefix + k: np.ascontiguousarray(v) for k, v in head.items()})

  directory = pathlib.Path(directory)
  tmp = directory.with_name(directory.name + '.tmp')
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  safetensors.numpy.save_file(tensors, str(tmp / SAFETENSORS), metadata={'format': 'pt'})
  hf = getattr(transformers, config_cls)(
      hidden_size=D, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels,
      image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
      layer_norm_eps=cfg.layer_norm_eps)
  hf.architectures = [arch_name]
  hf.to_json_file(str(tmp / CONFIG))
  if processor is not None:
    processor.save_pretrained(str(tmp))
  return str(swap_in(tmp, directory))
