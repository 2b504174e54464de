"""PyTorch PEFT's LoRA adapter format, both ways, for one context's LoRA (or DoRA) group.

A context's LoRA group is an ordinary LoRA, so it can leave as one: `export_peft` writes
adapter_config.json + adapter_model.safetensors in PEFT's own names (PeftModel.from_pretrained
loads them onto the same base), and `import_peft` reads such an adapter into one row of a
model's tables. All three decoder families go both ways (Llama, GPT-2, OPT); peft_names.py
says where each of our projections lives in transformers' modules.

Table layout (see adaptors/): under the decoder's layer scan every table has a leading layer
axis, lora_a [N, R, d_in, r], lora_b [N, R, r, d_out], ia3 / bitfit [N, R, d].
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from cpeft_jax import adaptors, trees
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.interop.peft_names import (PEFT_LAYER, Piece, candidate_modules, covered_columns,
                                          matched_modules, module_key, module_width,
                                          pattern_value, pieces, pieces_by_module, target_names)
from cpeft_jax.models.decoder_config import DecoderConfig

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def lora_targets(cfg: DecoderConfig, peft: PeftConfig) -> list[str]:
  """The block paths ('attn/q_proj', ...) that carry the LoRA tables (LoRA or DoRA)."""
  targets = adaptors.resolve_targets(peft, cfg.projections())
  return sorted(name for name, a in targets.items() if a.lora or getattr(a, 'dora', False))


def _check_arch(cfg: DecoderConfig, what: str):
  arch = getattr(cfg, 'arch', 'llama')
  if arch not in PEFT_LAYER:
    raise ValueError(f'{what} knows the module names of {sorted(PEFT_LAYER)}; this decoder has '
                     f'arch={arch!r}.')


# ----------------------------------------------------------------------------- PEFT export


def export_peft(directory: str | os.PathLike, tables, cfg: DecoderConfig, peft: PeftConfig,
                context: int = 0, *, base_model_name_or_path: str | None = None
                ) -> pathlib.Path:
  """Writes context `context`'s LoRA (or DoRA) group as a PyTorch PEFT adapter (CAUSAL_LM).

  Only LoRA and DoRA have a place in that format: a context that also carries IA3 or BitFit
  is an error rather than a silently partial export. Where several of our projections are one
  transformers module (GPT-2's c_attn = q, k, v), their LoRAs become one of rank k*r: A stacks
  their A's and B is block-diagonal, which computes exactly the sum of the parts; the module
  gets that rank in rank_pattern and the alpha that keeps our scale in alpha_pattern. If their
  A's are equal (an adapter imported from PEFT), it stays rank r with the shared A.
  """
  _check_arch(cfg, 'export_peft')
  methods, lo = peft.context_spec(context)
  if tuple(methods) not in (('lora',), ('dora',)):
    raise ValueError(f'export_peft writes a LoRA or DoRA adapter; context {context} has methods '
                     f'{methods} ({[m for m in methods if m not in ("lora", "dora")] or "no lora"}'
                     ' cannot be expressed as PEFT LoRA).')
  dora = methods == ('dora',)
  row = peft.row_of(context)
  flat = trees.flatten(tables)
  table = lambda path, name: np.asarray(flat[f'layers/{path}/{name}'][:, row], np.float32)
  by_module = pieces_by_module(lora_targets(cfg, peft), cfg)
  names = target_names(by_module, cfg)
  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for module, parts in by_module.items():
    rank = _write_module(tensors, table, module, parts, cfg, lo.rank, dora)
    if rank != lo.rank:
      rank_pattern[names[module]] = rank
      alpha_pattern[names[module]] = lo.scale * (math.sqrt(rank) if lo.rslora else rank)
  config = _adapter_config(cfg, lo, sorted(set(names.values())), dora, rank_pattern,
                           alpha_pattern, base_model_name_or_path)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  return directory


def _write_module(tensors: dict, table, module: str, parts: list[Piece], cfg: DecoderConfig,
                  r: int, dora: bool) -> int:
  """Adds transformers module `module`'s lora_A, lora_B (and DoRA magnitude) of every layer to
  `tensors`, from our projections' rows (`table(path, name)`: [N, ...]); returns its rank."""
  paths = list(dict.fromkeys(p.path for p in parts))
  a = {p: table(p, 'lora_a')[..., :r] for p in paths}  # [N, D, r]
  b = {p: table(p, 'lora_b')[:, :r] for p in paths}  # [N, r, E]
  blocks = paths[:1] if all(np.array_equal(a[p], a[paths[0]]) for p in paths) else paths
  rank = r * len(blocks)
  width = module_width(module, cfg, b[parts[0].path][0][:, parts[0].ours].shape[1])
  if dora and not covered_columns(parts, width).all():
    raise ValueError(f'DoRA on {module} covers only some of its outputs (the model adapts '
                     f'{paths}); its magnitude cannot be written for the rest.')
  for i in range(cfg.num_layers):
    key = PEFT_LAYER[cfg.arch].format(layer=i) + module
    b_Er = np.zeros((width, rank), np.float32)
    for part in parts:
      j = blocks.index(part.path) if part.path in blocks else 0
      b_Er[part.theirs, j * r:(j + 1) * r] = b[part.path][i][:, part.ours].T
    tensors[f'{key}.lora_A.weight'] = np.ascontiguousarray(
        np.concatenate([a[p][i].T for p in blocks], axis=0))  # [rank, d_in]
    tensors[f'{key}.lora_B.weight'] = b_Er  # [d_out, rank]
    if dora:  # the magnitude: one per output column, so fused pieces split exactly
      m_E = np.zeros(width, np.float32)
      for part in parts:
        m_E[part.theirs] = table(part.path, 'dora_m')[i][part.ours]
      tensors[f'{key}.lora_magnitude_vector'] = m_E
  return rank


def _adapter_config(cfg: DecoderConfig, lo: adaptors.LoraConfig, target_modules: list[str],
                    dora: bool, rank_pattern: dict, alpha_pattern: dict,
                    base_model_name_or_path: str | None) -> dict[str, Any]:
  """adapter_config.json of an exported LoRA (or DoRA) adapter."""
  return {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lo.rank, 'lora_alpha': lo.alpha,
      'use_rslora': lo.rslora, 'lora_dropout': lo.dropout,
      'target_modules': target_modules, 'bias': 'none', 'use_dora': dora,
      # GPT-2's modules are Conv1D (weight [d_in, d_out]); lora_A/B are Linear either way.
      'fan_in_fan_out': cfg.arch == 'gpt2', 'modules_to_save': None,
      'init_lora_weights': True, 'inference_mode': True, 'rank_pattern': rank_pattern,
      'alpha_pattern': alpha_pattern, 'layers_to_transform': None,
      'base_model_name_or_path': base_model_name_or_path,
  }


# ----------------------------------------------------------------------------- PEFT import

# adapter_config.json options we can represent, with the only accepted values. fan_in_fan_out
# is free: it says how the base weight is stored (GPT-2's Conv1D), not lora_A/B, and PEFT
# resets it per layer type; rank_pattern/alpha_pattern are read per module.
_MUST_BE = {'bias': ('none', None), 'modules_to_save': (None, []),
            'layers_to_transform': (None, []),
            'layers_pattern': (None, [], ''), 'megatron_config': (None,),
            'use_qalora': (False, None), 'lora_bias': (False, None),
            'exclude_modules': (None, [], ''), 'trainable_token_indices': (None, {}, []),
            'target_parameters': (None, []), 'layer_replication': (None, []),
            'alora_invocation_tokens': (None, []), 'use_bdlora': (None, False, {})}


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
  """adapter_config.json, checked for options that have no counterpart here."""
  path = pathlib.Path(directory) / ADAPTER_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'No {ADAPTER_CONFIG} in PEFT adapter directory {directory}.')
  config = json.loads(path.read_text())
  if config.get('peft_type') != 'LORA':
    raise ValueError(f'{path}: peft_type={config.get("peft_type")!r}; only LORA adapters can be '
                     'imported.')
  for key, ok in _MUST_BE.items():
    if key in config and config[key] not in ok:
      raise ValueError(f'{path}: {key}={config[key]!r} is not supported (expected '
                       f'{ok[0]!r}); trained biases, saved modules and per-layer patterns '
                       'have no place in a context\'s LoRA tables.')
  for key in ('r', 'lora_alpha', 'target_modules'):
    if key not in config:
      raise ValueError(f'{path} has no {key!r}.')
  return config


