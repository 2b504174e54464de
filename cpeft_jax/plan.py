"""A memory planner: per-device bytes of a config's train step on a mesh, with no weights allocated.

  python -m cpeft_jax.plan --config=configs/paper.py:method=lora,rank=64 \
      --mesh=data=1,fsdp=256,tensor=1 --model=llama-2-7b [--device_memory=16GiB] [--json=F]

Shapes come from jax.eval_shape of the decoder's init (frozen base and adaptor tables, split
by train.mode as training splits them) and of the optimizer's init; shardings from the
project's partition rules (`sharding.state_shardings` on a `jax.sharding.AbstractMesh`), so an
array's bytes on one device are the product over its dims of ceil(dim / mesh axes on that dim)
x itemsize, and the mesh may be far larger than this machine. The decoder's shape is the
config's text_model's config.json, or --model: a preset name (`PRESETS`), a JSON of
DecoderConfig fields, or a checkpoint directory. The vision encoder and the connector are not
counted (a frozen tower of tens of MB and one projection, both small beside a 7B decoder).

Activations (with the step's gradients and other temporaries) are XLA's memory analysis of
the compiled train step where this process has the mesh's devices (on CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates 8), else an estimate from shapes
(`estimate_activations`); the output says which.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

from absl import app
from absl import flags as absl_flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from cpeft_jax import (adaptors, catalog, checkpoints, experiment, losses, quantize, sharding,
                       trainable as trainable_lib)
from cpeft_jax.models import hf_configs
from cpeft_jax.models.decoder_config import DTYPES, DecoderConfig
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.train import state as state_lib
from cpeft_jax.train import step as step_lib
from cpeft_jax.train import trainer

# Decoder shapes by name, for planning without the checkpoint on disk (numerics: the config's).
PRESETS = {
    'llama-2-7b': dict(arch='llama', vocab_size=32000, hidden_size=4096, num_layers=32,
                       num_heads=32, intermediate_size=11008, rms_norm_eps=1e-5),
    'llama-2-13b': dict(arch='llama', vocab_size=32000, hidden_size=5120, num_layers=40,
                        num_heads=40, intermediate_size=13824, rms_norm_eps=1e-5),
    'llama-3-8b': dict(arch='llama', vocab_size=128256, hidden_size=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, intermediate_size=14336,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
}
UNITS = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
         'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}
PARTS = ('base', 'tables', 'optimizer', 'activations')


@dataclasses.dataclass
class Plan:
  """Per-device bytes of each part of a train step, and how the activations were found."""
  mesh: dict[str, int]
  decoder: DecoderConfig
  mode: str
  params: dict[str, int]  # parameter counts: base, tables
  bytes: dict[str, int]  # per device: PARTS and 'total'
  activations_method: str

  def fits(self, device_memory: int) -> bool:
    return self.bytes['total'] <= device_memory

  def as_json(self, device_memory: int | None = None) -> dict[str, Any]:
    out = dict(mesh=self.mesh, mode=self.mode, decoder=dataclasses.asdict(self.decoder),
               params=self.params, bytes_per_device=self.bytes,
               activations_method=self.activations_method)
    if device_memory is not None:
      out.update(device_memory=device_memory, fits=self.fits(device_memory))
    return out


def parse_bytes(text: str) -> int:
  """'16GiB', '512MB', '1e9' -> bytes; raises naming the text otherwise."""
  s = text.strip().upper().replace(' ', '')
  unit = next((u for u in sorted(UNITS, key=len, reverse=True) if s.endswith(u)), 'B')
  number = s[:len(s) - len(unit)] if s.endswith(unit) else s
  try:
    value = float(number)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ValueError(f'device memory {text!r}; expected a positive size like 16GiB, 80GB or '
                     f'an integer of bytes (units {sorted(UNITS)}).')
  return int(value * UNITS[unit])


def human(n: int) -> str:
  for unit in ('TiB', 'GiB', 'MiB', 'KiB'):
    if n >= UNITS[unit.upper()]:
      return f'{n / UNITS[unit.upper()]:.2f} {unit}'
  return f'{n} B'


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=256,tensor=1' -> axis sizes (every axis explicit: no devices to fill -1)."""
  spec = sharding.parse_mesh(text)
  bad = {a: n for a, n in spec.items() if a not in sharding.AXES or n < 1}
  if bad:
    raise ValueError(f'--mesh={text!r} has {bad}; expected positive sizes of {sharding.AXES} '
                     '(the planner has no devices to resolve -1 against).')
  return {a: spec.get(a, 1) for a in sharding.AXES}


