"""Reading Hugging Face checkpoint files, whatever the architecture: the shared half of loading.

A checkpoint is a directory (or a hub id already in the local Hugging Face cache: `resolve`
never goes online) holding config.json and either safetensors (model.safetensors, or shards
listed in model.safetensors.index.json) or the msgpack files of transformers' former Flax models
(flax_model.msgpack, or shards listed in flax_model.msgpack.index.json). A tensor source
(`Safetensors`, `Arrays`, or `Views` of `Split`/`Concat` pieces over either) hands out tensors
one at a time; `plan_leaves` checks every shape before anything is read and `fill_leaves` writes
the tensors straight into the leaves in the requested dtype, so a model is never held twice.
The name maps that say which tensor fills which leaf are decoder.py's and vision.py's; `dense`
and `layer_norm` are the entries both kinds of map are made of.

Loading is strict: a tensor of the wrong shape or a non-float dtype, a tensor the model needs
and the file lacks, or one the file holds and the model does not use (beyond the name maps'
known-unused buffers) is an error naming the file and the tensors, as is a file that cannot be
read. `partial_load` (fnmatch patterns of checkpoint tensor names, e.g. ('lm_head.weight',))
lists the tensors allowed to be missing: they keep their fresh init, with a warning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cpeft_jax import trees
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
  config = _read_json(path)
  if not isinstance(config, dict):
    raise ValueError(f'{path} holds a JSON {type(config).__name__}; expected an object.')
  return config


def _read_json(path: pathlib.Path):
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


# ----------------------------------------------------------------------------- tensor sources


def floating(dtype: str) -> bool:
  """Whether a dtype name (safetensors' 'F32', 'BF16', ... or numpy's) is a floating one."""
  return str(dtype).lower().startswith(('f', 'bf'))


class Safetensors:
  """Safetensors files read one tensor at a time; names and layouts are PyTorch's.

  `where` names the checkpoint in errors: the file, or the index of a sharded one.
  """
  torch_layout, sep = True, '.'

  def __init__(self, files, where: str | None = None):
    from safetensors import safe_open  # imported where the format is read
    self._file_of, self._path_of = {}, {}
    self.where = where or ', '.join(map(str, files))
    with jax.default_device(jax.devices('cpu')[0]):
      for file in files:
        # 'flax', not 'numpy': numpy has no bfloat16. Reads go to the CPU (see `read`).
        # safe_open checks the header and that the data covers every tensor (a truncated file
        # fails here); its errors do not name the file.
        try:
          handle = safe_open(str(file), framework='flax')
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
          raise ValueError(f'{file} is not a readable safetensors file: {e}') from e
        self._file_of.update(dict.fromkeys(handle.keys(), handle))
        self._path_of.update(dict.fromkeys(handle.keys(), str(file)))

  def name(self, hf_name: str, kind: str) -> str:
    del kind
    return hf_name

  def keys(self):
    return self._file_of.keys()

  def shape(self, key):
    return tuple(self._file_of[key].get_slice(key).get_shape())

  def dtype(self, key) -> str:
    return self._file_of[key].get_slice(key).get_dtype()

  def read(self, key) -> np.ndarray:
    with jax.default_device(jax.devices('cpu')[0]):  # host memory, not an accelerator's
      try:
        return np.asarray(self._file_of[key].get_tensor(key))
      except Exception as e:  # noqa: BLE001 - SafetensorError, ...
        raise ValueError(f'{self._path_of[key]}: tensor {key} cannot be read: {e}') from e


class Arrays:
  """In-memory arrays keyed by name: a PyTorch state dict, or a flattened Flax msgpack."""

  def __init__(self, arrays: Mapping[str, Any], torch_layout: bool,
               where: str = 'the state dict'):
    self._arrays, self.torch_layout, self.where = dict(arrays), torch_layout, where
    self.sep = '.' if torch_layout else '/'

  def name(self, hf_name: str, kind: str) -> str:
    if self.torch_layout:
      return hf_name
    # transformers' Flax models: 'model/layers/0/self_attn/q_proj/kernel', 'norm/weight', ...
    *path, leaf = hf_name.split('.')
    if leaf == 'weight':
      leaf = {LINEAR: 'kernel', CONV1D: 'kernel', EMBED: 'embedding', VECTOR: 'weight',
              SCALE: 'scale'}[kind]
    return '/'.join(path + [leaf])

  def keys(self):
    return self._arrays.keys()

  def shape(self, key):
    return tuple(np.shape(self._arrays[key]))

  def dtype(self, key) -> str:
    x = self._arrays[key]
    dtype = getattr(x, 'dtype', None)
    if dtype is None:
      dtype = np.asarray(x).dtype
    return str(dtype).removeprefix('torch.')  # numpy's or PyTorch's name

  def read(self, key) -> np.ndarray:
    return np.asarray(self._arrays.pop(key))  # popped: each tensor is used once, then freed


def _read_msgpack(files, where: str | None = None) -> Arrays:
  """transformers' Flax checkpoints are msgpack (no random access): each file is read whole."""
  flat = {}
  for file in files:
    try:
      state = flax.serialization.msgpack_restore(pathlib.Path(file).read_bytes())
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on a bad file
      raise ValueError(f'{file} is not a readable Flax msgpack file: {type(e).__name__}: '
                       f'{e}') from e
    if not isinstance(state, dict):
      raise ValueError(f'{file} holds a msgpack {type(state).__name__}; expected a tree of '
                       'arrays.')
    flat.update(trees.flatten(state))  # shards hold flat '/' keys
    del state
  return Arrays(flat, torch_layout=False, where=where or ', '.join(map(str, files)))