def peft_config_of(directory: str | os.PathLike, cfg: DecoderConfig | None = None
                   ) -> PeftConfig:
  """The one-context LoRA (or DoRA) `PeftConfig` that a PEFT adapter's tables fit.

  With the decoder's `cfg`, the targets are our projections in the modules the adapter targets
  (GPT-2's c_attn: q, k and v_proj); without, the adapter's module names as they are.
  """
  config = read_peft_config(directory)
  modules = config['target_modules']
  modules = [modules] if isinstance(modules, str) else sorted(modules)
  if cfg is not None:
    chosen = set(matched_modules(config['target_modules'], cfg))
    modules = sorted(p.name for p in cfg.projections()
                     if {q.module for q in pieces(p.name, cfg)} & chosen)
    if not modules:
      raise ValueError(f'{directory}: target_modules={config["target_modules"]!r} selects none '
                       f'of this decoder\'s modules {candidate_modules(cfg)}.')
  return PeftConfig(methods=('dora',) if config.get('use_dora') else ('lora',),
                    targets=','.join(modules), num_contexts=1,
                    lora=adaptors.LoraConfig(rank=config['r'], alpha=float(config['lora_alpha']),
                                             rslora=bool(config.get('use_rslora')),
                                             dropout=float(config.get('lora_dropout') or 0.0)))


