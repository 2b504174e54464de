"""What a decoder is: its architecture, shape and numerics (`DecoderConfig`), checked on entry.

The config also names each architecture's adaptable projections (`PROJECTION_NAMES`,
`DecoderConfig.projections`), so that target selection, parameter accounting and checkpoint
name maps can work from a config alone, without building a module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cpeft_jax import adaptors, configlib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
ARCHS = ('llama', 'gpt2', 'opt')
ROPE_TYPES = ('default', 'linear', 'llama3')
# Feed-forward activations by Hugging Face name (gelu_new is GPT-2's tanh approximation).
ACTIVATIONS = {'silu': nn.silu, 'swish': nn.silu, 'relu': nn.relu,
               'gelu': lambda x: nn.gelu(x, approximate=False),
               'gelu_new': lambda x: nn.gelu(x, approximate=True),
               'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of the decoder. dtype is the compute dtype, param_dtype the base's.

  arch picks the block: 'llama' (RMSNorm, rotary, SwiGLU), 'gpt2' or 'opt' (learned positions,
  LayerNorm, biases, a two-layer MLP with `activation`). The rope_* fields are Llama's rotary
  scaling ('linear': positions / factor; 'llama3': Llama 3.1's per-frequency interpolation);
  max_positions .. embed_dim concern the learned-position decoders only.
  """
  arch: str = 'llama'
  vocab_size: int = 32000
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int | None = None  # None: as num_heads (no grouped-query attention)
  head_dim: int | None = None  # None: hidden_size // num_heads
  intermediate_size: int = 3072
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  fused_gate_up: bool = False
  residual_dropout: float = 0.0
  remat: bool = False
  # Layers as straight-line code (their parameters still stacked [num_layers, ...]). None: on
  # XLA:CPU computing in bf16/fp16 without remat, unless the traced step's mesh splits weights
  # over fsdp (llama._unroll_by_default). There the CPU's layer loop round-trips every value
  # through float32, which costs more than the longer compile (bench/: paper shape, bf16 train
  # step 1.2x faster on one core); in float32 the loop is as fast or faster and compiles
  # sooner. With remat the loop stays: XLA schedules unrolled layers' recomputation so that it
  # saves no memory (bench/: the same XLA peak with and without remat).
  unroll_layers: bool | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  rope_type: str = 'default'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_positions: int = 8192  # llama3 only
  max_positions: int = 1024  # size of the learned position table (gpt2, opt)
  layer_norm_eps: float = 1e-5  # gpt2, opt
  activation: str = 'silu'  # SwiGLU's gate for llama; the MLP's activation for gpt2/opt
  pre_norm: bool = True  # False: OPT-350m's post-norm blocks (do_layer_norm_before=false)
  embed_dim: int | None = None  # OPT's word_embed_proj_dim where it differs from hidden_size

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f'model.arch={self.arch!r}; expected one of {ARCHS}.')
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f'model.{name} must be a positive integer, got {v!r}.')
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f'model.hidden_size={self.hidden_size} is not divisible by '
                       f'model.num_heads={self.num_heads}; set model.head_dim.')
    if self.num_heads % self.kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must be a multiple of '
                       f'model.num_kv_heads={self.kv_heads}.')
    if self.arch == 'llama':
      self._check_llama()
    else:
      self._check_learned()
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'model.{name}={getattr(self, name)!r}; expected one of {list(DTYPES)}.')
    if not 0.0 <= self.residual_dropout < 1.0:
      raise ValueError(f'model.residual_dropout must be in [0, 1), got {self.residual_dropout}.')

  def _check_llama(self):
    if self.dims % 2:
      raise ValueError(f'head_dim={self.dims} must be even for rotary embeddings.')
    if self.activation not in ('silu', 'swish'):
      raise ValueError(f"model.activation={self.activation!r}; arch 'llama' is SwiGLU ('silu').")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'model.rope_type={self.rope_type!r}; expected one of {ROPE_TYPES}.')
    if self.rope_factor <= 0:
      raise ValueError(f'model.rope_factor must be positive, got {self.rope_factor}.')
    if self.rope_type == 'llama3' and not self.rope_high_freq_factor > self.rope_low_freq_factor:
      raise ValueError(f'model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed '
                       f'model.rope_low_freq_factor={self.rope_low_freq_factor}.')
    if not self.pre_norm or self.embed_dim is not None:
      raise ValueError("model.pre_norm=False and model.embed_dim are for arch 'opt' only.")

  def _check_learned(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation={self.activation!r}; expected one of '
                       f'{list(ACTIVATIONS)}.')
    if self.num_kv_heads not in (None, self.num_heads) or self.fused_gate_up:
      raise ValueError(f'model.arch={self.arch!r} has no grouped-query attention or gate '
                       'projection (num_kv_heads, fused_gate_up are for llama).')
    if self.rope_type != 'default':
      raise ValueError(f'model.arch={self.arch!r} has learned positions, not rope_type.')
    if not isinstance(self.max_positions, int) or self.max_positions < 1:
      raise ValueError(f'model.max_positions must be a positive integer, got '
                       f'{self.max_positions!r}.')
    if self.arch == 'gpt2' and (not self.pre_norm or self.embed_dim is not None):
      raise ValueError("model.pre_norm=False and model.embed_dim are for arch 'opt' only.")

  @property
  def embed_width(self) -> int:
    """Width of the token embedding table (OPT may project it in and out of hidden_size)."""
    return self.embed_dim or self.hidden_size

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DecoderConfig:
    return configlib.config_from_dict(cls, d, 'model')

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dims(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def projections(self) -> tuple[adaptors.Projection, ...]:
    """The adaptable projections of one block, for target selection (A/F presets, globs).

    Names follow each architecture's own (GPT-2's fused c_attn is split into q/k/v_proj).
    """
    P = adaptors.Projection
    out, up, down = PROJECTION_NAMES[self.arch]
    attn = (P('attn/q_proj', 'A'), P('attn/k_proj', 'A', 'out'), P('attn/v_proj', 'A', 'out'),
            P(f'attn/{out}', 'A'))
    if self.arch != 'llama':
      mlp = (P(f'mlp/{up}', 'F'),)
    elif self.fused_gate_up:
      mlp = (P('mlp/gate_up_proj', 'F'),)
    else:
      mlp = (P('mlp/gate_proj', 'F'), P('mlp/up_proj', 'F'))
    return attn + mlp + (P(f'mlp/{down}', 'F', 'in'),)


# Per architecture: the attention output projection, the MLP's up and down projections.
PROJECTION_NAMES = {'llama': ('o_proj', 'up_proj', 'down_proj'),
                    'gpt2': ('c_proj', 'c_fc', 'c_proj'),
                    'opt': ('out_proj', 'fc1', 'fc2')}
