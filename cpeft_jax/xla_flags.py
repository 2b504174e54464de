"""XLA flags the training command line sets before JAX starts (this module imports no JAX).

XLA reads XLA_FLAGS once, when its first backend starts, so `train.py` calls
`set_training_defaults()` at import, before its config (which imports jax) is loaded and before
any computation. A flag the user's own XLA_FLAGS already names is left as the user set it.
"""

from __future__ import annotations

import os
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


def add_defaults(defaults, environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds `defaults` to environ['XLA_FLAGS'] (those it does not name yet); returns it."""
  flags = environ.get('XLA_FLAGS', '').split()
  named = {f.split('=')[0] for f in flags}
  flags += [f for f in defaults if f.split('=')[0] not in named]
  environ['XLA_FLAGS'] = ' '.join(flags)
  return environ['XLA_FLAGS']


def set_training_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds TRAINING's flags to environ['XLA_FLAGS'] (those it does not name yet); returns it."""
  return add_defaults(TRAINING, environ)
