"""Hugging Face config.json -> `DecoderConfig`, for the model types the decoders reproduce exactly.

Llama, Mistral and Qwen2 (and SmolLM, TinyLlama, which are model_type llama) share one block:
RMSNorm, rotary embeddings (plain, or 'linear'/'llama3' scaled), grouped-query attention,
SwiGLU. GPT-2 and OPT are the learned-position decoders (arch 'gpt2' and 'opt'). What the
decoders do not implement (other rope scaling, sliding-window attention, an o_proj or MLP bias,
GPT-2's per-layer attention scaling, OPT without biases ...) is refused here, where config.json
enters, unless the config makes it inert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cpeft_jax.models.decoder_config import DecoderConfig

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
LLAMA_TYPES = tuple(_DEFAULTS)
MODEL_TYPES = LLAMA_TYPES + ('gpt2', 'opt')
_QKV_BIAS = {'llama': False, 'mistral': False, 'qwen2': True}  # Qwen2 always has q/k/v biases
_NULLABLE = ('sliding_window',)  # null: no sliding window (Mistral v0.2+)
_REQUIRED = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
             'intermediate_size')
# transformers' defaults of GPT2Config / OPTConfig for the keys that change what is computed.
_GPT2_DEFAULTS = dict(activation_function='gelu_new', layer_norm_epsilon=1e-5,
                      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                      add_cross_attention=False, tie_word_embeddings=True, n_inner=None)
_OPT_DEFAULTS = dict(activation_function='relu', do_layer_norm_before=True,
                     _remove_final_layer_norm=False, enable_bias=True,
                     layer_norm_elementwise_affine=True, tie_word_embeddings=True,
                     word_embed_proj_dim=None, max_position_embeddings=2048)


def decoder_config(hf: Mapping[str, Any], **overrides) -> DecoderConfig:
  """The `DecoderConfig` of a config.json dict; `overrides` set other fields (dtype, remat, ...)."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'config.json has model_type={model_type!r}, which the Flax decoders cannot '
                     f'load; supported model types: {", ".join(MODEL_TYPES)} (SmolLM and '
                     f'TinyLlama are llama).')
  fields = {'gpt2': _gpt2, 'opt': _opt}.get(model_type, _llama)(hf, model_type)
  fields.update(overrides)
  return DecoderConfig.from_dict(fields)


def _required(hf, model_type, keys):
  missing = [k for k in keys if hf.get(k) is None]
  if missing:
    raise ValueError(f'config.json ({model_type}) lacks {missing}; expected all of {keys}.')


def _gpt2(hf, model_type) -> dict[str, Any]:
  get = lambda key: _GPT2_DEFAULTS[key] if hf.get(key) is None else hf[key]
  _required(hf, model_type, ('vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head'))
  if not get('scale_attn_weights') or get('scale_attn_by_inverse_layer_idx'):
    raise ValueError('config.json (gpt2) has scale_attn_weights=false or '
                     'scale_attn_by_inverse_layer_idx=true; the decoder scales attention by '
                     '1/sqrt(head_dim) only.')
  if get('add_cross_attention'):
    raise ValueError('config.json (gpt2) has add_cross_attention=true; the decoder has no '
                     'cross-attention.')
  if not get('tie_word_embeddings'):
    raise ValueError('config.json (gpt2) has tie_word_embeddings=false; GPT-2 ties its LM '
                     'head to the token embeddings.')
  D = hf['n_embd']
  return dict(arch='gpt2', vocab_size=hf['vocab_size'], hidden_size=D,
              num_layers=hf['n_layer'], num_heads=hf['n_head'],
              intermediate_size=get('n_inner') or 4 * D, max_positions=hf['n_positions'],
              layer_norm_eps=float(get('layer_norm_epsilon')),
              activation=get('activation_function'), tie_embeddings=True)


def _opt(hf, model_type) -> dict[str, Any]:
  get = lambda key: _OPT_DEFAULTS[key] if hf.get(key) is None else hf[key]
  _required(hf, model_type, ('vocab_size', 'hidden_size', 'num_hidden_layers',
                             'num_attention_heads', 'ffn_dim'))
  if not get('enable_bias') or not get('layer_norm_elementwise_affine'):
    raise ValueError('config.json (opt) has enable_bias=false or '
                     'layer_norm_elementwise_affine=false; the decoder has biases and affine '
                     'LayerNorms (as every released OPT).')
  pre_norm = bool(get('do_layer_norm_before'))
  if pre_norm and get('_remove_final_layer_norm'):
    raise ValueError('config.json (opt) has _remove_final_layer_norm=true with '
                     'do_layer_norm_before=true; the decoder keeps the final LayerNorm there.')
  embed_dim = get('word_embed_proj_dim')
  return dict(arch='opt', vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
              num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
              intermediate_size=hf['ffn_dim'], max_positions=get('max_position_embeddings'),
              activation=get('activation_function'), pre_norm=pre_norm,
              embed_dim=None if embed_dim in (None, hf['hidden_size']) else embed_dim,
              tie_embeddings=bool(get('tie_word_embeddings')))


def _llama(hf, model_type) -> dict[str, Any]:
  def get(key):  # null means "the default", except where null has a meaning of its own
    if hf.get(key) is not None or (key in _NULLABLE and key in hf):
      return hf[key]
    return _DEFAULTS[model_type].get(key)

  _required(hf, model_type, _REQUIRED)
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
  rope = _rope(hf, model_type, get)
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
      intermediate_size=hf['intermediate_size'],
      rms_norm_eps=float(get('rms_norm_eps')), qkv_bias=_QKV_BIAS[model_type],
      tie_embeddings=bool(get('tie_word_embeddings')), **rope)
  return fields


def _rope(hf, model_type, get) -> dict[str, Any]:
  """The rotary fields (base and scaling), from transformers 5's rope_parameters or the older
  rope_theta/rope_scaling. Scaling types other than 'linear' and 'llama3' are refused.
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
  if kind not in ('default', 'linear', 'llama3'):
    raise ValueError(
        f'config.json ({model_type}) uses rope scaling {kind!r} (factor={factor}), which the '
        "decoder does not implement; it loads rope types 'default', 'linear' and 'llama3'.")
  out = {}
  if kind != 'default':
    if factor is None:
      raise ValueError(f'config.json ({model_type}) has rope scaling {kind!r} without a factor.')
    out = dict(rope_type=kind, rope_factor=float(factor))
  if kind == 'llama3':
    keys = ('low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
    absent = [k for k in keys if rope.get(k) is None]
    if absent:
      raise ValueError(f"config.json ({model_type}) has rope scaling 'llama3' without {absent}.")
    out.update(rope_low_freq_factor=float(rope['low_freq_factor']),
               rope_high_freq_factor=float(rope['high_freq_factor']),
               rope_original_max_positions=int(rope['original_max_position_embeddings']))
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1.0):
    raise ValueError(f'config.json ({model_type}) has partial_rotary_factor={partial}; the '
                     'decoder rotates the whole head (1.0).')
  theta = rope.get('rope_theta', hf.get('rope_theta'))
  out['rope_theta'] = float(get('rope_theta') if theta is None else theta)
  return out


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