def open_weights(directory: pathlib.Path, msgpack: bool = True):
  """The tensors of a checkpoint directory: safetensors, or (if `msgpack`) Flax msgpack files."""
  formats = [(SAFETENSORS, SAFETENSORS_INDEX, Safetensors)]
  if msgpack:
    formats.append((MSGPACK, MSGPACK_INDEX, _read_msgpack))
  for single, index, opener in formats:
    if (directory / single).is_file():
      return opener([directory / single], str(directory / single))
    if (directory / index).is_file():
      index_data = _read_json(directory / index)
      weight_map = index_data.get('weight_map') if isinstance(index_data, dict) else None
      if not isinstance(weight_map, dict) or not all(
          isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f'{directory / index} has no "weight_map" of tensor name -> file name.')
      files = [directory / f for f in dict.fromkeys(weight_map.values())]
      absent = [f.name for f in files if not f.is_file()]
      if absent:
        raise FileNotFoundError(f'{directory / index} lists shards that are not there: {absent}.')
      return opener(files, str(directory / index))
  names = [name for single, index, _ in formats for name in (single, index)]
  present = sorted(p.name for p in directory.iterdir())
  raise FileNotFoundError(
      f'No weights in {directory}: expected {", ".join(names[:-1])} or {names[-1]}; found '
      f'{present}. (PyTorch .bin files are not read: save the model again with '
      'save_pretrained, which writes safetensors.)')


@dataclasses.dataclass(frozen=True)
class Split:
  """Piece `index` of `parts` equal pieces of one tensor along the leaf's output (last) axis:
  GPT-2's fused c_attn holds q, k and v."""
  name: str
  index: int
  parts: int


@dataclasses.dataclass(frozen=True)
class Concat:
  """Tensors joined along the leaf's output axis: separate gate and up into gate_up_proj."""
  names: tuple[str, ...]


