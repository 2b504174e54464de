"""train.py's loop end to end on a tiny demo: learning, checkpoints, exact resumption, metrics
files, the adaptor-only export and the atomic best-weights swap."""

import json
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import demo  # noqa: E402
from cpeft_jax import experiment  # noqa: E402
from cpeft_jax import trainable as trainable_lib  # noqa: E402
from cpeft_jax.train import pretrain, trainer  # noqa: E402
from helpers import tiny  # noqa: E402


def _best(workdir):
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.abspath(os.path.join(workdir, 'best')))


def test_learns_and_resumes_exactly(tmp_path):
  shared_data = str(tmp_path / 'tfds')
  straight = tiny(3)
  straight.data.data_dir = shared_data
  out = trainer.train_and_evaluate(straight, str(tmp_path / 'a'))
  lines = [json.loads(l) for l in open(tmp_path / 'a' / 'metrics.jsonl')]
  evals = [l for l in lines if 'val_loss' in l]
  assert len(evals) == 3 and out['steps'] == 45  # 24 images x 5 captions / 8 per batch x 3
  assert evals[-1]['val_loss'] < evals[0]['val_loss']
  assert out['val_loss'] == min(e['val_loss'] for e in evals)
  # Stage 0 left a Hugging Face checkpoint of the text decoder, which stage 1 kept frozen.
  from cpeft_jax import checkpoints
  base = checkpoints.load_decoder(tmp_path / 'a' / 'base_lm')
  assert base.report == checkpoints.LoadReport((), ())
  assert base.config.hidden_size == 32 and base.config.num_layers == 2

  # The same run, stopped after one epoch and resumed by rerunning with more epochs.
  first = tiny(1)
  first.data.data_dir = shared_data
  first.optim.total_steps = 45
  trainer.train_and_evaluate(first, str(tmp_path / 'b'))
  again = tiny(3)
  again.data.data_dir = shared_data
  out_b = trainer.train_and_evaluate(again, str(tmp_path / 'b'))
  assert out_b['steps'] == 45
  a, b = _best(tmp_path / 'a'), _best(tmp_path / 'b')
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)

  # Metrics: JSONL with per-context figures, and TensorBoard event files holding the same.
  logged = [l for l in lines if 'learning_rate' in l]
  assert logged and {'perplexity', 'tokens_per_s', 'step_s', 'grad_norm', 'loss/ctx0',
                     'tokens/ctx1', 'grad_norm/ctx1', 'update_ratio/ctx1'} <= set(logged[0])
  tb = _event_scalars(tmp_path / 'a' / 'tensorboard')
  assert tb['loss/ctx0'] == [(l['step'], pytest.approx(l['loss/ctx0'])) for l in logged]
  assert [s for s, _ in tb['val_loss']] == [e['step'] for e in evals]

  # Best weights are a symlink onto a complete version; the older versions are gone.
  best = tmp_path / 'a' / 'best'
  assert best.is_symlink() and len(list((tmp_path / 'a' / 'best_versions').iterdir())) == 1

  # The adaptor-only export (written after training) rebuilds the same model: same logits.
  from cpeft_jax.models import vlm
  from cpeft_jax.train import adaptor_export
  info = json.load(open(tmp_path / 'a' / 'export' / 'export.json'))
  assert info['source'] == 'best' and info['bytes'] < 100_000
  exp_e, v_e = adaptor_export.load(str(tmp_path / 'a' / 'export'))
  exp_a = experiment.build(straight, str(tmp_path / 'a'), None)
  v_a = trainable_lib.merge(a, trainable_lib.split(exp_a.variables, 'peft')[1])
  val = experiment.open_split(straight, str(tmp_path / 'a'), 'validation')
  batch = experiment.device_batch(exp_a, next(exp_a.batches(val, train=False).epoch(0)))
  logits_e = jax.jit(vlm.apply_fn(exp_e.model, logits=True))(v_e, batch)
  logits_a = jax.jit(vlm.apply_fn(exp_a.model, logits=True))(v_a, batch)
  np.testing.assert_array_equal(logits_e, logits_a)


