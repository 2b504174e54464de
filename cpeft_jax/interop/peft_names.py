"""Where our projections live in transformers' decoder layers, and PEFT's names for them.

Our decoders fuse differently from transformers' (one gate+up projection of ours is two Llama
modules; GPT-2's c_attn is our q, k and v): `pieces` maps one of our projections to the
columns of the modules it occupies, and the rest names those modules as PEFT does
(target_modules, rank_pattern / alpha_pattern keys, safetensors keys per layer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from cpeft_jax.models.decoder_config import DecoderConfig

# Per architecture: PEFT's key of decoder layer i (PeftModelForCausalLM around transformers'
# *ForCausalLM); transformers' module paths inside a layer come from `pieces`.
PEFT_LAYER = {'llama': 'base_model.model.model.layers.{layer}.',
              'gpt2': 'base_model.model.transformer.h.{layer}.',
              'opt': 'base_model.model.model.decoder.layers.{layer}.'}
_PEFT_MODEL = 'base_model.model.'
_ALL = slice(None)


class Piece(NamedTuple):
  """Output columns `ours` of our projection `path` are the columns `theirs` of transformers'
  module `module` (its path inside a decoder layer, e.g. 'self_attn.q_proj')."""
  path: str
  ours: slice
  module: str
  theirs: slice


def pieces(path: str, cfg: DecoderConfig) -> list[Piece]:
  """Where one of our projections lives in transformers' decoder layer.

  Two fusions differ between the two sides: our optional gate+up projection is two Llama
  modules (one of ours -> two of theirs, sharing A), and GPT-2's c_attn [D, 3D] is our q, k and
  v projections (three of ours -> one of theirs).
  """
  block, proj = path.split('/')
  if cfg.arch == 'gpt2':
    if proj in ('q_proj', 'k_proj', 'v_proj'):
      D, i = cfg.hidden_size, ('q_proj', 'k_proj', 'v_proj').index(proj)
      return [Piece(path, _ALL, 'attn.c_attn', slice(i * D, (i + 1) * D))]
    return [Piece(path, _ALL, f'{block}.{proj}', _ALL)]
  if cfg.arch == 'opt':
    return [Piece(path, _ALL, f'self_attn.{proj}' if block == 'attn' else proj, _ALL)]
  module = {'attn': 'self_attn', 'mlp': 'mlp'}[block]
  if proj == 'gate_up_proj':
    I = cfg.intermediate_size
    return [Piece(path, slice(0, I), 'mlp.gate_proj', _ALL),
            Piece(path, slice(I, 2 * I), 'mlp.up_proj', _ALL)]
  return [Piece(path, _ALL, f'{module}.{proj}', _ALL)]


def pieces_by_module(paths, cfg: DecoderConfig) -> dict[str, list[Piece]]:
  out = {}
  for path in paths:
    for piece in pieces(path, cfg):
      out.setdefault(piece.module, []).append(piece)
  return out


def module_width(module: str, cfg: DecoderConfig, own_width: int) -> int:
  """Output features of transformers' module (GPT-2's c_attn holds q, k and v)."""
  return 3 * cfg.hidden_size if (cfg.arch, module) == ('gpt2', 'attn.c_attn') else own_width


def covered_columns(parts: list[Piece], width: int) -> np.ndarray:
  """[width] bool: the module's output columns that one of our projections holds."""
  covered = np.zeros(width, bool)
  for part in parts:
    covered[part.theirs] = True
  return covered


def candidate_modules(cfg: DecoderConfig) -> list[str]:
  """Every module of a decoder layer that one of our adaptable projections lives in."""
  return sorted(pieces_by_module([p.name for p in cfg.projections()], cfg))


def target_names(modules, cfg: DecoderConfig) -> dict[str, str]:
  """PEFT target_modules naming `modules`: a module's own name ('q_proj', 'c_attn') where that
  selects exactly the chosen ones, else its path in the layer (GPT-2's 'attn.c_proj' apart
  from 'mlp.c_proj'). {module: name}."""
  modules, out = set(modules), {}
  for m in sorted(modules):
    short = m.rsplit('.', 1)[-1]
    same = {c for c in candidate_modules(cfg) if c.rsplit('.', 1)[-1] == short}
    out[m] = short if same <= modules else m
  return out


def module_key(cfg: DecoderConfig, layer: int, module: str) -> str:
  """The module's name in the base model, as PEFT matches target_modules and patterns."""
  return PEFT_LAYER[cfg.arch].format(layer=layer)[len(_PEFT_MODEL):] + module


def matched_modules(target_modules, cfg: DecoderConfig) -> list[str]:
  """The candidate modules that PEFT's target_modules selects (PEFT's own matching rule: a
  string is a full regex match, a list matches a name or a '.'-suffix), in any layer."""
  def hit(key):
    if isinstance(target_modules, str):
      return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith('.' + t) for t in target_modules)
  return sorted(m for m in candidate_modules(cfg)
                if any(hit(module_key(cfg, i, m)) for i in range(cfg.num_layers)))


def pattern_value(patterns: Mapping[str, Any] | None, key: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the key's end."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', key):
      return value
  return default
