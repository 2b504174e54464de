"""Checksums of array trees: what was saved is what is read back, or an error says where not.

Each leaf's digest is a sha256 of its dtype, shape and bytes, keyed by its path
('trainable/adaptors/decoder/.../lora_a'). Orbax (0.12) checks none of the data it reads
(tensorstore's crc32c covers only the index of zarr3 shards, and 8 flipped bytes in a data file
restore without a word), so checkpoints carry these digests in their metadata and readers
compare (`verify`). Plug-ins carry one hash of all their tables (`tree_sha256`).

Multi-process: a leaf sharded across processes has no full copy on any one host, so its digest
is None (recorded so, never checked); replicated leaves, and every leaf of a one-process run,
are checked in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from cpeft_jax import trees

METADATA_KEY = 'sha256'  # where a checkpoint's orbax custom metadata holds its digests
STEP_METADATA = '_CHECKPOINT_METADATA'  # the file orbax writes that custom metadata to


class Damaged(ValueError):
  """A checkpoint or plug-in that cannot be read back as it was saved."""


def unreadable(what: str, e: BaseException) -> Damaged:
  """The error for a checkpoint the reader fails on: the first line of its error, shortened."""
  why = (str(e).strip().splitlines() or [''])[0]
  why = why if len(why) <= 300 else why[:300] + '...'
  return Damaged(f'{what} is unreadable: {type(e).__name__}: {why.rstrip(".")}.')


def read(fn, what: str):
  """fn() (an orbax read); whatever it raises becomes `Damaged` naming `what`."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001  (whatever orbax raises for damaged files)
    raise unreadable(what, e) from e


def check_saved(directory: epath.PathLike, custom_metadata, tree, what: str,
                prefix: str = '') -> None:
  """Verifies `tree` (read from the orbax checkpoint in `directory`, under `prefix` of what was
  saved) against the digests in its custom metadata; unverified with a warning if it has none."""
  digests_ = recorded(directory, custom_metadata, what)
  if digests_ is not None:
    verify(subtree(digests_, prefix) if prefix else digests_, tree, what)


def recorded(directory: epath.PathLike, custom_metadata: Mapping[str, Any] | None,
             what: str) -> dict[str, str | None] | None:
  """The digests saved with the orbax checkpoint in `directory` (from its custom metadata).

  None, with a warning, for a checkpoint saved before digests were recorded; `Damaged` when
  the file that holds them is gone.
  """
  holder = epath.Path(directory) / STEP_METADATA
  if not holder.is_file():
    raise Damaged(f'{what} is damaged: {holder}, which holds its checksums, is missing.')
  digests_ = (custom_metadata or {}).get(METADATA_KEY)
  if digests_ is None:
    logging.warning('%s was saved without checksums (by an older version): read unverified.',
                    what)
  return digests_


def _host(x) -> np.ndarray | None:
  """The whole leaf on this host, or None when it is sharded across processes."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.is_fully_replicated:
        return None
      x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def _update(h, x: np.ndarray) -> None:
  x = np.ascontiguousarray(x)
  h.update(f'{x.dtype.name}{list(x.shape)}'.encode())
  h.update(x.reshape(-1).view(np.uint8).data)


def _leaves(tree, is_leaf=None) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {trees.path_str(path): leaf for path, leaf in flat}


def digests(tree) -> dict[str, str | None]:
  """{path: sha256 of the leaf's dtype, shape and bytes}; None for leaves no host holds whole."""
  out = {}
  for path, leaf in _leaves(tree).items():
    x = _host(leaf)
    if x is None:
      out[path] = None
      continue
    h = hashlib.sha256()
    _update(h, x)
    out[path] = h.hexdigest()
  return out


def tree_sha256(tree) -> str:
  """One sha256 over every leaf's path, dtype, shape and bytes, in sorted path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(_leaves(tree).items()):
    x = _host(leaf)
    if x is None:
      raise ValueError(f'tree_sha256: leaf {path} is sharded across processes; gather it first.')
    h.update(path.encode() + b'\0')
    _update(h, x)
  return h.hexdigest()


def subtree(recorded: Mapping[str, str | None], prefix: str) -> dict[str, str | None]:
  """The digests under `prefix` ('trainable'), with their paths relative to it."""
  start = prefix + trees.SEP
  return {k[len(start):]: v for k, v in recorded.items() if k.startswith(start)}


def verify(recorded: Mapping[str, str | None], tree, what: str) -> None:
  """Raises `Damaged` naming `what` and the leaves whose bytes differ from `recorded`."""
  got = digests(tree)
  bad = [k for k in sorted(got.keys() & recorded.keys())
         if got[k] is not None and recorded[k] is not None and got[k] != recorded[k]]
  missing, extra = sorted(recorded.keys() - got.keys()), sorted(got.keys() - recorded.keys())
  problems = ([f'changed bytes in {trees.some(bad)}'] if bad else []) + (
      [f'not read back: {trees.some(missing)}'] if missing else []) + (
      [f'read back but never saved: {trees.some(extra)}'] if extra else [])
  if problems:
    raise Damaged(f'{what} is damaged: its sha256 checksums do not match what was saved '
                  f'({"; ".join(problems)}).')


def as_saved(abstract, saved):
  """`abstract` (ShapeDtypeStructs) with the dtypes of `saved` (orbax metadata, matched by
  path), so that the bytes read back are the bytes hashed; cast to the wanted dtype after."""
  dtypes = {k: getattr(v, 'dtype', None)
            for k, v in _leaves(saved, lambda x: hasattr(x, 'dtype')).items()}

  def one(path, a):
    dtype = dtypes.get(trees.path_str(path))
    if dtype is None or np.dtype(dtype) == a.dtype:
      return a
    return jax.ShapeDtypeStruct(a.shape, dtype, sharding=getattr(a, 'sharding', None))
  return jax.tree_util.tree_map_with_path(one, abstract)


def cast_like(tree, abstract):
  """`tree` with each leaf cast to the dtype of `abstract`'s."""
  return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), tree, abstract)
