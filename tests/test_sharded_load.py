"""Sharded from the first byte: checkpoints and the trainable init land in their shards.

tests/sharded_load_check.py runs on 8 simulated CPU devices (a subprocess: the device count is
fixed when JAX starts) and asserts, for Llama (single and sharded safetensors, Flax msgpack,
bf16, fused gate/up, an NF4 base, a missing lm_head under partial_load), GPT-2, OPT and a CLIP tower, on fsdp=8 and on
data=2,fsdp=2,tensor=2: the values equal today's 1-device load, every leaf is in its planned
sharding, and every leaf the rules split has shards smaller than the whole; for the VLM's init
and train state, the same of the tables and the Adam moments. Here: what it measured.
"""

import json
import os
import subprocess
import sys

import pytest

from helpers import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
  pytest.importorskip('torch')  # transformers' save_pretrained writes the GPT-2/OPT/CLIP files
  env = cpu_env(8)
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'sharded_load_check.py'),
                        str(tmp_path_factory.mktemp('shardload'))], env=env,
                       capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


CASES = ('llama', 'llama_index', 'llama_msgpack', 'llama_bf16', 'llama_fused', 'llama_nf4',
         'llama_partial', 'gpt2', 'opt', 'clip')


@pytest.mark.parametrize('mesh', ['fsdp8', 'mixed'])
def test_device_0_never_holds_more_than_its_shards(measured, mesh):
  """Sampled at every block read: device 0 holds the load's own arrays only as the plan's
  shards (plus at most half a split tensor of temporaries: a read block, a quantized leaf's
  full-precision shard). Today's loader put each whole leaf on device 0 before moving it."""
  for case in CASES:
    m = measured[mesh][case]
    assert m['split_leaves'] >= 6, (case, m)
    assert m['peak_dev0'] <= m['footprint_dev0'] + m['largest_split'] // 2, (case, m)
    assert m['footprint_dev0'] < m['total'] / 2, (case, m)
    # CLIP's patch kernel and norms stay replicated, and so do NF4 scales no block count splits.
    if mesh == 'fsdp8' and case not in ('clip', 'llama_nf4'):
      assert m['footprint_dev0'] < m['total'] / 5, (case, m)


def test_fsdp8_reads_blocks_not_tensors(measured):
  """On fsdp=8 a split leaf is read as 8 blocks (one per device), on data=2 x fsdp=2 x tensor=2
  as 4 distinct ones: a block held by two replicas is read once."""
  for case in CASES:
    assert measured['fsdp8'][case]['reads'] > measured['mixed'][case]['reads'], case


def test_tables_and_moments_split_over_fsdp(measured):
  """LoRA, IA3 and BitFit tables of a C=4 decoder and their Adam moments, created by jits with
  out_shardings: device 0 holds 1/8 of them (every table is split along a feature axis)."""
  m = measured['init']
  assert m['tables_dev0'] * 8 == m['tables_bytes'], m
  assert m['moments_dev0'] * 8 == m['moments_bytes'], m
