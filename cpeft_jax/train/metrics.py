"""Training metrics: a step's device metrics as host floats (per-context and per-task figures
named apart, a NaN loss stopped), throughput, and the writers: console (absl logging, printed
above the progress bar), JSON lines in `workdir/metrics.jsonl` and TensorBoard event files in
`workdir/tensorboard`."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorboardX  # pure Python event writer, no TensorFlow
import tqdm

from cpeft_jax import losses
from cpeft_jax import workdir as workdir_lib


def rates(m: dict[str, float], step_s: float, seq_tokens: int) -> dict[str, float]:
  """Perplexity of a step's loss, seconds per step and positions computed per second."""
  return {'perplexity': losses.perplexity(m['loss']), 'step_s': step_s,
          'tokens_per_s': seq_tokens / step_s}


def host_metrics(m, step: int, rows=(), tasks=()) -> dict[str, float]:
  """Host floats of a step's metrics (per-context and per-task arrays flattened); raises on a
  NaN loss."""
  out = {}
  for k, v in m.items():
    v = np.asarray(v)
    if k.endswith('_row'):  # grad_norm_row, update_ratio_row: one figure per context row
      out.update({f'{k[:-4]}/ctx{c}': float(x) for c, x in zip(rows, v)})
    elif k.endswith('_task'):  # loss_task, tokens_task: one figure per task
      out.update({f'{k[:-5]}/{t}': float(x) for t, x in zip(tasks, v)})
    elif k.endswith('_ctx'):
      out.update({f'{k[:-4]}/ctx{c}': float(x) for c, x in enumerate(v)})
    else:
      out[k] = float(v)
  if not math.isfinite(out['loss']):
    raise FloatingPointError(f'Loss is {out["loss"]} at step {step}; the last checkpoint in the '
                             'workdir holds the state before it.')
  return out


class Divergence:
  """Stops a run that has diverged, naming the likely cause:

  - gradients exactly zero for `limit` steps in a row: the loss is stuck (a saturated softmax
    after too large a learning rate, or nothing that trains);
  - the loss above twice ln(vocab_size), worse than guessing every token uniformly twice over,
    for `EXPLODING_STEPS` steps in a row: it is exploding.

  A non-finite loss stops the run at once (`host_metrics`).
  """

  EXPLODING_STEPS = 5

  def __init__(self, limit: int, vocab_size: int):
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
      raise ValueError(f'train.max_zero_grad_steps={limit!r}; expected an integer >= 1.')
    self.limit, self.ceiling = limit, 2 * math.log(max(vocab_size, 2))
    self.zero, self.high, self.step = 0, 0, None

  def update(self, step: int, m: dict[str, float]) -> None:
    if step == self.step:  # the same step's metrics read twice (before a save and after)
      return
    self.step = step
    self.zero = self.zero + 1 if m.get('grad_norm', 1.0) == 0.0 else 0
    self.high = self.high + 1 if m['loss'] > self.ceiling else 0
    if self.zero >= self.limit:
      raise FloatingPointError(
          f'The gradient norm has been exactly 0 for {self.zero} steps up to step {step} (loss '
          f'stuck at {m["loss"]:.4g}): training has diverged or saturated, most likely from too '
          'large an optim.learning_rate; the last checkpoint holds the state before it.')
    if self.high >= self.EXPLODING_STEPS:
      raise FloatingPointError(
          f'The loss has been above {self.ceiling:.4g} (twice ln(vocab_size)) for {self.high} '
          f'steps up to step {step} ({m["loss"]:.4g}): training is diverging, most likely from '
          'too large an optim.learning_rate (or no optim.grad_clip_norm); the last checkpoint '
          'holds the state before it.')


class Writer:
  """Writes scalars per step to the console, `metrics.jsonl` and TensorBoard.

  Only one process of a multi-host run writes (`enabled`). Scalars whose names hold a '/'
  (e.g. 'loss/ctx1') group under one TensorBoard section. `workdir` is an epath path: locally
  each line is appended; an object store cannot append, so there the whole file (its lines
  from before, then this run's) is rewritten with each line.
  """

  def __init__(self, workdir: epath.PathLike, enabled: bool = True):
    self.enabled = enabled
    w = workdir_lib.path(workdir)
    self.path = w / workdir_lib.METRICS
    self._tb = self._lines = None
    if enabled:
      self._tb = tensorboardX.SummaryWriter(str(w / workdir_lib.TENSORBOARD))
      if not workdir_lib.is_local(w):
        self._lines = [self.path.read_text()] if self.path.exists() else []

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    line = f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in clean.items())
    logging.info(line)
    tqdm.tqdm.write(line)  # stdout, kept clear of a running progress bar
    sys.stdout.flush()
    record = json.dumps({'step': step, **clean}) + '\n'
    if self._lines is None:
      with self.path.open('a') as f:
        f.write(record)
    else:
      self._lines.append(record)
      self.path.write_text(''.join(self._lines))
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
