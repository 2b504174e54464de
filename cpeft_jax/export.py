"""Export and import of adaptors: PyTorch PEFT's LoRA format, and merged checkpoints.

A context's LoRA group is an ordinary LoRA, so it can leave as one: `export_peft` writes
adapter_config.json + adapter_model.safetensors in PEFT's own names (PeftModel.from_pretrained
loads them onto the same base), and `import_peft` reads such an adapter into one row of a
model's tables. `merged_params` folds a context's adaptors into the frozen weights
(W' = diag(ia3_in) W diag(ia3_out) + s A_c B_c) for inference without adaptors, and
`save_merged` writes that as a plain Hugging Face checkpoint (checkpoints.save_decoder).
All three decoder families go both ways (Llama, GPT-2, OPT); `pieces` says where each of our
projections lives in transformers' modules.

Plug-ins (plugins.py) are the interchange of the command line, which loads the frozen base
checkpoint, checks the plug-in against it, and converts:

    python -m cpeft_jax.export --base=CKPT --plugin=DIR --peft_out=ADAPTER   # to PyTorch PEFT
    python -m cpeft_jax.export --base=CKPT --plugin=DIR --merged_out=HF_DIR  # merged checkpoint
    python -m cpeft_jax.export --base=CKPT --peft_in=ADAPTER --plugin_out=DIR  # PEFT -> plug-in

Table layout (see adaptors.py): under the decoder's layer scan every table has a leading layer
axis, lora_a [N, R, d_in, r], lora_b [N, R, r, d_out], ia3 / bitfit [N, R, d].
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import jax
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.decoders import init_adaptors
from cpeft_jax.models.llama import DecoderConfig

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
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


def _by_module(paths, cfg: DecoderConfig) -> dict[str, list[Piece]]:
  out = {}
  for path in paths:
    for piece in pieces(path, cfg):
      out.setdefault(piece.module, []).append(piece)
  return out


def _module_width(module: str, cfg: DecoderConfig, own_width: int) -> int:
  """Output features of transformers' module (GPT-2's c_attn holds q, k and v)."""
  return 3 * cfg.hidden_size if (cfg.arch, module) == ('gpt2', 'attn.c_attn') else own_width


def _candidates(cfg: DecoderConfig) -> list[str]:
  """Every module of a decoder layer that one of our adaptable projections lives in."""
  return sorted(_by_module([p.name for p in cfg.projections()], cfg))


def _target_names(modules, cfg: DecoderConfig) -> dict[str, str]:
  """PEFT target_modules naming `modules`: a module's own name ('q_proj', 'c_attn') where that
  selects exactly the chosen ones, else its path in the layer (GPT-2's 'attn.c_proj' apart
  from 'mlp.c_proj'). {module: name}."""
  modules, out = set(modules), {}
  for m in sorted(modules):
    short = m.rsplit('.', 1)[-1]
    same = {c for c in _candidates(cfg) if c.rsplit('.', 1)[-1] == short}
    out[m] = short if same <= modules else m
  return out


def _module_key(cfg: DecoderConfig, layer: int, module: str) -> str:
  """The module's name in the base model, as PEFT matches target_modules and patterns."""
  return PEFT_LAYER[cfg.arch].format(layer=layer)[len(_PEFT_MODEL):] + module


def _matched_modules(target_modules, cfg: DecoderConfig) -> list[str]:
  """The candidate modules that PEFT's target_modules selects (PEFT's own matching rule: a
  string is a full regex match, a list matches a name or a '.'-suffix), in any layer."""
  def hit(key):
    if isinstance(target_modules, str):
      return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith('.' + t) for t in target_modules)
  return sorted(m for m in _candidates(cfg)
                if any(hit(_module_key(cfg, i, m)) for i in range(cfg.num_layers)))


def _pattern(patterns: Mapping[str, Any] | None, key: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the key's end."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', key):
      return value
  return default