def _event_scalars(directory):
  """{tag: [(step, value)]} read from TensorBoard event files (TFRecord framing)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(directory.iterdir()):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


@pytest.mark.parametrize('args,message', [
    (['--config=configs/demo.py:method=dora9'], "Unknown PEFT method 'dora9'"),
    (['--config=configs/demo.py', '--mesh=data=3'],
     "config.mesh={'data': 3} spans 3 devices; expected a product of 1"),
])
def test_cli_rejects_bad_config(tmp_path, args, message):
  res = subprocess.run([sys.executable, 'train.py', *args, f'--workdir={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True,
                       env=dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu'))
  assert res.returncode != 0
  assert message in res.stderr


# NaN from step 10 (between checkpoints) or from step 14 (a checkpoint step: checkpoint_every=7).
@pytest.mark.parametrize('first_nan', [10, 14])
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, first_nan):
  from cpeft_jax.train import step as step_lib
  real = step_lib.train_step

  def poisoned(state, frozen, batch, rng, **kw):
    new_state, m = real(state, frozen, batch, rng, **kw)
    m['loss'] = jax.numpy.where(state.step >= first_nan - 1, jax.numpy.nan, m['loss'])
    return new_state, m

  monkeypatch.setattr(step_lib, 'train_step', poisoned)
  c = tiny(1)
  c.data.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FloatingPointError,
                     match=rf'Loss is nan at step {first_nan}; the last checkpoint'):
    trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  saved = sorted(int(p.name) for p in (tmp_path / 'w' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert saved == [7]  # the NaN state at step 14 is never saved


def test_dora_magnitudes_start_at_the_loaded_base_column_norms(tmp_path):
  c = tiny(1)
  c.peft.methods = ('dora',)
  split = experiment.open_split(c, str(tmp_path), c.data.train_split)
  exp = experiment.build(c, str(tmp_path), split, text_lm=pretrain.text_lm)  # stage 0 first
  base = exp.variables['params']['decoder']['layers']['attn']['q_proj']['kernel']
  m = exp.variables['adaptors']['decoder']['layers']['attn']['q_proj']['dora_m']
  want = np.sqrt((np.asarray(base, np.float64) ** 2).sum(axis=-2))  # [layers, d_out]
  for ctx in range(m.shape[1]):
    np.testing.assert_allclose(np.asarray(m)[:, ctx], want, rtol=1e-5)


def test_per_context_specs_train_on_the_demo(tmp_path):
  """Text tokens: LoRA r=2 + BitFit; image tokens: LoRA r=8. The padded ranks of the text
  context and the image context's absent BitFit row stay exactly zero through training."""
  c = demo.get_config('epochs=2,num_train=24,pretrain_epochs=1,contexts=modality,'
                      'specs=lora+bitfit:rank=2;lora:rank=8')
  c.pretrain.batch_size = 16
  c.data.demo.num_validation = 8
  c.data.seq_len = 80
  c.vision.patch_size = 16
  c.model.update(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
  c.train.update(batch_size=8, log_every=5, checkpoint_every=0)
  c.eval.batch_size = 8
  c.optim.update(warmup_steps=2, learning_rate=3e-3)
  out = trainer.train_and_evaluate(c, str(tmp_path))
  evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  evals = [e['val_loss'] for e in evals if 'val_loss' in e]
  assert out['steps'] == 30 and evals[-1] < evals[0]
  q = _best(str(tmp_path))['adaptors']['decoder']['layers']['attn']['q_proj']
  a, b = np.asarray(q['lora_a']), np.asarray(q['lora_b'])  # [layers, C, d, 8], [layers, C, 8, d]
  assert a.shape[-1] == 8 and np.all(a[:, 0, :, 2:] == 0) and np.all(b[:, 0, 2:] == 0)
  assert np.any(b[:, 0, :2] != 0) and np.any(b[:, 1] != 0)  # both contexts trained
  bitfit = np.asarray(q['bitfit'])
  assert np.any(bitfit[:, 0] != 0) and np.all(bitfit[:, 1] == 0)


def test_checkpoint_every_step_saves_each_step_once_and_resumes(tmp_path, caplog):
  """checkpoint_every=1 saves the epoch's last step before validation and again after it (its
  progress changed): the step is rewritten, not refused; a rerun of the finished run resumes.
  The train step compiles once, ahead of its first run (Trainer.compile_step)."""
  c = tiny(2, checkpoint_every=1)
  c.data.data_dir = str(tmp_path / 'tfds')
  with jax.log_compiles(True), caplog.at_level('WARNING', logger='jax'):
    out = trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  assert out['steps'] == 30  # 15 steps an epoch
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith('Finished XLA compilation of jit(train_step)')]
  # Stage 0 (pretrain.py, the text decoder) compiles its own; the PEFT stage's first step runs
  # what Trainer.compile_step compiled ahead of it, not a second compile.
  assert len(compiles) == 2, compiles
  from cpeft_jax.train import checkpointing
  with checkpointing.manager(str(tmp_path / 'w' / 'checkpoints')) as mgr:
    assert mgr.all_steps() == [29, 30]
    meta = mgr.restore(30, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  assert meta['epoch'] == 2 and meta['batch'] == 0 and meta['best_val_loss'] == out['val_loss']
  again = trainer.train_and_evaluate(c, str(tmp_path / 'w'))  # nothing left to train
  assert again == out


@pytest.mark.parametrize('lr, match', [
    (1e30, r'Loss is nan at step \d+|trainable parameters are not finite'),
    (1e6, r'gradient norm has been exactly 0 for 3 steps up to step \d+'),
])
def test_divergence_stops_without_a_non_finite_checkpoint(tmp_path, lr, match):
  """lr=1e30 makes the parameters overflow (an infinite lr is a config error now); lr=1e6
  saturates the softmax so that the gradients vanish. Either stops the run by name, and no
  checkpoint holds a non-finite value."""
  c = tiny(2, checkpoint_every=1, max_zero_grad_steps=3)
  c.data.data_dir = str(tmp_path / 'tfds')
  c.optim.update(learning_rate=lr, warmup_steps=0, grad_clip_norm=0.0)
  with pytest.raises(FloatingPointError, match=match):
    trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  from cpeft_jax.train import checkpointing
  with checkpointing.manager(str(tmp_path / 'w' / 'checkpoints')) as mgr:
    for step in mgr.all_steps():
      tree = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))['state']['trainable']
      assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)), step