def import_peft(directory: str | os.PathLike, tables, cfg: DecoderConfig, peft: PeftConfig,
                context: int = 0):
  """`tables` with context `context`'s LoRA rows replaced by the PEFT adapter in `directory`.

  The adapter's target modules, rank and every tensor's shape must match the model's LoRA
  tables (else an error naming the difference, before anything is changed). A different
  lora_alpha, alpha_pattern or rsLoRA setting is folded into B, so the imported row computes
  exactly what PEFT computes under the model's own scale. A DoRA adapter (use_dora) goes into
  a DoRA context, its magnitudes into the 'dora_m' rows. A module of higher rank than the
  model's (rank_pattern: GPT-2's c_attn of our export, rank 3r) fits where each of our
  projections in it reads at most r of its ranks (B block-diagonal); PEFT's rank-r c_attn
  fits as q, k and v LoRAs sharing its A.
  """
  directory = pathlib.Path(directory)
  config = read_peft_config(directory)
  _check_arch(cfg, 'import_peft')
  by_module, lo, dora = _import_plan(directory, config, cfg, peft, context)
  reader = _AdapterReader(_read_weights(directory), config, cfg, dora, lo.scale)
  row, flat = peft.row_of(context), trees.flatten(tables)
  new = {}  # path -> {'lora_a': [N, R, D, r'], 'lora_b': ..., 'dora_m': ...} (copies)
  for path in {p.path for parts in by_module.values() for p in parts}:
    new[path] = {n: np.array(flat[f'layers/{path}/{n}'], np.float32)
                 for n in ('lora_a', 'lora_b') + (('dora_m',) if dora else ())}
  for i in range(cfg.num_layers):
    for path, got in _layer_updates(reader, i, by_module, new, row).items():
      if len(got) < len(pieces(path, cfg)):  # a module is missing: already a problem
        continue
      _write_rows(new[path], i, row, lo.rank, path, got, reader.problems)
  unexpected = sorted(set(reader.weights) - reader.used)
  if unexpected:
    reader.problems.append(f'{len(unexpected)} tensor(s) have no place in the model, e.g. '
                           f'{unexpected[:3]} (a deeper base than num_layers={cfg.num_layers}?)')
  if reader.problems:
    raise ValueError(f'PEFT adapter {directory} does not fit this base model (nothing '
                     'imported):\n  ' + '\n  '.join(reader.problems[:12]))
  flat.update({f'layers/{path}/{n}': jax.numpy.asarray(v, flat[f'layers/{path}/{n}'].dtype)
               for path, t in new.items() for n, v in t.items()})
  return trees.unflatten(flat)


def _import_plan(directory: pathlib.Path, config: Mapping[str, Any], cfg: DecoderConfig,
                 peft: PeftConfig, context: int):
  """(the model's LoRA modules {module: pieces}, the context's LoraConfig, DoRA or not), once
  the adapter's kind, targets and rank are checked against context `context` of the model."""
  methods, lo = peft.context_spec(context)
  dora = bool(config.get('use_dora'))
  want = 'dora' if dora else 'lora'
  if want not in methods:
    raise ValueError(f'{directory} is a {want.upper()} adapter (use_dora={dora}); context '
                     f'{context} has methods {methods}, so it has no {want.upper()} to import '
                     'into.')
  by_module = pieces_by_module(lora_targets(cfg, peft), cfg)
  got_modules = config['target_modules']
  if matched_modules(got_modules, cfg) != sorted(by_module):
    got = got_modules if isinstance(got_modules, str) else sorted(got_modules)
    raise ValueError(f'{directory}: the adapter targets {got}, the model\'s LoRA targets are '
                     f'{sorted(set(target_names(by_module, cfg).values()))} (set peft.targets to '
                     'match).')
  if config['r'] != lo.rank:
    raise ValueError(f'{directory}: the adapter has rank r={config["r"]}, context {context} of '
                     f'the model has LoRA rank {lo.rank}.')
  return by_module, lo, dora


def _read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """adapter_model.safetensors, keyed without PEFT's adapter name ('.default.')."""
  weights_path = directory / ADAPTER_WEIGHTS
  if not weights_path.is_file():
    raise FileNotFoundError(f'No {ADAPTER_WEIGHTS} in PEFT adapter directory {directory}.')
  return {k.replace('.default.', '.'): v
          for k, v in safetensors.numpy.load_file(str(weights_path)).items()}


