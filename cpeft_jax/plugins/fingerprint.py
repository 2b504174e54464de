"""Fingerprints of frozen bases: what a plug-in records of the base it was trained on.

A fingerprint is a hash of the architecture (the config dataclass) plus, per tensor, its shape,
mean, rms and a few strided values; loading a plug-in compares the base at hand with it
(`check_base`), and every field must be present (`check_fingerprints`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import trees
from cpeft_jax.configlib import is_int, is_number

_SAMPLES = 8  # values sampled per base tensor for the fingerprint
# Config fields that do not change what the base computes (precision, memory, regularisation,
# how the layers are laid out for the compiler).
_NOT_ARCHITECTURE = ('dtype', 'param_dtype', 'remat', 'residual_dropout', 'unroll_layers')


def fingerprint(params, config=None) -> dict[str, Any]:
  """What identifies a frozen base: its architecture and a few statistics of every tensor.

  'config' hashes the config dataclass (precision and memory fields left out, and fields at
  their default, so that a field added to the class later keeps old plug-ins valid);
  'tensors' holds, per leaf path, its shape, mean, rms and a few strided values. Statistics
  (not byte hashes) so that the same base loaded in bfloat16 or float32 still matches.
  """
  arch = None
  if config is not None:
    defaults = {f.name: f.default for f in dataclasses.fields(config)
                if f.default is not dataclasses.MISSING}
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in _NOT_ARCHITECTURE and not (k in defaults and v == defaults[k])}
    arch = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
  flat = trees.flatten(params)
  stats = jax.device_get(_stats(flat))  # one compiled call for the whole tree
  tensors = {path: {'shape': list(np.shape(flat[path])), 'stats': [float(v) for v in stats[path]]}
             for path in sorted(flat)}
  return {'config': arch, 'tensors': tensors}


@jax.jit
def _stats(flat):
  """Per leaf: mean, rms and a few strided values, in float32."""
  def one(leaf):
    x = jnp.ravel(leaf).astype(jnp.float32)
    idx = np.linspace(0, x.size - 1, min(_SAMPLES, x.size)).astype(np.int64)
    return jnp.concatenate([jnp.stack([x.mean(), jnp.sqrt((x * x).mean())]), x[idx]])
  return {path: one(leaf) for path, leaf in flat.items()}


def check_base(want: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
  """Raises if fingerprint `got` (the base at hand) is not `want` (the one `what` was built on)."""
  if want.get('config') and got.get('config') and want['config'] != got['config']:
    raise ValueError(f'{what} was trained on a base with another architecture (config hash '
                     f'{want["config"]}, this base has {got["config"]}).')
  w, g = want['tensors'], got['tensors']
  if set(w) != set(g):
    raise ValueError(f'{what} was trained on a base with other tensors: missing here '
                     f'{sorted(set(w) - set(g))[:5]}, not in its base '
                     f'{sorted(set(g) - set(w))[:5]}.')
  differ = []
  for path in sorted(w):
    if w[path]['shape'] != g[path]['shape']:
      differ.append(f'{path} (shape {g[path]["shape"]}, expected {w[path]["shape"]})')
      continue
    ws, gs = np.asarray(w[path]['stats']), np.asarray(g[path]['stats'])
    if not (np.abs(ws - gs) <= 3e-2 * max(ws[1], 1e-12)).all():  # bf16 rounding passes
      differ.append(path)
  if differ:
    raise ValueError(f'{what} was trained on another base: the weights of {len(differ)} '
                     f'tensor(s) differ, e.g. {differ[:5]}. Load the base it was saved with.')


def check_fingerprints(bases, where: str) -> None:
  """Raises unless `bases` is a non-empty {name: fingerprint} with every field `fingerprint`
  writes present and well-formed, so that no check can be skipped by leaving a field out."""
  if not isinstance(bases, Mapping) or not bases:
    raise ValueError(f'{where}: "bases" is {bases!r}; expected the fingerprint of at least one '
                     "base, {name: {'config': ..., 'tensors': ...}} as plugins.fingerprint "
                     'writes it.')
  for name, fp in bases.items():
    what = f'{where}: the fingerprint of base {name!r}'
    if not isinstance(fp, Mapping):
      raise ValueError(f'{what} is {type(fp).__name__}; expected an object.')
    if missing := [k for k in ('config', 'tensors') if k not in fp]:
      raise ValueError(f'{what} lacks field(s) {missing}; expected "config" (a hash or null) '
                       'and "tensors".')
    if fp['config'] is not None and not isinstance(fp['config'], str):
      raise ValueError(f'{what}: "config" is {fp["config"]!r}; expected a hash string or null.')
    tensors = fp['tensors']
    if not isinstance(tensors, Mapping) or not tensors:
      raise ValueError(f'{what}: "tensors" is {tensors!r}; expected {{path: {{"shape", '
                       '"stats"}}} of at least one tensor.')
    for path, t in tensors.items():
      if not isinstance(t, Mapping) or (missing := [k for k in ('shape', 'stats') if k not in t]):
        raise ValueError(f'{what}: tensor {path!r} lacks field(s) '
                         f'{missing if isinstance(t, Mapping) else ["shape", "stats"]}.')
      shape, stats = t['shape'], t['stats']
      if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise ValueError(f'{what}: tensor {path!r} has shape {shape!r}; expected a list of '
                         'sizes.')
      want = 2 + min(_SAMPLES, int(np.prod(shape)))
      if not (isinstance(stats, list) and len(stats) == want
              and all(is_number(v) for v in stats)):
        raise ValueError(f'{what}: tensor {path!r} has stats {stats!r}; expected {want} '
                         'numbers (mean, rms and sampled values).')


def model_bases(params, decoder_config=None, encoder_config=None) -> dict[str, dict[str, Any]]:
  """Fingerprints of a captioning model's parts that plug-in tables depend on.

  'decoder' and 'encoder' (the frozen base) and 'connector': a plug-in's tables were trained on
  what its connector fed the decoder, so the connector counts as part of its base too.
  """
  configs = {'decoder': decoder_config, 'encoder': encoder_config}
  return {name: fingerprint(params[name], configs.get(name)
                            if dataclasses.is_dataclass(configs.get(name)) else None)
          for name in ('decoder', 'encoder', 'connector') if params.get(name)}