def test_divergence_names_a_stuck_or_exploding_loss():
  from cpeft_jax.train import metrics
  watch = metrics.Divergence(limit=3, vocab_size=100)  # exploding above 2 ln(100) = 9.21
  for step, loss in enumerate([12.0, 12.0, 3.0, 12.0, 12.0, 12.0, 12.0], 1):
    watch.update(step, {'loss': loss, 'grad_norm': 1.0})
  with pytest.raises(FloatingPointError, match=r'above 9.21 .* for 5 steps up to step 8'):
    watch.update(8, {'loss': 9.3, 'grad_norm': 1.0})
  watch = metrics.Divergence(limit=3, vocab_size=100)
  watch.update(1, {'loss': 4.6, 'grad_norm': 0.0})
  watch.update(1, {'loss': 4.6, 'grad_norm': 0.0})  # the same step read twice counts once
  watch.update(2, {'loss': 4.6, 'grad_norm': 0.0})
  with pytest.raises(FloatingPointError, match='exactly 0 for 3 steps up to step 3'):
    watch.update(3, {'loss': 4.6, 'grad_norm': 0.0})


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """A 2-epoch run that nothing interrupts: its metrics and best weights."""
  d = tmp_path_factory.mktemp('straight')
  c = tiny(2)
  c.data.data_dir = str(d / 'tfds')
  out = trainer.train_and_evaluate(c, str(d / 'w'))
  return c, out, _logged(d / 'w'), _best(str(d / 'w'))