def decoder_config(config: ml_collections.ConfigDict, model: str | None = None) -> DecoderConfig:
  """The decoder of `config`: its shape from `model` (preset, JSON or checkpoint directory),
  else from config.text_model's config.json, else config.model; numerics from config.model."""
  m = dict(config.model)
  numerics = experiment.decoder_numerics(config)
  if model and model in PRESETS:
    return DecoderConfig.from_dict({**PRESETS[model], **numerics})
  if model and model.lstrip().startswith('{'):
    try:
      fields = json.loads(model)
    except json.JSONDecodeError as e:
      raise ValueError(f'--model is not valid JSON ({e}); expected DecoderConfig fields.')
    return DecoderConfig.from_dict({**numerics, **fields})
  if model:
    if not os.path.isdir(model):
      raise ValueError(f'--model={model!r}; expected a preset {sorted(PRESETS)}, a JSON of '
                       'DecoderConfig fields or a checkpoint directory with config.json.')
    return hf_configs.decoder_config(checkpoints.read_config(model), **numerics)
  if config.get('text_model'):
    try:
      directory = catalog.resolve(config.text_model)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'{e} Without the checkpoint, give its shape with --model (a '
                              f'preset {sorted(PRESETS)} or a JSON of DecoderConfig fields).')
    return hf_configs.decoder_config(checkpoints.read_config(directory), **numerics)
  if not m.get('vocab_size'):
    raise ValueError('config.model.vocab_size is 0 (the tokenizer decides it at build time); '
                     'set --config.model.vocab_size or give --model.')
  return DecoderConfig.from_dict(m)


def shapes(config: ml_collections.ConfigDict, dec_cfg: DecoderConfig):
  """(frozen, train state) as ShapeDtypeStructs, split and optimised as training does."""
  peft = experiment.peft_config(config)
  experiment.check_lora_rank(dec_cfg, peft)
  qcfg = quantize.QuantConfig.from_dict(config.get('quantize'))
  quantize.check_peft(qcfg, peft, config.train.mode)
  decoder = make_decoder(dec_cfg, peft)

  def init(key):
    v = decoder.init(key, jnp.zeros((1, 1), jnp.int32))
    params = quantize.quantize_params({'decoder': v['params']}, qcfg)
    out = {'params': params}
    if v.get(adaptors.ADAPTORS):
      out[adaptors.ADAPTORS] = {'decoder': v[adaptors.ADAPTORS]}
    return out
  variables = jax.eval_shape(init, jax.random.key(0))
  trainable, frozen = trainable_lib.split_for(variables, config)
  tx = trainer.optimizer(config, state_lib.OptimConfig.from_dict(config.optim), peft)
  state = jax.eval_shape(lambda t: state_lib.TrainState.create(t, tx), trainable)
  return frozen, state


def shard_bytes(x, spec, mesh_sizes) -> int:
  """Bytes of one device's shard of `x` under `spec`: prod ceil(dim / axes) x itemsize."""
  dims = list(spec) + [None] * (len(x.shape) - len(spec))
  n = 1
  for d, axes in zip(x.shape, dims):
    names = () if axes is None else (tuple(axes) if isinstance(axes, (tuple, list)) else (axes,))
    n *= math.ceil(d / int(np.prod([mesh_sizes[a] for a in names])))
  return n * np.dtype(x.dtype).itemsize


