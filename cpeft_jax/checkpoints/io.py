"""Reading Hugging Face checkpoint files, whatever the architecture: the shared half of loading.

A checkpoint is a directory (or a hub id already in the local Hugging Face cache: `resolve`
never goes online) holding config.json and either safetensors (model.safetensors, or shards
listed in model.safetensors.index.json) or the msgpack files of transformers' former Flax models
(flax_model.msgpack, or shards listed in flax_model.msgpack.index.json). A tensor source
(tensors.py: `Safetensors`, `Arrays`, or `Views` of `Split`/`Concat` pieces over either) hands
out tensors one at a time; `plan_leaves` checks every shape before anything is read and `fill_leaves` writes
the tensors straight into the leaves in the requested dtype, so a model is never held twice.
The name maps that say which tensor fills which leaf are decoder.py's and vision.py's; `dense`
and `layer_norm` are the entries both kinds of map are made of.

Loading is strict: a tensor of the wrong shape or a non-float dtype, a tensor the model needs
and the file lacks, or one the file holds and the model does not use (beyond the name maps'
known-unused buffers) is an error naming the file and the tensors, as is a file that cannot be
read. `partial_load` (fnmatch patterns of checkpoint tensor names, e.g. ('lm_head.weight',))
lists the tensors allowed to be missing: they keep their fresh init, with a warning.

On a mesh (`placement`, a sharding.Placement), each leaf is created in its NamedSharding and
each device receives only its block; what is read for it: a safetensors block reads only its
bytes; transposes, dtype casts, GPT-2's q/k/v split and a gate/up concatenation are index
remaps done per block. The exceptions, all in host memory, none on a device: a Flax msgpack
file has no random access and is read whole (then sliced); a leaf the rules replicate is read
whole once; a missing tensor's fresh init is computed sharded and gathered to the host once;
a quantized leaf (quantize.leaf_quantizer) is quantized from its sharded full-precision leaf
by a jit with out_shardings, since a scale reduces over axes that the mesh splits.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import sharding, trees
from cpeft_jax.models.decoder_config import DTYPES

log = logging.getLogger(__name__)

CONFIG = 'config.json'
SAFETENSORS, SAFETENSORS_INDEX = 'model.safetensors', 'model.safetensors.index.json'
MSGPACK, MSGPACK_INDEX = 'flax_model.msgpack', 'flax_model.msgpack.index.json'

# How a PyTorch tensor becomes a Flax leaf. LINEAR: torch weight [d_out, d_in] -> kernel
# [d_in, d_out]; CONV1D: GPT-2's Conv1D weight, already [d_in, d_out]; EMBED: [vocab, d] as is
# (Flax calls it 'embedding'); VECTOR: as is; SCALE: a LayerNorm weight (Flax's 'scale').
LINEAR, CONV1D, EMBED, VECTOR, SCALE = 'linear', 'conv1d', 'embed', 'vector', 'scale'
# The axes permutation that turns a stored tensor of each kind into its Flax leaf: PyTorch's,
# and that of transformers' former Flax models (whose GPT-2 Conv1D kernel is [d_out, d_in]).
TORCH_LAYOUT = {LINEAR: (1, 0)}
FLAX_LAYOUT = {CONV1D: (1, 0)}


def dense(flax_path: str, hf_name: str, kind: str = LINEAR,
          bias: bool = True) -> dict[str, tuple[str, str]]:
  """Name-map entries of a dense layer: its kernel and (if `bias`) its bias."""
  out = {f'{flax_path}/kernel': (hf_name + '.weight', kind)}
  if bias:
    out[f'{flax_path}/bias'] = (hf_name + '.bias', VECTOR)
  return out


def layer_norm(flax_path: str, hf_name: str) -> dict[str, tuple[str, str]]:
  """Name-map entries of a LayerNorm: its scale (PyTorch's weight) and bias."""
  return {f'{flax_path}/scale': (hf_name + '.weight', SCALE),
          f'{flax_path}/bias': (hf_name + '.bias', VECTOR)}


class LoadReport(NamedTuple):
  """Checkpoint names the model needed but did not find, and found but did not use."""
  missing: tuple[str, ...]
  unexpected: tuple[str, ...]


# ----------------------------------------------------------------------------- locating files


def resolve(path_or_id: str | os.PathLike, *, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """A checkpoint directory: the path itself, or a hub id's snapshot in the local HF cache."""
  path = pathlib.Path(path_or_id).expanduser()
  if path.is_dir():
    return path
  text = str(path_or_id)
  if path.exists() or text.startswith(('/', '.', '~')) or text.count('/') > 1:
    raise FileNotFoundError(f'Checkpoint {text!r} is not a directory.')
  # huggingface_hub is imported here, when a hub id is given, not at every import of the loader.
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
  cache = cache_dir or _hub_cache()
  try:
    return pathlib.Path(snapshot_download(text, revision=revision, cache_dir=cache,
                                          local_files_only=True))
  except (LocalEntryNotFoundError, HFValidationError) as e:
    raise FileNotFoundError(
        f'Checkpoint {text!r} is not a local directory and not in the local Hugging Face cache '
        f'({cache}); loading never downloads. Download it first (`hf download {text}`) or pass '
        'its directory.') from e


def _hub_cache() -> str:
  """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
  if os.environ.get('HF_HUB_CACHE'):
    return os.environ['HF_HUB_CACHE']
  if os.environ.get('HF_HOME'):
    return os.path.join(os.environ['HF_HOME'], 'hub')
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG
  if not path.is_file():
    raise FileNotFoundError(f'No {CONFIG} in checkpoint directory {directory}.')
  config = read_json(path)
  if not isinstance(config, dict):
    raise ValueError(f'{path} holds a JSON {type(config).__name__}; expected an object.')
  return config


def read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e


def swap_in(tmp: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
  """Moves a fully written `tmp` directory to `directory`, replacing any old one; the old one
  is moved aside first and deleted last, so no moment leaves neither."""
  old = directory.with_name(directory.name + '.old')
  if old.exists():
    shutil.rmtree(old)
  if directory.exists():
    directory.rename(old)
  tmp.rename(directory)
  if old.exists():
    shutil.rmtree(old)
  return directory


# ----------------------------------------------------------------------------- planning, filling


def floating(dtype: str) -> bool:
  """Whether a dtype name (safetensors' 'F32', 'BF16', ... or numpy's) is a floating one."""
  return str(dtype).lower().startswith(('f', 'bf'))


# A leaf's plan: the checkpoint name filling each slot (one per layer if stacked; None where the
# checkpoint lacks it), whether it is stacked, and its kind.
Plan = dict[str, tuple[list[str | None], bool, str]]


def plan_leaves(shapes: Mapping[str, Any], source, tensor_of: Callable[[str], tuple],
                layout: Mapping[str, tuple[int, ...]], where: str,
                mismatch: str = '{key}: checkpoint {got}, model {want}') -> tuple[Plan, list]:
  """Which tensor fills each slot of each leaf, and which are missing; nothing is read.

  `tensor_of(path)` gives a leaf's (layer index -> checkpoint name, stacked, kind); `layout`
  maps a kind to the permutation from the stored tensor to the leaf. Every shape and dtype is
  checked first: a shape mismatch (worded by `mismatch`) or a tensor that is not floating point
  (int32, bool: every leaf is a float weight) is an error before anything loads.
  """
  keys = set(source.keys())
  plan, missing, mismatched, typed = {}, [], [], []
  for path, leaf in shapes.items():
    name_of, stacked, kind = tensor_of(path)
    want = tuple(leaf.shape[1:] if stacked else leaf.shape)
    if layout.get(kind):
      want = tuple(want[i] for i in np.argsort(layout[kind]))
    slots = []
    for i in range(leaf.shape[0]) if stacked else [None]:
      key = name_of(i)
      if key not in keys:
        missing.append(key)
        key = None
      else:
        if source.shape(key) != want:
          mismatched.append(mismatch.format(key=key, got=source.shape(key), want=want))
        if not floating(source.dtype(key)):
          typed.append(f'{key} ({source.dtype(key)})')
      slots.append(key)
    plan[path] = (slots, stacked, kind)
  if mismatched:
    raise ValueError(f'Shape mismatch between {where} and the model config (nothing loaded):\n  '
                     + '\n  '.join(mismatched))
  if typed:
    raise ValueError(f'{where}: {len(typed)} tensor(s) are not floating point, where the model '
                     f'expects float weights (nothing loaded): {_brief(typed)}.')
  return plan, missing


def fill_leaves(plan: Plan, shapes: Mapping[str, Any], source,
                layout: Mapping[str, tuple[int, ...]], init: Callable, seed: int,
                param_dtype: str, where: str, leaf_fn: Callable | None = None,
                placement: sharding.Placement | None = None) -> dict:
  """The 'params' tree: each leaf filled tensor by tensor, missing slots from `init(seed)`;
  `leaf_fn(path, array)` transforms each leaf as soon as it is filled.

  Without `placement`, a leaf is assembled on the host and put on the default device. With
  it, each leaf is created in its NamedSharding by jax.make_array_from_callback: the callback
  reads, for each of this process's devices, only that device's block (its layers, and the
  block of each stored tensor, transposed and cast to the leaf's dtype: index remaps), so no
  device ever receives a whole leaf that the rules split. Missing slots come from a jitted
  init whose outputs are already sharded.
  """
  needed = [p for p, (slots, _, _) in plan.items() if None in slots]
  fresh = {}
  if needed:  # Initialise only the leaves with missing tensors: the rest is dead code.
    out_sh = {p: placement(p, shapes[p].shape) for p in needed} if placement else None
    fresh = jax.jit(lambda key: {p: trees.flatten(init(key))[p] for p in needed},
                    out_shardings=out_sh)(jax.random.key(seed))
  dtype = np.dtype(DTYPES[param_dtype])
  used = sum(k is not None for slots, _, _ in plan.values() for k in slots)
  log.info('Loading %d tensors from %s into %d %s leaves%s.', used, where, len(plan),
           param_dtype, f' on mesh {dict(placement.mesh.shape)}' if placement else '')
  out = {}
  for path, (slots, stacked, kind) in plan.items():
    shape = tuple(shapes[path].shape)
    held = np.asarray(fresh[path]) if path in fresh else None  # host copy of the fresh init
    read = _leaf_reader(slots, stacked, layout.get(kind), source, held, shape, dtype)
    if placement is None:
      leaf = read(tuple(slice(None) for _ in shape))
      out[path] = jnp.asarray(leaf) if leaf_fn is None else leaf_fn(path, leaf)
    else:
      leaf = jax.make_array_from_callback(shape, placement(path, shape), _once_per_block(read))
      out[path] = leaf if leaf_fn is None else leaf_fn(path, leaf)
    del leaf, held
    for key in dict.fromkeys(k for k in slots if k is not None):
      source.release(key)
  return trees.unflatten(out)


def _leaf_reader(slots, stacked: bool, axes, source, fresh, shape, dtype) -> Callable:
  """index (slices over the leaf's axes) -> that block of the leaf, read from `source`."""
  def read(index):
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    layers, rest = (index[0], index[1:]) if stacked else (None, index)
    stored = rest if not axes else tuple(rest[list(axes).index(a)] for a in range(len(rest)))
    block = np.empty(tuple(s.stop - s.start for s in index), dtype)
    for j, i in enumerate(range(layers.start, layers.stop) if stacked else [None]):
      key, at = slots[i if stacked else 0], (j if stacked else ...)
      if key is None:
        block[at] = fresh[i if stacked else ...][rest]
      else:
        x = source.read(key, stored)
        block[at] = x.transpose(axes) if axes else x
    return block
  return read


def _once_per_block(read: Callable) -> Callable:
  """`read` that reads a block once, however many devices hold it (a partly replicated leaf
  asks for the same block from each of its replicas)."""
  blocks = {}
  def cached(index):
    key = tuple((s.start, s.stop) for s in index)
    if key not in blocks:
      blocks[key] = read(index)
    return blocks[key]
  return cached


def partial_patterns(partial_load) -> tuple[str, ...]:
  """`partial_load` as a tuple of fnmatch patterns; a string is a comma-separated list."""
  if partial_load is None:
    return ()
  if isinstance(partial_load, str):
    return tuple(p.strip() for p in partial_load.split(',') if p.strip())
  patterns = tuple(partial_load)
  if not all(isinstance(p, str) and p for p in patterns):
    raise ValueError(f'partial_load={partial_load!r}; expected a tuple of fnmatch patterns of '
                     "checkpoint tensor names, e.g. ('lm_head.weight',).")
  return patterns


def check_report(report: LoadReport, where: str, partial_load=(), strict: bool = True,
                 what: str = 'model'):
  """Missing tensors that `partial_load` does not match, and unexpected ones, are an error
  naming `where` and the tensors (with `strict=False`, a warning); allowed missing ones a
  warning. Missing tensors keep their fresh init; unexpected ones are never loaded."""
  patterns = partial_patterns(partial_load)
  allowed = [k for k in report.missing if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
  missing = [k for k in report.missing if k not in allowed]
  problems = []
  if missing:
    problems.append(f'{len(missing)} tensor(s) the {what} needs are missing: {_brief(missing)} '
                    '(config.partial_load lists fnmatch patterns of tensors allowed to be '
                    'missing, which then keep their random init)')
  if report.unexpected:
    problems.append(f'{len(report.unexpected)} tensor(s) in the file are not used by the '
                    f'{what}: {_brief(report.unexpected)}')
  if problems and strict:
    raise ValueError(f'{where} does not match the {what} (nothing loaded): '
                     + '; '.join(problems) + '.')
  for p in problems:
    log.warning('%s (strict=False: loading anyway): %s.', where, p)
  if allowed:
    log.warning('%s: %d tensor(s) missing, allowed by partial_load=%s, keep their random init: '
                '%s.', where, len(allowed), patterns, _brief(allowed))


def _brief(keys) -> str:
  keys = list(keys)
  return ', '.join(keys[:20]) + (f' and {len(keys) - 20} more' if len(keys) > 20 else '')
