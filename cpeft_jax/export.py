"""Export and import of adaptors: PyTorch PEFT's LoRA format, and merged checkpoints.

A context's LoRA group is an ordinary LoRA, so it can leave as one: `export_peft` writes
adapter_config.json + adapter_model.safetensors in PEFT's own names (PeftModel.from_pretrained
loads them onto the same base), and `import_peft` reads such an adapter into one row of a
model's tables. `merged_params` folds a context's adaptors into the frozen weights
(W' = diag(ia3_in) W diag(ia3_out) + s A_c B_c) for inference without adaptors, and
`save_merged` writes that as a plain Hugging Face checkpoint (checkpoints.save_decoder).

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
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from cpeft_jax import adaptors
from cpeft_jax.adaptors import PeftConfig
from cpeft_jax.models.llama import DecoderConfig

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
# Our block path -> the module path of transformers' Llama-family decoder layer.
HF_MODULES = {'attn': 'self_attn', 'mlp': 'mlp'}
PEFT_PREFIX = 'base_model.model.model.layers.{layer}.'


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
  """PEFT's module names here are the Llama family's (Llama, Mistral, Qwen2)."""
  arch = getattr(cfg, 'arch', 'llama')
  if arch != 'llama':
    raise ValueError(f'{what} knows the Llama family\'s module names; this decoder has '
                     f'arch={arch!r}.')


def _hf_projections(path: str, cfg: DecoderConfig) -> list[tuple[str, slice]]:
  """transformers' module names of one of our projections, with its slice of the outputs.

  A fused gate+up projection is two modules in transformers; LoRA's A is shared by both
  halves, so it exports exactly as two LoRAs with the halves of B.
  """
  block, proj = path.split('/')
  if proj == 'gate_up_proj':
    I = cfg.intermediate_size
    return [(f'{HF_MODULES[block]}.gate_proj', slice(0, I)),
            (f'{HF_MODULES[block]}.up_proj', slice(I, 2 * I))]
  return [(f'{HF_MODULES[block]}.{proj}', slice(None))]


# ----------------------------------------------------------------------------- PEFT export


def export_peft(directory: str | os.PathLike, tables, cfg: DecoderConfig, peft: PeftConfig,
                context: int = 0, *, base_model_name_or_path: str | None = None
                ) -> pathlib.Path:
  """Writes context `context`'s LoRA (or DoRA) group as a PyTorch PEFT adapter (CAUSAL_LM).

  Only LoRA and DoRA have a place in that format: a context that also carries IA3 or BitFit
  is an error rather than a silently partial export.
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
  tensors, modules = {}, set()
  for path in lora_targets(cfg, peft):
    a_NDr = np.asarray(flat[f'layers/{path}/lora_a'][:, row, :, :r], np.float32)
    b_NrE = np.asarray(flat[f'layers/{path}/lora_b'][:, row, :r], np.float32)
    m_NE = np.asarray(flat[f'layers/{path}/dora_m'][:, row], np.float32) if dora else None
    for module, cols in _hf_projections(path, cfg):
      modules.add(module.rsplit('.', 1)[-1])
      for i in range(cfg.num_layers):
        key = PEFT_PREFIX.format(layer=i) + module
        tensors[f'{key}.lora_A.weight'] = np.ascontiguousarray(a_NDr[i].T)  # [r, d_in]
        tensors[f'{key}.lora_B.weight'] = np.ascontiguousarray(b_NrE[i][:, cols].T)  # [d_out, r]
        if dora:  # the magnitude: one per output column, so fused halves split exactly
          tensors[f'{key}.lora_magnitude_vector'] = np.ascontiguousarray(m_NE[i][cols])
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lo.rank, 'lora_alpha': lo.alpha,
      'use_rslora': lo.rslora, 'lora_dropout': lo.dropout, 'target_modules': sorted(modules),
      'bias': 'none', 'use_dora': dora, 'fan_in_fan_out': False, 'modules_to_save': None,
      'init_lora_weights': True, 'inference_mode': True, 'rank_pattern': {},
      'alpha_pattern': {}, 'layers_to_transform': None,
      'base_model_name_or_path': base_model_name_or_path,
  }
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  return directory


# ----------------------------------------------------------------------------- PEFT import

