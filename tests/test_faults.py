"""Training survives SIGKILL, SIGINT and SIGTERM in its own process, mid-save and mid-validation
included: reruns finish with the losses, validation losses, result and best weights of a run
nothing interrupted, bit for bit (tests/fault_run.py; its --sweep runs the full table)."""

import pytest

import fault_run


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  d = tmp_path_factory.mktemp('faults')
  assert fault_run.run(d / 'ref', d / 'tfds') == 0
  return d, fault_run.outcome(d / 'ref')


def test_killed_interrupted_and_terminated_runs_resume_bit_identical(reference):
  """One workdir hit four times: kill -9 while the second checkpoint is committed, Ctrl-C at
  the first epoch's validation, SIGTERM mid-epoch 2 and kill -9 while the best weights of epoch
  2 are committed; each rerun picks up where the last stopped."""
  d, want = reference
  w = d / 'hit'
  assert fault_run.run(w, d / 'tfds', '--fault=rename:2:KILL') == -9
  assert fault_run.run(w, d / 'tfds', '--fault=batch:12:INT') == 1  # from step 4: validation
  assert fault_run.run(w, d / 'tfds', '--fault=batch:5:TERM') == 1
  assert fault_run.run(w, d / 'tfds', '--fault=rename:5:KILL') == -9
  assert fault_run.resume_until_done(w, d / 'tfds') == 1
  assert fault_run.outcome(w) == want