def _flat(tree) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflat(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict(dict(flat), sep='/')


def row_of(peft: PeftConfig, context: int) -> int:
  """The table row of `context`; an error if the context has no adaptor group."""
  if context not in peft.rows:
    raise ValueError(f'Context {context} has no adaptor row: the model adapts contexts '
                     f'{peft.rows} of num_contexts={peft.num_contexts}.')
  return peft.rows.index(context)


def context_spec(peft: PeftConfig, context: int) -> tuple[tuple[str, ...], adaptors.LoraConfig]:
  """The methods and LoRA hyper-parameters of one context.

  With per-context specs (`PeftConfig.contexts`) each row has its own; the LoRA tables are then
  padded to the largest rank, and a context's group is the first `rank` columns of A and rows
  of B.
  """
  spec = peft.row_specs[row_of(peft, context)]
  return tuple(spec.methods), spec.lora


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
  import safetensors.numpy
  _check_arch(cfg, 'export_peft')
  methods, lo = context_spec(peft, context)
  if tuple(methods) not in (('lora',), ('dora',)):
    raise ValueError(f'export_peft writes a LoRA or DoRA adapter; context {context} has methods '
                     f'{methods} ({[m for m in methods if m not in ("lora", "dora")] or "no lora"}'
                     ' cannot be expressed as PEFT LoRA).')
  dora = methods == ('dora',)
  row, r = row_of(peft, context), lo.rank
  flat = _flat(tables)
  table = lambda path, name: np.asarray(flat[f'layers/{path}/{name}'][:, row], np.float32)
  by_module = _by_module(lora_targets(cfg, peft), cfg)
  names = _target_names(by_module, cfg)
  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for module, parts in by_module.items():
    paths = list(dict.fromkeys(p.path for p in parts))
    a = {p: table(p, 'lora_a')[..., :r] for p in paths}  # [N, D, r]
    b = {p: table(p, 'lora_b')[:, :r] for p in paths}  # [N, r, E]
    blocks = paths[:1] if all(np.array_equal(a[p], a[paths[0]]) for p in paths) else paths
    rank = r * len(blocks)
    width = _module_width(module, cfg, b[parts[0].path][0][:, parts[0].ours].shape[1])
    covered = np.zeros(width, bool)
    for part in parts:
      covered[part.theirs] = True
    if dora and not covered.all():
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
    if rank != r:
      rank_pattern[names[module]] = rank
      alpha_pattern[names[module]] = lo.scale * (math.sqrt(rank) if lo.rslora else rank)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lo.rank, 'lora_alpha': lo.alpha,
      'use_rslora': lo.rslora, 'lora_dropout': lo.dropout,
      'target_modules': sorted(set(names.values())), 'bias': 'none', 'use_dora': dora,
      # GPT-2's modules are Conv1D (weight [d_in, d_out]); lora_A/B are Linear either way.
      'fan_in_fan_out': cfg.arch == 'gpt2', 'modules_to_save': None,
      'init_lora_weights': True, 'inference_mode': True, 'rank_pattern': rank_pattern,
      'alpha_pattern': alpha_pattern, 'layers_to_transform': None,
      'base_model_name_or_path': base_model_name_or_path,
  }
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  return directory


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
  from safetensors.numpy import load_file
  directory = pathlib.Path(directory)
  config = read_peft_config(directory)
  _check_arch(cfg, 'import_peft')
  methods, lo = context_spec(peft, context)
  dora = bool(config.get('use_dora'))
  want = 'dora' if dora else 'lora'
  if want not in methods:
    raise ValueError(f'{directory} is a {want.upper()} adapter (use_dora={dora}); context '
                     f'{context} has methods {methods}, so it has no {want.upper()} to import '
                     'into.')
  row = row_of(peft, context)
  by_module = _by_module(lora_targets(cfg, peft), cfg)
  got_modules = config['target_modules']
  if _matched_modules(got_modules, cfg) != sorted(by_module):
    got = got_modules if isinstance(got_modules, str) else sorted(got_modules)
    raise ValueError(f'{directory}: the adapter targets {got}, the model\'s LoRA targets are '
                     f'{sorted(set(_target_names(by_module, cfg).values()))} (set peft.targets to '
                     'match).')
  if config['r'] != lo.rank:
    raise ValueError(f'{directory}: the adapter has rank r={config["r"]}, context {context} of '
                     f'the model has LoRA rank {lo.rank}.')
  r = lo.rank
  weights_path = directory / ADAPTER_WEIGHTS
  if not weights_path.is_file():
    raise FileNotFoundError(f'No {ADAPTER_WEIGHTS} in PEFT adapter directory {directory}.')
  weights = {k.replace('.default.', '.'): v for k, v in load_file(str(weights_path)).items()}
  flat = _flat(tables)
  used, problems = set(), []

  def take(key, shape):
    """The tensor `key` if it has `shape` (None: any size there), else None and a problem."""
    if key not in weights:
      problems.append(f'{key} is missing')
      return None
    used.add(key)
    got = weights[key].shape
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
      want = tuple('r' if w is None else w for w in shape)
      problems.append(f'{key} has shape {got}, the model expects {want}'.replace("'r'", 'r'))
      return None
    return weights[key].astype(np.float32)

  def module_update(i, module, D, width):
    """(A [rank, D], B [width, rank] times PEFT's scale over ours, DoRA's magnitude)."""
    key = PEFT_LAYER[cfg.arch].format(layer=i) + module
    a_rD = take(f'{key}.lora_A.weight', (None, D))
    if a_rD is None:
      return None
    b_Er = take(f'{key}.lora_B.weight', (width, a_rD.shape[0]))
    m_E = take(f'{key}.lora_magnitude_vector', (width,)) if dora else None
    if b_Er is None or (dora and m_E is None):
      return None
    name = _module_key(cfg, i, module)
    rank = a_rD.shape[0]
    alpha = _pattern(config.get('alpha_pattern'), name, config['lora_alpha'])
    scale = alpha / (math.sqrt(rank) if config.get('use_rslora') else rank)
    return a_rD, b_Er * (scale / lo.scale), m_E

  new = {}  # path -> {'lora_a': [N, R, D, r'], 'lora_b': ..., 'dora_m': ...} (copies)
  for path in {p.path for parts in by_module.values() for p in parts}:
    new[path] = {n: np.array(flat[f'layers/{path}/{n}'], np.float32)
                 for n in ('lora_a', 'lora_b') + (('dora_m',) if dora else ())}
  for i in range(cfg.num_layers):
    # Our projection -> [(piece, A, B rows of its columns, magnitude)] from the modules it is in.
    found = {}
    for module, parts in by_module.items():
      D = new[parts[0].path]['lora_a'].shape[2]
      E = new[parts[0].path]['lora_b'][i, row][:, parts[0].ours].shape[1]
      width = _module_width(module, cfg, E)
      got = module_update(i, module, D, width)
      if got is None:
        continue
      a_rD, b_Er, m_E = got
      covered = np.zeros(width, bool)
      for part in parts:
        covered[part.theirs] = True
        found.setdefault(part.path, []).append(
            (part, a_rD, b_Er[part.theirs], None if m_E is None else m_E[part.theirs]))
      if (~covered).any() and (np.any(b_Er[~covered]) or dora):
        problems.append(f'layer {i} {module}: the adapter changes outputs of it that the model '
                        f'does not adapt (it adapts only {[p.path for p in parts]})')
    for path, got in found.items():
      if len(got) < len(pieces(path, cfg)):  # a module is missing: already a problem
        continue
      got.sort(key=lambda g: g[0].ours.start or 0)  # gate before up: our column order
      a_rD = got[0][1]
      if any(not np.array_equal(a, a_rD) for _, a, _, _ in got[1:]):
        problems.append(f'layer {i}: the modules {[p.module for p, *_ in got]} of {path} have '
                        'different lora_A, but share one A here')
        continue
      b_Er = np.concatenate([b for *_, b, _ in got], axis=0)  # pieces in order of `ours`
      keep = np.arange(a_rD.shape[0])
      if len(keep) > r:  # a higher-rank module: only the ranks this projection reads
        keep = np.flatnonzero(np.any(b_Er != 0, axis=0))
      if len(keep) > r:
        problems.append(f'layer {i}: {path} gets a rank-{len(keep)} update from '
                        f'{got[0][0].module} ({len(keep)} non-zero columns of lora_B), more than '
                        f'the model\'s LoRA rank {r}')
        continue
      k = len(keep)
      t = new[path]
      t['lora_a'][i, row, :, :r] = 0
      t['lora_b'][i, row, :r] = 0
      t['lora_a'][i, row, :, :k] = a_rD[keep].T
      t['lora_b'][i, row, :k] = b_Er[:, keep].T
      if dora:
        t['dora_m'][i, row] = np.concatenate([m for *_, m in got])
  unexpected = sorted(set(weights) - used)
  if unexpected:
    problems.append(f'{len(unexpected)} tensor(s) have no place in the model, e.g. '
                    f'{unexpected[:3]} (a deeper base than num_layers={cfg.num_layers}?)')
  if problems:
    raise ValueError(f'PEFT adapter {directory} does not fit this base model (nothing '
                     'imported):\n  ' + '\n  '.join(problems[:12]))
  flat.update({f'layers/{path}/{n}': jax.numpy.asarray(v, flat[f'layers/{path}/{n}'].dtype)
               for path, t in new.items() for n, v in t.items()})
  return _unflat(flat)