def tree_bytes(tree, shardings, mesh_sizes) -> int:
  return sum(shard_bytes(x, s.spec, mesh_sizes)
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def plan(config: ml_collections.ConfigDict, mesh_sizes: dict[str, int], *,
         model: str | None = None, activations: str = 'auto') -> Plan:
  """The per-device memory plan of `config`'s train step on a mesh of `mesh_sizes`.

  activations: 'auto' (compile where this process has the mesh's devices, else estimate),
  'compile' or 'estimate'.
  """
  if activations not in ('auto', 'compile', 'estimate'):
    raise ValueError(f"activations={activations!r}; expected 'auto', 'compile' or 'estimate'.")
  sharding.check_batch(mesh_sizes, 'train', config.train.batch_size)
  dec_cfg = decoder_config(config, model)
  frozen, state = shapes(config, dec_cfg)
  rules = sharding.parse_rules(config.get('partition_rules'))
  mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in sharding.AXES), sharding.AXES)
  state_sh = sharding.state_shardings(state, mesh, rules)
  frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
  out = {'base': tree_bytes(frozen, frozen_sh, mesh_sizes),
         'tables': tree_bytes(state.trainable, state_sh.trainable, mesh_sizes),
         'optimizer': tree_bytes(state.opt_state, state_sh.opt_state, mesh_sizes)}
  size = int(np.prod(list(mesh_sizes.values())))
  if activations == 'compile' or (activations == 'auto' and jax.device_count() >= size):
    out['activations'], method = compiled_activations(config, dec_cfg, mesh_sizes, frozen, state,
                                                      rules)
  else:
    out['activations'], method = estimate_activations(config, dec_cfg, mesh_sizes,
                                                      out['tables'])
    if activations == 'auto':
      method += (f'; not compiled: this process has {jax.device_count()} of the mesh\'s '
                 f'{size} devices')
  out['total'] = sum(out[k] for k in PARTS)
  return Plan(dict(mesh_sizes), dec_cfg, config.train.mode,
              {'base': count(frozen), 'tables': count(state.trainable)}, out, method)


def _batch_shapes(config, rows):
  L = config.data.seq_len
  ints = jax.ShapeDtypeStruct((rows, L), jnp.int32)
  return dict(tokens=ints, targets=ints, context_ids=ints, attention_mask=ints,
              loss_mask=jax.ShapeDtypeStruct((rows, L), jnp.float32))