class Views:
  """A tensor source plus the `Split`/`Concat` pieces a name map asks for, as extra keys.

  A stored tensor that several pieces share (GPT-2's c_attn) is read once and kept until its
  last piece is read. `_axis(kind, ndim)` is the stored axis that becomes the leaf's last one.
  """

  def __init__(self, source, layout):
    self.source, self.layout = source, layout
    self.torch_layout, self.sep, self.where = source.torch_layout, source.sep, source.where
    self._views, self._uses, self._held = {}, {}, {}
    self._present = set(source.keys())

  def define(self, spec, kind) -> str:
    """The key of a name-map entry (already mapped through `source.name`)."""
    if isinstance(spec, str):
      return spec
    parts = (spec.name,) if isinstance(spec, Split) else tuple(spec.names)
    key = (f'{spec.name}[{spec.index}/{spec.parts}]' if isinstance(spec, Split)
           else '+'.join(parts))
    if key not in self._views:
      self._views[key] = (spec, parts, kind)
      for p in parts:
        self._uses[p] = self._uses.get(p, 0) + 1
    return key

  def sources(self, key) -> tuple[str, ...]:
    return self._views[key][1] if key in self._views else (key,)

  def absent(self, key) -> list[str]:
    return [p for p in self.sources(key) if p not in self._present]

  def keys(self):
    return self._present | {k for k in self._views if not self.absent(k)}

  def _axis(self, kind, ndim):
    perm = self.layout.get(kind)
    return perm[-1] if perm else ndim - 1

  def shape(self, key):
    if key not in self._views:
      return self.source.shape(key)
    spec, parts, kind = self._views[key]
    shapes = [list(self.source.shape(p)) for p in parts]
    axis = self._axis(kind, len(shapes[0]))
    out = shapes[0]
    if isinstance(spec, Split):
      out[axis] //= spec.parts
    else:
      out[axis] = sum(s[axis] for s in shapes)
    return tuple(out)

  def dtype(self, key) -> str:
    """The stored dtype; of pieces, the first that is not floating, if any."""
    dtypes = [self.source.dtype(p) for p in self.sources(key)]
    return next((d for d in dtypes if not floating(d)), dtypes[0])

  def _read(self, name):
    if name not in self._held:
      self._held[name] = self.source.read(name)
    x = self._held[name]
    self._uses[name] -= 1
    if not self._uses[name]:
      del self._held[name]
    return x

  def read(self, key) -> np.ndarray:
    if key not in self._views:
      return self.source.read(key)
    spec, parts, kind = self._views[key]
    xs = [self._read(p) for p in parts]
    axis = self._axis(kind, xs[0].ndim)
    if isinstance(spec, Split):
      if xs[0].shape[axis] % spec.parts:
        raise ValueError(f'{self.where}: {spec.name} has {xs[0].shape[axis]} features along '
                         f'axis {axis}, which do not split into {spec.parts} equal parts.')
      return np.split(xs[0], spec.parts, axis=axis)[spec.index]
    return np.concatenate(xs, axis=axis)


# ----------------------------------------------------------------------------- planning, filling

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
                param_dtype: str, where: str, leaf_fn: Callable | None = None) -> dict:
  """The 'params' tree: each leaf filled tensor by tensor, missing slots from `init(seed)`;
  `leaf_fn(path, array)` transforms each leaf as soon as it is filled."""
  fresh = {}
  needed = [p for p, (slots, _, _) in plan.items() if None in slots]
  if needed:  # Initialise only the leaves with missing tensors: the rest is dead code.
    fresh = jax.jit(lambda key: {p: trees.flatten(init(key))[p]
                                 for p in needed})(jax.random.key(seed))
  dtype = np.dtype(DTYPES[param_dtype])
  used = sum(k is not None for slots, _, _ in plan.values() for k in slots)
  log.info('Loading %d tensors from %s into %d %s leaves.', used, where, len(plan), param_dtype)
  out = {}
  for path, (slots, stacked, kind) in plan.items():
    buf = np.empty(shapes[path].shape, dtype)
    axes = layout.get(kind)
    for i, key in enumerate(slots):
      at = i if stacked else ...
      if key is None:
        buf[at] = np.asarray(fresh[path][at])
      else:
        x = source.read(key)
        buf[at] = x.transpose(axes) if axes else x
    out[path] = jnp.asarray(buf) if leaf_fn is None else leaf_fn(path, buf)
    del buf
  return trees.unflatten(out)


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