# ----------------------------------------------------------------------------- merged weights


def merged_params(params, tables, cfg: DecoderConfig, peft: PeftConfig, context: int = 0):
  """The frozen 'params' with context `context`'s adaptors folded in (a plain decoder's).

  For every adapted projection, with D = s A_c B_c and DoRA's g = m_c / ||W + D||_col (1
  without DoRA),

    W' = diag(ia3_in) W diag(g * ia3_out) + D diag(g),   b' = b * ia3_out + bitfit_c,

  which is exactly ContextDense's function for tokens of context `context` (the low-rank
  branch reads the unscaled input and adds after IA3; DoRA leaves the bias unscaled).
  BitFit needs a bias to fold into: on a bias-free projection it is an error.
  """
  methods, lo = context_spec(peft, context)
  row = row_of(peft, context)
  flat_p = {k: np.asarray(v, np.float32) for k, v in _flat(params).items()}
  flat_t = _flat(tables)
  targets = adaptors.resolve_targets(peft, cfg.projections())
  for path, adapt in targets.items():
    if not adapt.any:
      continue
    base = f'layers/{path}'
    w_NDE = kernel_NDE = flat_p[f'{base}/kernel']
    table = lambda name: np.asarray(flat_t[f'{base}/{name}'][:, row], np.float32)
    bias_NE = flat_p.get(f'{base}/bias')
    # Rows of methods this context lacks are inert in the layer (masked), so skipped here.
    dora = getattr(adapt, 'dora', False) and 'dora' in methods
    delta_NDE = None
    if (adapt.lora and 'lora' in methods) or dora:
      r = lo.rank
      delta_NDE = lo.scale * np.einsum('ndr,nre->nde', table('lora_a')[..., :r],
                                       table('lora_b')[:, :r])
    g_NE = np.ones(w_NDE[:, 0].shape, np.float32)
    if dora:
      g_NE = table('dora_m') / np.sqrt(((kernel_NDE + delta_NDE) ** 2).sum(axis=1))
    ia3 = adapt.ia3 if 'ia3' in methods else None
    if ia3 == 'in':
      w_NDE = w_NDE * table('ia3')[:, :, None]
    w_NDE = w_NDE * g_NE[:, None, :]
    if ia3 == 'out':
      s_NE = table('ia3')
      w_NDE = w_NDE * s_NE[:, None, :]
      bias_NE = None if bias_NE is None else bias_NE * s_NE
    if adapt.bitfit and 'bitfit' in methods:
      if bias_NE is None:
        raise ValueError(f'BitFit on {path} cannot be merged: the projection has no bias in a '
                         'plain checkpoint (only q/k/v biases exist, with qkv_bias).')
      bias_NE = bias_NE + table('bitfit')
    if delta_NDE is not None:
      w_NDE = w_NDE + delta_NDE * g_NE[:, None, :]
    flat_p[f'{base}/kernel'] = w_NDE
    if bias_NE is not None:
      flat_p[f'{base}/bias'] = bias_NE
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  return _unflat({k: jax.numpy.asarray(v, dtype) for k, v in flat_p.items()})


