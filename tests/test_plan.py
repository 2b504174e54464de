"""The memory planner: per-device bytes against sums computed here from shapes and shardings."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax import plan, sharding
from cpeft_jax.models.decoders import make_decoder
from cpeft_jax.train import state as state_lib
from helpers import ROOT, cpu_env
from configs import paper  # noqa: E402  (configs/ is on sys.path through helpers)

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            vocab_size=64)


def _config(**train):
  c = paper.get_config('method=lora,rank=4,targets=AF')
  c.peft.num_contexts = 4
  c.train.update(batch_size=16, **train)
  return c


def _tiny_shapes(c):
  """(frozen, tables) of the tiny decoder as eval_shape gives them, split by hand."""
  dec_cfg = plan.decoder_config(c, json.dumps(TINY))
  v = jax.eval_shape(lambda k: make_decoder(dec_cfg, plan.experiment.peft_config(c)).init(
      k, jnp.zeros((1, 1), jnp.int32)), jax.random.key(0))
  return {'params': {'decoder': v['params']}}, {'adaptors': {'decoder': v['adaptors']}}


def test_tiny_llama_bytes_equal_shard_shapes_on_an_abstract_mesh():
  c = _config()
  p = plan.plan(c, dict(data=1, fsdp=4, tensor=2), model=json.dumps(TINY),
                activations='estimate')
  frozen, tables = _tiny_shapes(c)
  mesh = jax.sharding.AbstractMesh((1, 4, 2), sharding.AXES)

  def per_device(tree):  # NamedSharding.shard_shape: JAX's own figure, not the planner's ceil
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(
        jax.tree.leaves(tree), jax.tree.leaves(sharding.tree_shardings(tree, mesh))))
  assert p.bytes['base'] == per_device(frozen)
  assert p.bytes['tables'] == per_device(tables)
  replicated = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tables))
  assert p.bytes['tables'] < replicated / 4  # every table split over fsdp, some over tensor too
  # Adam: mu and nu mirror the tables, plus the step counts (int32 scalars).
  tx = state_lib.optimizer(state_lib.OptimConfig.from_dict(c.optim))
  counts = [x for x in jax.tree.leaves(jax.eval_shape(tx.init, tables)) if x.ndim == 0]
  assert p.bytes['optimizer'] == 2 * p.bytes['tables'] + 4 * len(counts)
  assert p.bytes['total'] == sum(p.bytes[k] for k in plan.PARTS)
  assert p.activations_method.startswith('estimate from shapes (no remat')
  remat = _config()
  remat.model.remat = True
  p_remat = plan.plan(remat, dict(data=1, fsdp=4, tensor=2), model=json.dumps(TINY),
                      activations='estimate')
  assert p_remat.bytes['activations'] < p.bytes['activations']
  assert 'remat: layer inputs' in p_remat.activations_method


def test_llama_2_7b_base_is_a_256th_of_its_bf16_bytes():
  c = paper.get_config('method=lora,rank=64,targets=AF')
  c.peft.num_contexts = 4
  c.model.param_dtype = 'bfloat16'
  c.train.batch_size = 256
  p = plan.plan(c, dict(data=1, fsdp=256, tensor=1), model='llama-2-7b')
  D, I, V, n = 4096, 11008, 32000, 32
  kernels = 2 * V * D + n * (4 * D * D + 3 * D * I)  # embeddings, lm_head, q/k/v/o, gate/up/down
  norms = (2 * n + 1) * D  # replicated RMSNorm weights
  assert p.params['base'] == kernels + norms
  assert 6.7e9 < p.params['base'] < 6.8e9
  # Every kernel's sharded dim divides by 256, so no ceil rounding: bf16 bytes / 256 + norms.
  assert p.bytes['base'] == 2 * kernels // 256 + 2 * norms
  assert abs(p.bytes['base'] - 2 * p.params['base'] / 256) < 2 * norms
  # LoRA r=64 on all seven projections ('AF'), 4 contexts, float32, split over fsdp.
  lora = n * 4 * 64 * (4 * (D + D) + 2 * (D + I) + (I + D))
  assert p.params['tables'] == lora
  assert p.bytes['tables'] == 4 * lora // 256
  assert 'estimate from shapes' in p.activations_method  # 256 devices cannot be compiled here


def test_one_device_mesh_is_compiled_and_read_from_xla():
  p = plan.plan(_config(), dict(data=1, fsdp=1, tensor=1), model=json.dumps(TINY))
  assert p.activations_method.startswith('XLA memory analysis')
  assert p.bytes['activations'] > 0


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='device memory'):
    plan.parse_bytes('sixteen')
  assert plan.parse_bytes('16GiB') == 16 * 2**30 and plan.parse_bytes('80GB') == 80 * 10**9
  with pytest.raises(ValueError, match='positive sizes'):
    plan.parse_mesh('data=-1,fsdp=2')
  with pytest.raises(ValueError, match='preset'):
    plan.plan(_config(), dict(data=1, fsdp=1, tensor=1), model='no-such-model')


def _cli(*args):
  cmd = [sys.executable, '-m', 'cpeft_jax.plan', '--config=configs/paper.py:method=lora,rank=4',
         '--config.train.batch_size=16', f'--model={json.dumps(TINY)}',
         '--mesh=data=1,fsdp=4,tensor=2', '--activations=estimate', *args]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_cli_says_whether_the_plan_fits(tmp_path):
  c = paper.get_config('method=lora,rank=4')
  c.train.batch_size = 16
  total = plan.plan(c, dict(data=1, fsdp=4, tensor=2), model=json.dumps(TINY),
                    activations='estimate').bytes['total']
  fits = _cli(f'--device_memory={total}', f'--json={tmp_path / "plan.json"}')
  assert re.search(rf'total .*\({total:,} B\)', fits), fits
  assert re.search(r'^fits in ', fits, re.M), fits
  doc = json.loads((tmp_path / 'plan.json').read_text())
  assert doc['bytes_per_device']['total'] == total and doc['fits'] is True
  assert doc['device_memory'] == total
  assert re.search(r'^does not fit in ', _cli(f'--device_memory={total - 1}'), re.M)


def test_fsdp_keeps_one_layer_of_gathered_weights_live_not_all():
  """bf16 compute on an fsdp=8 mesh (8 simulated devices): each added layer costs less than one
  layer's whole bf16 weights. Unrolled layers (XLA:CPU's choice for 16-bit compute without
  fsdp) kept every layer's gathered weights live for the backward pass: +4x a layer each."""
  D, F = 256, 1024
  layer_bytes = (4 * D * D + 3 * D * F) * 2  # bf16 q, k, v, o, gate, up, down
  got = {}
  for layers in (2, 4):
    model = dict(arch='llama', vocab_size=256, hidden_size=D, num_layers=layers, num_heads=4,
                 intermediate_size=F)
    cmd = [sys.executable, '-m', 'cpeft_jax.plan', '--config=configs/paper.py:method=lora,rank=4',
           '--config.train.batch_size=8', '--config.data.seq_len=16', f'--model={json.dumps(model)}',
           '--mesh=data=1,fsdp=8,tensor=1', '--activations=compile', '--json=-']
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=cpu_env(8, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc['activations_method'].startswith('XLA memory analysis'), doc
    got[layers] = doc['bytes_per_device']['activations']
  assert 0 < (got[4] - got[2]) / 2 < layer_bytes, (got, layer_bytes)