# adapter_config.json options we can represent, with the only accepted values.
_MUST_BE = {'bias': ('none', None), 'fan_in_fan_out': (False, None),
            'modules_to_save': (None, []), 'layers_to_transform': (None, []),
            'rank_pattern': ({}, None), 'alpha_pattern': ({}, None),
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
  lora_alpha or rsLoRA setting is folded into B, so the imported row computes exactly what
  PEFT computes under the model's own scale. A DoRA adapter (use_dora) goes into a DoRA
  context, its magnitudes into the 'dora_m' rows.
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
  targets = lora_targets(cfg, peft)
  want_modules = sorted({m.rsplit('.', 1)[-1] for p in targets for m, _ in
                         _hf_projections(p, cfg)})
  got_modules = config['target_modules']
  got_modules = sorted([got_modules] if isinstance(got_modules, str) else got_modules)
  if got_modules != want_modules:
    raise ValueError(f'{directory}: the adapter targets {got_modules}, the model\'s LoRA '
                     f'targets are {want_modules} (set peft.targets to match).')
  if config['r'] != lo.rank:
    raise ValueError(f'{directory}: the adapter has rank r={config["r"]}, context {context} of '
                     f'the model has LoRA rank {lo.rank}.')
  r = config['r']
  scale = config['lora_alpha'] / (math.sqrt(r) if config.get('use_rslora') else r)
  fold = scale / lo.scale
  weights_path = directory / ADAPTER_WEIGHTS
  if not weights_path.is_file():
    raise FileNotFoundError(f'No {ADAPTER_WEIGHTS} in PEFT adapter directory {directory}.')
  weights = {k.replace('.default.', '.'): v for k, v in load_file(str(weights_path)).items()}
  flat = _flat(tables)
  out, used, problems = {}, set(), []

  def take(key, shape):
    if key not in weights:
      problems.append(f'{key} is missing')
      return np.zeros(shape, np.float32)
    used.add(key)
    if weights[key].shape != shape:
      problems.append(f'{key} has shape {weights[key].shape}, the model expects {shape}')
      return np.zeros(shape, np.float32)
    return weights[key].astype(np.float32)

  for path in targets:
    a_NRDr = np.array(flat[f'layers/{path}/lora_a'], np.float32)
    b_NRrE = np.array(flat[f'layers/{path}/lora_b'], np.float32)
    m_NRE = np.array(flat[f'layers/{path}/dora_m'], np.float32) if dora else None
    N, _, D, _ = a_NRDr.shape  # the tables' rank may exceed r: padding, left as it is
    parts = _hf_projections(path, cfg)
    for i in range(N):
      a_Dr = None
      for module, cols in parts:
        key = PEFT_PREFIX.format(layer=i) + module
        E = b_NRrE[i, row][:, cols].shape[1]
        a_rD = take(f'{key}.lora_A.weight', (r, D))
        if a_Dr is not None and not np.array_equal(a_Dr, a_rD.T):
          problems.append(f'{key}.lora_A.weight differs from that of the other half of the '
                          'fused gate+up projection, which shares one A')
        a_Dr = a_rD.T
        b_NRrE[i, row, :r, cols] = take(f'{key}.lora_B.weight', (E, r)).T * fold
        if dora:
          m_NRE[i, row, cols] = take(f'{key}.lora_magnitude_vector', (E,))
      a_NRDr[i, row, :, :r] = a_Dr
    out[f'layers/{path}/lora_a'] = a_NRDr.astype(flat[f'layers/{path}/lora_a'].dtype)
    out[f'layers/{path}/lora_b'] = b_NRrE.astype(flat[f'layers/{path}/lora_b'].dtype)
    if dora:
      out[f'layers/{path}/dora_m'] = m_NRE.astype(flat[f'layers/{path}/dora_m'].dtype)
  unexpected = sorted(set(weights) - used)
  if unexpected:
    problems.append(f'{len(unexpected)} tensor(s) have no place in the model, e.g. '
                    f'{unexpected[:3]} (a deeper base than num_layers={cfg.num_layers}?)')
  if problems:
    raise ValueError(f'PEFT adapter {directory} does not fit this base model (nothing '
                     'imported):\n  ' + '\n  '.join(problems[:12]))
  flat.update({k: jax.numpy.asarray(v) for k, v in out.items()})
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
  """A plain Hugging Face Llama checkpoint of the model as context `context`'s tokens see it."""
  from cpeft_jax import checkpoints
  return checkpoints.save_decoder(directory, cfg, merged_params(params, tables, cfg, peft,
                                                                context), tokenizer)


# ----------------------------------------------------------------------------- plug-ins, CLI


def peft_config_of(directory: str | os.PathLike) -> PeftConfig:
  """The one-context LoRA (or DoRA) `PeftConfig` that a PEFT adapter's tables fit."""
  config = read_peft_config(directory)
  modules = config['target_modules']
  modules = [modules] if isinstance(modules, str) else sorted(modules)
  return PeftConfig(methods=('dora',) if config.get('use_dora') else ('lora',),
                    targets=','.join(modules), num_contexts=1,
                    lora=adaptors.LoraConfig(rank=config['r'], alpha=float(config['lora_alpha']),
                                             rslora=bool(config.get('use_rslora')),
                                             dropout=float(config.get('lora_dropout') or 0.0)))


def plugin_from_peft(directory: str | os.PathLike, cfg: DecoderConfig, params, name: str = ''):
  """A PyTorch PEFT LoRA adapter as a plug-in of the base (`cfg`, `params`) it was made for."""
  from cpeft_jax import checkpoints, plugins
  peft = peft_config_of(directory)
  shapes = jax.eval_shape(lambda: checkpoints.init_adaptors(cfg, peft))
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