def merged_per_context(params, tables, cfg: DecoderConfig, peft: PeftConfig) -> dict[int, dict]:
  """{context: merged params} for every adapted context (one plain decoder per context)."""
  return {c: merged_params(params, tables, cfg, peft, c) for c in peft.rows}


def save_merged(directory: str | os.PathLike, params, tables, cfg: DecoderConfig,
                peft: PeftConfig, context: int = 0, tokenizer=None) -> pathlib.Path:
  """A plain Hugging Face checkpoint (Llama, GPT-2 or OPT, as the base) of the model as
  context `context`'s tokens see it."""
  from cpeft_jax import checkpoints
  return checkpoints.save_decoder(directory, cfg, merged_params(params, tables, cfg, peft,
                                                                context), tokenizer)


# ----------------------------------------------------------------------------- plug-ins, CLI


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
    chosen = set(_matched_modules(config['target_modules'], cfg))
    modules = sorted(p.name for p in cfg.projections()
                     if {q.module for q in pieces(p.name, cfg)} & chosen)
    if not modules:
      raise ValueError(f'{directory}: target_modules={config["target_modules"]!r} selects none '
                       f'of this decoder\'s modules {_candidates(cfg)}.')
  return PeftConfig(methods=('dora',) if config.get('use_dora') else ('lora',),
                    targets=','.join(modules), num_contexts=1,
                    lora=adaptors.LoraConfig(rank=config['r'], alpha=float(config['lora_alpha']),
                                             rslora=bool(config.get('use_rslora')),
                                             dropout=float(config.get('lora_dropout') or 0.0)))