class _AdapterReader:
  """An adapter's tensors, taken by key and expected shape. What does not fit is collected in
  `problems` (so that one error names all of it) and what is taken in `used`."""

  def __init__(self, weights, config, cfg: DecoderConfig, dora: bool, our_scale: float):
    self.weights, self.config, self.cfg = weights, config, cfg
    self.dora, self.our_scale = dora, our_scale
    self.used, self.problems = set(), []

  def take(self, key: str, shape):
    """The tensor `key` if it has `shape` (None: any size there), else None and a problem."""
    if key not in self.weights:
      self.problems.append(f'{key} is missing')
      return None
    self.used.add(key)
    got = self.weights[key].shape
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
      want = tuple('r' if w is None else w for w in shape)
      self.problems.append(f'{key} has shape {got}, the model expects {want}'.replace("'r'", 'r'))
      return None
    return self.weights[key].astype(np.float32)

  def module_update(self, i: int, module: str, D: int, width: int):
    """(A [rank, D], B [width, rank] times PEFT's scale over ours, DoRA's magnitude)."""
    key = PEFT_LAYER[self.cfg.arch].format(layer=i) + module
    a_rD = self.take(f'{key}.lora_A.weight', (None, D))
    if a_rD is None:
      return None
    b_Er = self.take(f'{key}.lora_B.weight', (width, a_rD.shape[0]))
    m_E = self.take(f'{key}.lora_magnitude_vector', (width,)) if self.dora else None
    if b_Er is None or (self.dora and m_E is None):
      return None
    name = module_key(self.cfg, i, module)
    rank = a_rD.shape[0]
    alpha = pattern_value(self.config.get('alpha_pattern'), name, self.config['lora_alpha'])
    scale = alpha / (math.sqrt(rank) if self.config.get('use_rslora') else rank)
    return a_rD, b_Er * (scale / self.our_scale), m_E


def _layer_updates(reader: _AdapterReader, i: int, by_module: dict[str, list[Piece]],
                   new: dict[str, dict], row: int) -> dict[str, list]:
  """Layer i's updates: our projection -> [(piece, A, B rows of its columns, magnitude)] from
  the modules it is in."""
  found = {}
  for module, parts in by_module.items():
    D = new[parts[0].path]['lora_a'].shape[2]
    E = new[parts[0].path]['lora_b'][i, row][:, parts[0].ours].shape[1]
    width = module_width(module, reader.cfg, E)
    got = reader.module_update(i, module, D, width)
    if got is None:
      continue
    a_rD, b_Er, m_E = got
    for part in parts:
      found.setdefault(part.path, []).append(
          (part, a_rD, b_Er[part.theirs], None if m_E is None else m_E[part.theirs]))
    covered = covered_columns(parts, width)
    if (~covered).any() and (np.any(b_Er[~covered]) or reader.dora):
      reader.problems.append(f'layer {i} {module}: the adapter changes outputs of it that the '
                             f'model does not adapt (it adapts only {[p.path for p in parts]})')
  return found


def _write_rows(t: dict[str, np.ndarray], i: int, row: int, r: int, path: str, got: list,
                problems: list[str]):
  """Writes layer i's row `row` of projection `path`'s tables `t` (lora_a, lora_b and, for a
  DoRA adapter, dora_m) from its modules' updates `got`, or adds a problem."""
  got.sort(key=lambda g: g[0].ours.start or 0)  # gate before up: our column order
  a_rD = got[0][1]
  if any(not np.array_equal(a, a_rD) for _, a, _, _ in got[1:]):
    problems.append(f'layer {i}: the modules {[p.module for p, *_ in got]} of {path} have '
                    'different lora_A, but share one A here')
    return
  b_Er = np.concatenate([b for *_, b, _ in got], axis=0)  # pieces in order of `ours`
  keep = np.arange(a_rD.shape[0])
  if len(keep) > r:  # a higher-rank module: only the ranks this projection reads
    keep = np.flatnonzero(np.any(b_Er != 0, axis=0))
  if len(keep) > r:
    problems.append(f'layer {i}: {path} gets a rank-{len(keep)} update from '
                    f'{got[0][0].module} ({len(keep)} non-zero columns of lora_B), more than '
                    f'the model\'s LoRA rank {r}')
    return
  k = len(keep)
  t['lora_a'][i, row, :, :r] = 0
  t['lora_b'][i, row, :r] = 0
  t['lora_a'][i, row, :, :k] = a_rD[keep].T
  t['lora_b'][i, row, :k] = b_Er[:, keep].T
  if 'dora_m' in t:  # a DoRA adapter
    t['dora_m'][i, row] = np.concatenate([m for *_, m in got])