def _logged(workdir):
  """{step: loss} of the training lines and [val_loss] of the epochs, from metrics.jsonl."""
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  return ({l['step']: l['loss'] for l in lines if 'loss' in l},
          [l['val_loss'] for l in lines if 'val_loss' in l])


# device_batch calls: 15 train steps an epoch, then 2 validation batches (8 images, 5 a batch).
@pytest.mark.parametrize('signals, call', [
    ((signal.SIGINT,), 7),  # mid-epoch
    ((signal.SIGINT,), 15),  # on the epoch's last step
    ((signal.SIGINT, signal.SIGINT), 22),  # twice, the second while the first is handled
    ((signal.SIGTERM,), 17),  # during validation's last batch
], ids=['sigint-mid-epoch', 'sigint-last-step', 'sigint-twice',
        'sigterm-validation'])
def test_interrupted_runs_resume_bit_identical(tmp_path, monkeypatch, uninterrupted, signals,
                                               call):
  """A signal at any point saves the state with its data position; the rerun finishes with the
  losses, validation losses and best weights of the run nothing interrupted. (SIGINT during
  validation, SIGTERM mid-epoch and kill -9 mid-save: tests/test_faults.py, in a subprocess.)"""
  c, want_out, (want_losses, want_vals), want_best = uninterrupted
  c = ml_collections.ConfigDict(c.to_dict())
  c.data.data_dir = str(tmp_path / 'tfds')
  real, calls = experiment.device_batch, [0]

  def signalling(exp, batch):
    calls[0] += 1
    if calls[0] == call:
      for s in signals:
        os.kill(os.getpid(), s)
    return real(exp, batch)

  monkeypatch.setattr(experiment, 'device_batch', signalling)
  with pytest.raises(SystemExit, match=f'Stopped by signal {int(signals[0])}'):
    trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  monkeypatch.setattr(experiment, 'device_batch', real)
  out = trainer.train_and_evaluate(c, str(tmp_path / 'w'))
  losses, vals = _logged(tmp_path / 'w')
  assert out == want_out and losses == want_losses and vals == want_vals
  jax.tree.map(np.testing.assert_array_equal, _best(str(tmp_path / 'w')), want_best)


def test_best_versions_are_named_by_step(tmp_path):
  """Every host names a best version alike (its step); a leftover uncommitted version of the
  same step is replaced, the committed one (named by best.json) is kept, and only it survives a
  save. (Without symlinks and as on an object store: tests/test_paths.py.)"""
  from cpeft_jax.train import checkpointing
  w = str(tmp_path)
  one, two = {'a': np.ones((2, 3), np.float32)}, {'a': np.full((2, 3), 2.0, np.float32)}
  checkpointing.save_best(w, one, {'step': 3, 'val_loss': 2.0})
  assert sorted(os.listdir(tmp_path / 'best_versions')) == ['3']
  os.makedirs(tmp_path / 'best_versions' / '5')  # a save cut off before its swap
  checkpointing.save_best(w, two, {'step': 5, 'val_loss': 1.0})
  assert os.readlink(tmp_path / 'best') == os.path.join('best_versions', '5')
  np.testing.assert_array_equal(_best(w)['a'], two['a'])
  checkpointing.save_best(w, one, {'step': 5, 'val_loss': 1.0})  # replayed: linked, kept
  np.testing.assert_array_equal(_best(w)['a'], two['a'])
  assert sorted(os.listdir(tmp_path / 'best_versions')) == ['5']
  assert json.load(open(tmp_path / 'best.json')) == {'step': 5, 'val_loss': 1.0,
                                                     'version': 'best_versions/5'}
