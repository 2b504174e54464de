"""XLA flags (and glibc malloc tunables) the training command line sets before JAX starts (this
module imports no JAX).

XLA reads XLA_FLAGS once, when its first backend starts, so `train.py` calls
`set_training_defaults()` at import, before its config (which imports jax) is loaded and before
any computation. A flag the user's own XLA_FLAGS already names is left as the user set it.
glibc reads GLIBC_TUNABLES only as a process starts, so `train.py` run as a command passes
`restart=True`, which first re-executes it with TUNABLES added (`restart_with_tunables`; once,
the user's own settings kept).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import MutableMapping

# XLA:CPU's concurrency-optimized scheduler keeps more buffers alive to run independent ops side
# by side. For train steps that bought no speed and cost memory (bench/: paper shape, bf16 LoRA
# step: XLA peak 1965 -> 1747 MiB, peak RSS of a LoRA C=2 run with layer remat 1914 -> 1748
# MiB, step time unchanged); one-token generation steps gain a few percent from it, so only
# training sets this. The flag is ignored by the GPU and TPU backends.
TRAINING = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)
# For tiny shapes, where compiling dominates (the tests, the fault sweep): LLVM compiles without
# its optimisations, and XLA:CPU emits its loop fusions with the classic IR emitter instead of
# the MLIR fusion emitters, which cost more to compile than tiny programs take to run (one
# process, tests/test_losses.py: 57 -> 36 s; the suite on 2 cores: 17m27s -> 11m08s). XLA's HLO
# passes still run, so dots and collectives are those of the users' programs; elementwise ops
# are fused differently (fewer fusions, a scatter becomes a loop), so temporaries can differ.
FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
                '--xla_cpu_use_fusion_emitters=false')


def _unnamed(defaults, settings) -> list[str]:
  """The NAME=VALUE `defaults` whose NAME no entry of `settings` names."""
  named = {x.split('=')[0] for x in settings}
  return [x for x in defaults if x.split('=')[0] not in named]


def add_defaults(defaults, environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds `defaults` to environ['XLA_FLAGS'] (those it does not name yet); returns it."""
  flags = environ.get('XLA_FLAGS', '').split()
  environ['XLA_FLAGS'] = ' '.join(flags + _unnamed(defaults, flags))
  return environ['XLA_FLAGS']


def set_training_defaults(environ: MutableMapping[str, str] = os.environ,
                          restart: bool = False) -> str:
  """Adds TRAINING's flags to environ['XLA_FLAGS'] (those it does not name yet); returns it.
  `restart` (a command's `__name__ == '__main__'`): first `restart_with_tunables`."""
  if restart:
    restart_with_tunables(environ)
  return add_defaults(TRAINING, environ)


# XLA:CPU allocates each execution's temporaries (a train step's activations: 780 MiB at bench/'s
# paper shape) as one block, which glibc maps afresh for every step; the kernel then faults it in
# and zeroes it 4 KiB at a time (200k page faults, about 350 ms of system time per step).
# glibc.malloc.hugetlb=1 has glibc advise transparent huge pages on its maps, taken where THP is in
# 'madvise' mode (the kernel's usual default), 2 MiB per fault (bench/: paper shape, bf16 LoRA
# C=1, 2-core EPYC: 900 faults and ~95 ms of system time per step; step 2757 -> 2425 ms and
# 2772 -> 2577 in two pairs of runs; peak RSS unchanged). Not for PyTorch in the same process:
# its many smaller maps get slower (transformers+peft's bf16 step 2907 -> 3521 ms), so bench.run
# times the peer in a process without it.
TUNABLES = ('glibc.malloc.hugetlb=1',)
# Set by `restart_with_tunables` in the restarted process: the tunables it added.
ADDED_TUNABLES = 'CPEFT_ADDED_GLIBC_TUNABLES'


def add_tunables(environ: MutableMapping[str, str]) -> bool:
  """Adds TUNABLES to environ['GLIBC_TUNABLES'] (those it does not name yet); True if any was
  added (recorded in environ[ADDED_TUNABLES])."""
  have = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  new = _unnamed(TUNABLES, have)
  if not new:
    return False
  environ['GLIBC_TUNABLES'] = ':'.join(have + new)
  environ[ADDED_TUNABLES] = ':'.join(new)
  return True


def user_environ(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
  """A copy of `environ` without the tunables `restart_with_tunables` added (the environment the
  user started the command in, for a process that should run as the user's own would)."""
  env = dict(environ)
  added = set(env.pop(ADDED_TUNABLES, '').split(':'))
  kept = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t and t not in added]
  if kept:
    env['GLIBC_TUNABLES'] = ':'.join(kept)
  else:
    env.pop('GLIBC_TUNABLES', None)
  return env


def restart_with_tunables(environ: MutableMapping[str, str] = os.environ):
  """Re-executes this process (same interpreter, options and arguments) with TUNABLES added to
  GLIBC_TUNABLES, unless it names them all already (as after the restart). Linux only; called
  first thing by a command (`set_training_defaults(restart=True)`), before JAX starts."""
  if sys.platform != 'linux' or not add_tunables(environ):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def release_freed_memory() -> bool:
  """Hands the pages that glibc's malloc holds free back to the OS (`malloc_trim(0)`); True if
  it returned any. A no-op returning False where the C library has no malloc_trim (macOS).

  Loading weights and compiling free much more than they keep, and malloc keeps what they freed
  in its heaps, where the first step's buffers (one large block, mapped afresh) cannot reuse it.
  The trainer calls this once, between compiling the train step and running it (bench/: paper
  shape, a lone process, peak RSS of LoRA C=2 2158 -> 1888 MiB, full fine-tuning 3913 -> 3674).
  """
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return False
  return bool(trim(0))
