"""Hugging Face config.json -> `DecoderConfig`, for the model types the decoder reproduces exactly.

Llama, Mistral and Qwen2 (and SmolLM, TinyLlama, which are model_type llama) share one block:
RMSNorm, rotary embeddings, grouped-query attention, SwiGLU. What the decoder does not implement
(rope scaling, sliding-window attention, an o_proj or MLP bias, another activation) is refused
here, where config.json enters, unless the config makes it inert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpeft_jax.models.llama import DecoderConfig

# Defaults of transformers' config classes for keys a config.json may omit (they decide what the
# PyTorch model computes, so they decide parity). Shape keys have no default: they must be given.
_DEFAULTS = {
    'llama': dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=2048, sliding_window=None, hidden_act='silu'),
    'mistral': dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    max_position_embeddings=4096 * 32, sliding_window=4096, hidden_act='silu'),
    'qwen2': dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  max_position_embeddings=32768, sliding_window=4096, hidden_act='silu',
                  use_sliding_window=False, max_window_layers=28),
}
MODEL_TYPES = tuple(_DEFAULTS)
_QKV_BIAS = {'llama': False, 'mistral': False, 'qwen2': True}  # Qwen2 always has q/k/v biases
_NULLABLE = ('sliding_window',)  # null: no sliding window (Mistral v0.2+)
_REQUIRED = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
             'intermediate_size')
# Rope types that compute plain rotary embeddings when their factor is 1.0.
_INERT_AT_FACTOR_1 = ('linear', 'llama3')


def decoder_config(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
  """The `DecoderConfig` of a config.json dict; `overrides` set other fields (dtype, remat, ...)."""
  model_type = hf.get('model_type')
  if model_type not in _DEFAULTS:
    raise ValueError(f'config.json has model_type={model_type!r}, which the Flax decoder cannot '
                     f'load; supported model types: {", ".join(MODEL_TYPES)} (SmolLM and '
                     f'TinyLlama are llama).')
  def get(key):  # null means "the default", except where null has a meaning of its own
    if hf.get(key) is not None or (key in _NULLABLE and key in hf):
      return hf[key]
    return _DEFAULTS[model_type].get(key)

  missing = [k for k in _REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f'config.json ({model_type}) lacks {missing}; expected all of {_REQUIRED}.')
  act = get('hidden_act')
  if act not in ('silu', 'swish'):
    raise ValueError(f'config.json has hidden_act={act!r}; the decoder implements SwiGLU '
                     "(hidden_act 'silu') only.")
  if hf.get('mlp_bias'):
    raise ValueError('config.json has mlp_bias=true; the decoder has no MLP biases.')
  if model_type != 'qwen2' and hf.get('attention_bias'):
    raise ValueError(f'config.json ({model_type}) has attention_bias=true (biases on q/k/v and '
                     'o_proj); the decoder supports q/k/v biases only (as Qwen2).')
  _check_sliding_window(hf, model_type, get)
  theta = _rope_theta(hf, model_type, get)
  head_dim = hf.get('head_dim')
  if head_dim == hf['hidden_size'] // hf['num_attention_heads']:
    head_dim = None  # the decoder's default; one config per model, however config.json spells it
  kv_heads = hf.get('num_key_value_heads')
  if kv_heads == hf['num_attention_heads']:
    kv_heads = None
  fields = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      num_kv_heads=kv_heads, head_dim=head_dim,
      intermediate_size=hf['intermediate_size'], rope_theta=float(theta),
      rms_norm_eps=float(get('rms_norm_eps')), qkv_bias=_QKV_BIAS[model_type],
      tie_embeddings=bool(get('tie_word_embeddings')))
  fields.update(overrides)
  return DecoderConfig.from_dict(fields)


def _rope_theta(hf, model_type, get) -> float:
  """The rotary base, from transformers 5's rope_parameters or the older rope_theta/rope_scaling.

  Rope scaling changes the frequencies the decoder computes, so any scaling that is not inert
  (type 'default', or 'linear'/'llama3' with factor 1.0) is refused.
  """
  params = dict(hf.get('rope_parameters') or {})
  if params and all(isinstance(v, Mapping) for v in params.values()):
    distinct = {tuple(sorted(v.items())) for v in params.values()}  # per layer type (Gemma-like)
    if len(distinct) > 1:
      raise ValueError(f'config.json ({model_type}) has different rope_parameters per layer '
                       f'type {params}; the decoder uses one rotary embedding for all layers.')
    params = dict(next(iter(params.values())))
  scaling = dict(hf.get('rope_scaling') or {})
  rope = {**scaling, **params}
  kind = rope.get('rope_type') or rope.get('type') or 'default'
  factor = rope.get('factor')
  if kind != 'default' and not (kind in _INERT_AT_FACTOR_1 and factor == 1.0):
    raise ValueError(
        f'config.json ({model_type}) uses rope scaling {kind!r} (factor={factor}), which the '
        "decoder does not implement; it loads rope type 'default', or 'linear'/'llama3' with "
        'factor 1.0, where the scaling is inert.')
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1.0):
    raise ValueError(f'config.json ({model_type}) has partial_rotary_factor={partial}; the '
                     'decoder rotates the whole head (1.0).')
  theta = rope.get('rope_theta', hf.get('rope_theta'))
  return get('rope_theta') if theta is None else theta


def _check_sliding_window(hf, model_type, get):
  """Refuses sliding-window attention unless no layer uses it or the window covers every position.

  Mistral slides in every layer when sliding_window is set; Qwen2 only with use_sliding_window,
  in the layers from max_window_layers on (or those listed as 'sliding_attention').
  """
  window = get('sliding_window')
  if model_type == 'qwen2' and not get('use_sliding_window'):
    window = None
  if window is None:
    return
  layers = hf['num_hidden_layers']
  types = hf.get('layer_types')
  if types is None:
    first = get('max_window_layers') if model_type == 'qwen2' else 0
    types = ['sliding_attention' if i >= first else 'full_attention' for i in range(layers)]
  sliding = [i for i, t in enumerate(types) if t == 'sliding_attention']
  max_pos = get('max_position_embeddings')
  if sliding and window < max_pos:
    raise ValueError(
        f'config.json ({model_type}) has sliding_window={window} < max_position_embeddings='
        f'{max_pos} in layers {sliding}; the decoder attends over the full causal context, so it '
        'would differ from the checkpoint beyond the window. A config is accepted where the '
        'window is inert: sliding_window null (Mistral v0.2+), use_sliding_window false (Qwen2), '
        'or a window >= max_position_embeddings.')
