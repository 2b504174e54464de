"""Metric writers: console (absl logging) and JSON lines in the workdir."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging


class Writer:
  """Writes scalars per step to the log and to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    line = f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in clean.items())
    logging.info(line)
    print(line, flush=True)
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **clean}) + '\n')