def compiled_activations(config, dec_cfg, mesh_sizes, frozen, state, rules):
  """XLA's temporaries of the compiled train step on this process's devices (per device)."""
  size = int(np.prod(list(mesh_sizes.values())))
  if jax.device_count() < size:
    raise ValueError(f'compiling for a {size}-device mesh needs {size} devices; this process has '
                     f'{jax.device_count()} (on CPU: XLA_FLAGS=--xla_force_host_platform_device_'
                     f'count={size}).')
  devices = np.asarray(jax.devices()[:size]).reshape([mesh_sizes[a] for a in sharding.AXES])
  mesh = jax.sharding.Mesh(devices, sharding.AXES)
  peft = experiment.peft_config(config)
  model = make_decoder(dec_cfg, peft)
  train_model = make_decoder(dec_cfg, peft, deterministic=False)

  def apply(variables, batch, *, train=False, rng=None):
    v = {k: t['decoder'] for k, t in variables.items()}
    return (train_model if train else model).apply(
        v, batch['tokens'], context_ids_BL=batch['context_ids'],
        attention_mask_BL=batch['attention_mask'], rngs={'dropout': rng} if train else None,
        method='features')
  state_sh = sharding.state_shardings(state, mesh, rules)
  frozen_sh = sharding.tree_shardings(frozen, mesh, rules)
  step = functools.partial(step_lib.train_step, apply_fn=apply,
                           micro_steps=config.train.get('micro_steps', 1) or 1)
  jitted = jax.jit(step, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh),
                                       sharding.replicated(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  with jax.set_mesh(mesh):  # as training runs it: adaptors routed per batch shard
    stats = jitted.lower(state, frozen, _batch_shapes(config, config.train.batch_size),
                         jax.eval_shape(lambda: jax.random.key(0))).compile().memory_analysis()
  return int(stats.temp_size_in_bytes), (
      f'XLA memory analysis of the train step compiled for {size} {jax.devices()[0].platform} '
      'devices (temp_size_in_bytes: activations, gradients, temporaries)')


def estimate_activations(config, dec_cfg: DecoderConfig, mesh_sizes, grad_bytes: int):
  """(bytes, how) from shapes: what the backward pass keeps, plus the gradients.

  Per layer and token, in the compute dtype: the block input, both norms' outputs and the
  residual after attention (4 D), q, k, v and the attention output, the MLP's gate, up and
  their product (3 I), and the attention probabilities (heads x L, float32); heads and the
  MLP's intermediate features split over 'tensor' (Megatron layout). Without remat every layer
  keeps all of it; with remat each layer keeps its input and one layer is recomputed at a time.
  Plus one chunk of the chunked loss's logits and their gradient (float32, vocab over 'tensor';
  `losses.chunking` of the micro-batch) and a trainable-sized gradient tree. LoRA's r-wide
  intermediates and dropout masks are left out (small).
  """
  c = dec_cfg
  t = mesh_sizes['tensor']
  micro_steps = config.train.get('micro_steps', 1) or 1
  rows = math.ceil(config.train.batch_size / (mesh_sizes['data'] * mesh_sizes['fsdp']))
  rows = math.ceil(rows / micro_steps)
  L, D, e = config.data.seq_len, c.hidden_size, np.dtype(DTYPES[c.dtype]).itemsize
  qkvo = 2 * c.num_heads * c.dims + 2 * c.kv_heads * c.dims
  per_token = (e * (4 * D + math.ceil(qkvo / t) + math.ceil(3 * c.intermediate_size / t))
               + 4 * math.ceil(c.num_heads / t) * L)
  layer = rows * L * per_token
  if c.remat:
    saved, how = c.num_layers * rows * L * e * D + layer, 'remat: layer inputs + one layer'
  else:
    saved, how = c.num_layers * layer, 'no remat: every layer\'s saved activations'
  # Positions per chunk (of every row), as the step chunks its micro-batch.
  chunk = losses.chunking(math.ceil(config.train.batch_size / micro_steps), L, c.vocab_size)[1]
  logits = 2 * rows * chunk * 4 * math.ceil(c.vocab_size / t)
  return saved + logits + grad_bytes, (
      f'estimate from shapes ({how}; {rows} x {L} tokens (rows x seq_len) per device; a loss '
      'chunk\'s logits; gradients)')


def report(p: Plan, config_name: str, device_memory: int | None) -> str:
  """The plan as lines for a console."""
  c = p.decoder
  mesh = ','.join(f'{a}={n}' for a, n in p.mesh.items())
  lines = [f'{config_name}: {c.arch} decoder {c.num_layers} layers x {c.hidden_size} '
           f'({p.params["base"] + (p.params["tables"] if p.mode == "full" else 0):,} decoder '
           f'params, {c.param_dtype}), train mode {p.mode}, mesh {mesh} '
           f'({int(np.prod(list(p.mesh.values())))} devices)', 'per device:']
  names = {'base': f'frozen base ({p.params["base"]:,} params)',
           'tables': f'trainable: adaptor tables ({p.params["tables"]:,} params)',
           'optimizer': 'optimizer state (Adam mu, nu)',
           'activations': 'activations + gradients', 'total': 'total'}
  for k in PARTS + ('total',):
    lines.append(f'  {names[k]:<52} {human(p.bytes[k]):>12}  ({p.bytes[k]:,} B)')
  lines.append(f'activations: {p.activations_method}')
  if device_memory is not None:
    verdict = 'fits' if p.fits(device_memory) else 'does not fit'
    lines.append(f'{verdict} in {human(device_memory)} per device '
                 f'({100 * p.bytes["total"] / device_memory:.1f}% of it)')
  return '\n'.join(lines)


def main(argv, flags) -> None:
  """The command line: prints the plan of --config on --mesh (and writes its JSON)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    memory = parse_bytes(flags.device_memory) if flags.device_memory else None
    p = plan(flags.config, parse_mesh(flags.mesh), model=flags.model,
             activations=flags.activations)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e))
  if flags.json == '-':
    print(json.dumps(p.as_json(memory), indent=1))
    return
  print(report(p, flags['config'].config_filename, memory))
  if flags.json:
    with open(flags.json, 'w') as f:
      json.dump(p.as_json(memory), f, indent=1)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)).',
                                  lock_config=False)
  absl_flags.DEFINE_string('mesh', 'data=1,fsdp=1,tensor=1', 'Mesh axis sizes, all explicit.')
  absl_flags.DEFINE_string('model', None, f'Decoder shape: a preset {sorted(PRESETS)}, a JSON '
                           'of DecoderConfig fields or a checkpoint directory (default: the '
                           "config's text_model, else config.model).")
  absl_flags.DEFINE_string('device_memory', None, 'Per-device memory, e.g. 16GiB: says whether '
                           'the plan fits.')
  absl_flags.DEFINE_enum('activations', 'auto', ['auto', 'compile', 'estimate'],
                         "auto: compile where this process has the mesh's devices, else estimate.")
  absl_flags.DEFINE_string('json', None, 'Also write the plan as JSON (exact bytes) to this '
                           "file; '-': print only the JSON.")
  absl_flags.mark_flag_as_required('config')
  app.run(lambda argv: main(argv, absl_flags.FLAGS))
