"""Tensor sources: checkpoint files handed out one tensor, or one slice of a tensor, at a time.

`Safetensors` (PyTorch names and layouts) and `Arrays` (transformers' former Flax msgpack files)
read the files `open_weights` finds; `Views` presents `Split` and `Concat` pieces of their
tensors under other names (a fused QKV split into q/k/v, or the reverse for writing).

Every source's `read(key, index)` takes an optional index (a tuple of slices, one per stored
axis) and returns only that block: safetensors reads just its bytes from the file
(safe_open's get_slice), a piece of a `Split` or `Concat` maps the block to its stored
tensors' blocks, so a sharded load reads what each device owns and no more. `release(key)`
says a tensor will not be read again (an in-memory source then drops it).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

from cpeft_jax import trees
from cpeft_jax.checkpoints.io import (CONV1D, EMBED, LINEAR, MSGPACK, MSGPACK_INDEX, SAFETENSORS,
                                      SAFETENSORS_INDEX, SCALE, VECTOR, floating,
                                      read_json)


class Safetensors:
  """Safetensors files read one tensor at a time; names and layouts are PyTorch's.

  `where` names the checkpoint in errors: the file, or the index of a sharded one.
  """
  torch_layout, sep = True, '.'

  def __init__(self, files, where: str | None = None):
    from safetensors import safe_open  # imported where the format is read
    self._file_of, self._path_of = {}, {}
    self.where = where or ', '.join(map(str, files))
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
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

  def read(self, key, index: tuple[slice, ...] | None = None) -> np.ndarray:
    with jax.default_device(jax.local_devices(backend='cpu')[0]):  # host memory, not an accelerator's
      try:
        if index is None:
          return np.asarray(self._file_of[key].get_tensor(key))
        return np.asarray(self._file_of[key].get_slice(key)[index])  # only the block's bytes
      except Exception as e:  # noqa: BLE001 - SafetensorError, ...
        raise ValueError(f'{self._path_of[key]}: tensor {key} cannot be read: {e}') from e

  def release(self, key) -> None:
    del key  # nothing held: every read goes to the file


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

  def read(self, key, index: tuple[slice, ...] | None = None) -> np.ndarray:
    x = self._arrays[key]
    return np.asarray(x if index is None else x[index])

  def release(self, key) -> None:
    self._arrays.pop(key, None)  # each tensor is used once, then freed


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
      index_data = read_json(directory / index)
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

  A block of a piece is read as the blocks of its stored tensors that it covers (each piece of
  GPT-2's c_attn reads only its third). A stored tensor that several pieces share is released
  after its last piece. `_axis(kind, ndim)` is the stored axis that becomes the leaf's last one.
  """

  def __init__(self, source, layout):
    self.source, self.layout = source, layout
    self.torch_layout, self.sep, self.where = source.torch_layout, source.sep, source.where
    self._views, self._uses = {}, {}
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

  def read(self, key, index: tuple[slice, ...] | None = None) -> np.ndarray:
    if key not in self._views:
      return self.source.read(key, index)
    spec, parts, kind = self._views[key]
    shapes = [self.source.shape(p) for p in parts]
    axis = self._axis(kind, len(shapes[0]))
    if index is None:
      index = tuple(slice(None) for _ in shapes[0])
    start, stop, _ = index[axis].indices(self.shape(key)[axis])
    at = lambda lo, hi: index[:axis] + (slice(lo, hi),) + index[axis + 1:]
    if isinstance(spec, Split):
      if shapes[0][axis] % spec.parts:
        raise ValueError(f'{self.where}: {spec.name} has {shapes[0][axis]} features along '
                         f'axis {axis}, which do not split into {spec.parts} equal parts.')
      offset = spec.index * (shapes[0][axis] // spec.parts)
      return self.source.read(parts[0], at(offset + start, offset + stop))
    blocks, offset = [], 0
    for p, shape in zip(parts, shapes):  # the stretch [start, stop) of the joined axis
      lo, hi = max(start, offset), min(stop, offset + shape[axis])
      if lo < hi:
        blocks.append(self.source.read(p, at(lo - offset, hi - offset)))
      offset += shape[axis]
    return np.concatenate(blocks, axis=axis)

  def release(self, key) -> None:
    """A stored tensor is released once every piece that reads it is."""
    if key not in self._views:
      self.source.release(key)
      return
    for p in self.sources(key):
      self._uses[p] -= 1
      if not self._uses[p]:
        self.source.release(p)