def plugin_from_peft(directory: str | os.PathLike, cfg: DecoderConfig, params, name: str = ''):
  """A PyTorch PEFT LoRA adapter as a plug-in of the base (`cfg`, `params`) it was made for."""
  from cpeft_jax import plugins
  peft = peft_config_of(directory, cfg)
  shapes = jax.eval_shape(lambda: init_adaptors(cfg, peft))
  zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)
  tables = import_peft(directory, zeros, cfg, peft, 0)
  return plugins.extract(tables, peft, 0, {'decoder': plugins.fingerprint(params, cfg)},
                         name=name, meta={'from_peft': str(directory)})


def convert(base: str, *, plugin: str | None = None, peft_in: str | None = None,
            peft_out: str | None = None, merged_out: str | None = None,
            plugin_out: str | None = None, name: str = '') -> list[pathlib.Path]:
  """The command line's work: one source (a plug-in or a PEFT adapter), any outputs."""
  from cpeft_jax import checkpoints, plugins
  if (plugin is None) == (peft_in is None):
    raise ValueError('Give exactly one source: --plugin=DIR or --peft_in=ADAPTER_DIR.')
  if not (peft_out or merged_out or plugin_out):
    raise ValueError('Give at least one output: --peft_out, --merged_out or --plugin_out.')
  loaded = checkpoints.load_decoder(base, strict=True)
  cfg, params = loaded.config, loaded.params
  if plugin is not None:
    plug = plugins.load(plugin, {'decoder': plugins.fingerprint(params, cfg)})
  else:
    plug = plugin_from_peft(peft_in, cfg, params, name)
  written = []
  if plugin_out:
    written.append(plugins.save(plugin_out, plug))
  if peft_out:
    written.append(export_peft(peft_out, plug.tables, cfg, plug.peft, 0,
                               base_model_name_or_path=str(base)))
  if merged_out:
    written.append(save_merged(merged_out, params, plug.tables, cfg, plug.peft, 0))
  return written


def main(argv):
  del argv
  for path in convert(FLAGS.base, plugin=FLAGS.plugin, peft_in=FLAGS.peft_in,
                      peft_out=FLAGS.peft_out, merged_out=FLAGS.merged_out,
                      plugin_out=FLAGS.plugin_out, name=FLAGS.name):
    print(f'wrote {path}')


if __name__ == '__main__':
  from absl import app, flags
  FLAGS = flags.FLAGS
  flags.DEFINE_string('base', None, 'The frozen base: a Hugging Face checkpoint directory or id.')
  flags.DEFINE_string('plugin', None, 'Source: a plug-in directory (plugins.save).')
  flags.DEFINE_string('peft_in', None, 'Source: a PyTorch PEFT LoRA adapter directory.')
  flags.DEFINE_string('peft_out', None, 'Write a PyTorch PEFT LoRA adapter here.')
  flags.DEFINE_string('merged_out', None, 'Write a merged Hugging Face checkpoint here.')
  flags.DEFINE_string('plugin_out', None, 'Write a plug-in here.')
  flags.DEFINE_string('name', '', 'Name of a plug-in made from a PEFT adapter.')
  flags.mark_flags_as_required(['base'])
  app.run(main)
