"""What every bench shares: interleaved steady-state timing, peak RSS, the machine's description.

Timing rule (these machines are noisy): each case runs in blocks (one untimed call, then
`steps` timed calls), and the blocks of all cases alternate, round after round, in an order
that reverses every round, so that drifts in machine load hit every case alike. Figures are
medians over all timed calls; ratios are only ever taken between cases of the same run.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np


# The section bench/breakdown.py writes (bench.run keeps it; breakdown's flags clash with run's).
BREAKDOWN_HEADING = '## Context-LoRA C=8 over C=1: where the time goes'


def context_ids(batch: int, seq: int, num_contexts: int) -> np.ndarray:
  """C=1: all zero; C=2: the paper's layout (BOS text, up to 64 image tokens, caption text);
  C>2: contiguous equal segments (e.g. roles or tasks)."""
  if num_contexts == 1:
    return np.zeros((batch, seq), np.int32)
  if num_contexts == 2:
    ids = np.zeros((batch, seq), np.int32)
    ids[:, 1:1 + image_tokens(seq)] = 1
    return ids
  return np.broadcast_to(np.arange(seq) * num_contexts // seq, (batch, seq)).astype(np.int32)


def image_tokens(seq: int) -> int:
  """Image positions after BOS in the paper's layout: 64, or half a shorter sequence."""
  return min(64, seq // 2)


def interleave(cases: Mapping[str, Callable[[], object]], steps: int, rounds: int = 2,
               on_block: Callable[[str, float], None] | None = None) -> dict[str, float]:
  """Median seconds per call of each synchronous `case()` in steady state (see module doc).

  The untimed call of each block pays for what switching programs costs (re-faulting the
  allocator's pages, cold caches), which a training loop never pays.
  """
  times = {k: [] for k in cases}
  order = list(cases)
  for r in range(rounds):
    for k in (order if r % 2 == 0 else order[::-1]):
      cases[k]()
      for _ in range(steps):
        t0 = time.perf_counter()
        cases[k]()
        times[k].append(time.perf_counter() - t0)
      if on_block is not None:
        on_block(k, statistics.median(times[k][-steps:]))
  return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mib() -> float:
  """The process's peak resident set size so far, in MiB.

  Linux's VmHWM: ru_maxrss would not do, since Linux carries it over an exec from the forked
  parent's copy, so a child of a large process would report the parent's size.
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
  """The process's resident set size now, in MiB."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def cpu_model() -> str:
  """The CPU's model name and whether it multiplies bf16 natively (avx512_bf16 or AMX): without,
  XLA:CPU emulates bf16 dots and the bf16 rows slow down several times (so ratios between
  machines of the two kinds do not compare)."""
  name, flags = '', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and not name:
          name = line.split(':', 1)[1].strip()
        elif line.startswith('flags') and not flags:
          flags = set(line.split(':', 1)[1].split())
  except OSError:
    pass
  name = name or platform.processor() or platform.machine()
  if not flags:
    return name
  native = sorted(flags & {'avx512_bf16', 'amx_bf16'})
  return f'{name} (bf16: {", ".join(native) if native else "no avx512_bf16 or amx_bf16"})'


def versions(names=('jax', 'flax', 'optax', 'torch', 'transformers', 'peft')) -> str:
  from importlib import metadata
  out = []
  for n in names:
    try:
      out.append(f'{n} {metadata.version(n)}')
    except metadata.PackageNotFoundError:
      out.append(f'{n} (not installed)')
  return ', '.join(out)


def cores() -> int:
  """CPUs this process may run on (its affinity, e.g. under taskset), else the machine's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def load_average() -> str:
  return ' '.join(f'{x:.2f}' for x in os.getloadavg())


# ----------------------------------------------------------------------------- markdown sections


def _section_span(text: str, heading: str) -> tuple[int, int] | None:
  """(start, end) character offsets of the section that `heading` (a whole line such as
  '## GPU suite') opens: up to the next heading of its level or above, or the end."""
  level = len(heading) - len(heading.lstrip('#'))
  lines = text.splitlines(keepends=True)
  offset, start = 0, None
  for line in lines:
    if start is None and line.rstrip('\n') == heading:
      start = offset
    elif start is not None:
      hashes = len(line) - len(line.lstrip('#'))
      if 0 < hashes <= level and line[hashes:hashes + 1] == ' ':
        return start, offset
    offset += len(line)
  return None if start is None else (start, len(text))


def section(text: str, heading: str) -> str | None:
  """The section `heading` opens in markdown `text` (heading line included), or None."""
  span = _section_span(text, heading)
  return None if span is None else text[span[0]:span[1]]


def replace_section(text: str, heading: str, new: str) -> str:
  """`text` with the section `heading` opens replaced by `new` (which starts with that heading),
  or, without one, `new` appended after a blank line; every other byte of `text` is kept."""
  if not new.startswith(heading + '\n'):
    raise ValueError(f'The new section must start with the line {heading!r}, got {new[:40]!r}.')
  new = new if new.endswith('\n') else new + '\n'
  span = _section_span(text, heading)
  if span is None:  # one blank line between, however many `text` ended with
    return (text.rstrip('\n') + '\n\n' if text.strip() else '') + new
  start, end = span
  if end < len(text) and not new.endswith('\n\n'):
    new += '\n'  # a blank line before the heading that follows
  return text[:start] + new + text[end:]


def write_section(path: str, heading: str, new: str):
  """Replaces (or appends) the section `heading` of the markdown file `path` by `new`
  (`replace_section`), creating the file if there is none."""
  old = open(path).read() if os.path.exists(path) else ''
  with open(path, 'w') as f:
    f.write(replace_section(old, heading, new))
