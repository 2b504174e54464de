"""The tests' tiny demo run (helpers.tiny) as a config file, for train.py and evaluate.py run as
subprocesses: `--config=tests/tiny_run_config.py:EPOCHS`.

One run, context map 'modality', the frozen random patch encoder; stage 0 pre-trains the
2-layer decoder in the workdir unless --config.text_model names one already trained.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny  # noqa: E402


def get_config(arg=None):
  c = tiny(int(arg or 2))
  with c.unlocked():
    if 'variants' in c:
      del c['variants']
  return c
