"""Metric writers: console (absl logging, printed above the progress bar), JSON lines in
`workdir/metrics.jsonl` and TensorBoard event files in `workdir/tensorboard`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import logging
import tqdm


class Writer:
  """Writes scalars per step to the console, `metrics.jsonl` and TensorBoard.

  Only one process of a multi-host run writes (`enabled`). Scalars whose names hold a '/'
  (e.g. 'loss/ctx1') group under one TensorBoard section.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      import tensorboardX  # pure Python event writer, no TensorFlow
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    line = f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in clean.items())
    logging.info(line)
    tqdm.tqdm.write(line)  # stdout, kept clear of a running progress bar
    sys.stdout.flush()
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **clean}) + '\n')
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
