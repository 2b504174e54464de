"""The names of what a training run's workdir holds, in one place for every reader and writer,
and the path helpers they share (`path`, `is_local`, `write_text`, `read_json`,
`best_version`).

    DIR/config.json        the run's config (written first; evaluation and plug-ins rebuild from it)
    DIR/tokenizer/         the tokenizer built from the training captions (word-level runs)
    DIR/base_lm/           the demo's stage-0 text decoder (a Hugging Face checkpoint)
    DIR/base_vision/       the demo's stage-0 vision tower (a Hugging Face checkpoint)
    DIR/tfds/              the demo dataset, built on first use unless data.data_dir is set
    DIR/checkpoints/       orbax steps of the train state and its data position
    DIR/best_versions/<s>  the best-validation trainable tree, saved at step s
    DIR/best.json          its step, loss and perplexity, and `version`: which best_versions/<s>
                           is the best (written last, so it is the commit of a best save)
    DIR/best               a symlink to that version, on local disks only (a convenience; older
                           runs' DIR/best is the only pointer, a symlink or a real directory)
    DIR/export/            the adaptor-only export
    DIR/plugins/<context>  every adapted context's plug-in (train.plugins)
    DIR/metrics.jsonl, DIR/tensorboard/, DIR/eval/   metrics of training and evaluation

A workdir is any `etils.epath` path: a local directory or, where its filesystem is installed,
an object store (gs://...), which has neither symlinks nor atomic renames (but writes each object
atomically); code that reads or writes one goes through these helpers and epath, not os.path.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

CONFIG = 'config.json'
TOKENIZER = 'tokenizer'
BASE_LM = 'base_lm'
BASE_VISION = 'base_vision'
TFDS = 'tfds'
CHECKPOINTS = 'checkpoints'
BEST = 'best'
BEST_JSON = 'best.json'
BEST_VERSIONS = 'best_versions'
VERSION = 'version'  # best.json's key naming the best version, relative to the workdir
EXPORT = 'export'
PLUGINS = 'plugins'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
EVAL = 'eval'
TMP = '.tmp'  # suffix of a local file being written, replaced onto its name when complete


def is_local(p: epath.PathLike) -> bool:
  """Whether `p` is on a local filesystem (no URI scheme such as gs://)."""
  return '://' not in os.fspath(p)


def path(p: epath.PathLike) -> epath.Path:
  """`p` as an epath.Path; a local one made absolute (orbax wants absolute paths)."""
  return epath.Path(os.path.abspath(p) if is_local(p) else p)


def write_text(p: epath.PathLike, text: str) -> None:
  """Writes `p` so that a reader sees the old text or the new, never a part.

  Locally through `p`.tmp renamed onto `p`; on an object store with one object write (which is
  atomic there, and a rename is a copy).
  """
  p = path(p)
  if not is_local(p):
    p.write_text(text)
    return
  tmp = p.parent / (p.name + TMP)
  tmp.write_text(text)
  os.replace(tmp, p)


def read_json(p: epath.PathLike) -> dict[str, Any]:
  """The JSON object in file `p`, or {} when there is no such file."""
  p = path(p)
  if not p.is_file():
    return {}
  return json.loads(p.read_text())


def best_version(workdir: epath.PathLike) -> epath.Path | None:
  """The directory of a run's best-validation weights, or None when it has none yet.

  The version best.json names; for runs older than that key, DIR/best (a symlink or a real
  directory). A version named but missing is returned as named: its reader says it is gone.
  """
  w = path(workdir)
  version = read_json(w / BEST_JSON).get(VERSION)
  if version:
    return w / version
  best = w / BEST
  return best if best.is_dir() else None
