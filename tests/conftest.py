"""Shared fixtures: tiny shapes so the suite stays fast on 2 CPU cores.

Checkpoints are tiny random models written to a temporary directory (the hub is never reached):
`llama_base` by this project's own writer (no torch needed), `gpt_opt` by transformers'
save_pretrained from PyTorch models (skipped where torch is missing). Plain helpers and
constants shared by several modules are in helpers.py.
"""

import os
import tempfile
import types

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
from cpeft_jax import xla_flags  # noqa: E402  (imports no JAX)
# Tiny shapes: compiling dominates, and unoptimised CPU code compiles sooner (LLVM's level and
# XLA:CPU's classic fusion emitter; XLA's HLO passes, whose dots and collectives the HLO
# assertions read, still run). Subprocesses inherit it.
xla_flags.add_defaults(xla_flags.FAST_COMPILE)
# One persistent compilation cache for the run, shared by the xdist workers and every process
# they start (train.py and evaluate.py runs, the hosts of a multi-host test), which compile the
# same steps again and again; only programs that took a second or more to compile (writing the
# cheap ones costs more than it saves), in a fresh directory per run, so no test reads another
# run's programs.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or str(os.getpid())
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'cpeft-jax-tests-xla-{_RUN}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cpeft_jax import checkpoints  # noqa: E402
from cpeft_jax.models.decoder_config import DecoderConfig  # noqa: E402
from cpeft_jax.models.llama import Decoder  # noqa: E402
from helpers import GPT_OPT_PEFT, GPT_TOKENS, MASK  # noqa: E402

# Modules whose module-scoped fixture trains or compiles something costly: each runs on one
# xdist worker (setup.cfg's --dist=loadgroup), so that fixture is built once, not once per
# worker that happens to get one of its tests.
ONE_WORKER = ('test_demo', 'test_evaluate', 'test_faults', 'test_integrity',
              'test_plugin_workflow', 'test_plugins', 'test_shard_routing', 'test_sharded_load',
              'test_sweep', 'test_tasks', 'test_trainer')


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  for item in items:
    name = item.module.__name__.rpartition('.')[2]
    if name in ONE_WORKER:
      item.add_marker(pytest.mark.xdist_group(name))


# GQA, untied, a few units of logits: the tiny Llama of test_checkpoints.py.
LLAMA = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500.0)


@pytest.fixture(scope='session')
def llama_base(tmp_path_factory):
  """A tiny random Llama checkpoint on disk and as loaded: dir, cfg, params.

  Weights as transformers initializes them with initializer_range=0.2 (normal, std 0.2), the
  RMSNorm weights 1 + 0.1 noise so that a mix-up of norms shows; written by save_decoder.
  """
  shapes = jax.eval_shape(lambda: Decoder(LLAMA).init(jax.random.key(0), np.zeros((1, 3), int)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1 + 0.1 * noise if path[-1].key == 'weight' else 0.2 * noise
  params = jax.tree_util.tree_map_with_path(draw, shapes['params'])
  directory = checkpoints.save_decoder(tmp_path_factory.mktemp('llama') / 'base', LLAMA, params)
  loaded = checkpoints.load_decoder(directory)
  return types.SimpleNamespace(dir=directory, cfg=loaded.config, params=loaded.params)


def _gpt_opt_model(transformers, arch):
  """GPT-2, OPT with word_embed_proj_dim != hidden_size (project_in/out) and OPT with
  do_layer_norm_before=false (post-norm, OPT-350m's layout)."""
  opt = dict(vocab_size=64, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, ffn_dim=48, init_std=0.2, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
  if arch == 'gpt2':
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))
  extra = {'opt_proj': dict(word_embed_proj_dim=16), 'opt_post': dict(do_layer_norm_before=False)}
  return transformers.OPTForCausalLM(transformers.OPTConfig(**opt, **extra[arch]))


@pytest.fixture(scope='module', params=['gpt2', 'opt_proj', 'opt_post'])
def gpt_opt(request, tmp_path_factory):
  """A tiny random GPT-2 or OPT saved by transformers, its logits and attention weights on
  GPT_TOKENS, and the checkpoint as loaded with a two-context LoRA (GPT_OPT_PEFT)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf = _gpt_opt_model(transformers, request.param).eval()
  hf.set_attn_implementation('eager')  # returns attention weights
  with torch.no_grad():  # non-trivial biases and LayerNorms, so that a mix-up shows
    for name, p in hf.named_parameters():
      if name.endswith('bias') or 'norm' in name or '.ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(directory)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(GPT_TOKENS),
             attention_mask=torch.tensor(MASK.astype(np.int64)), output_attentions=True)
  return types.SimpleNamespace(arch=request.param, dir=directory, hf=hf,
                               want=out.logits.numpy(),
                               attentions=np.stack([a.numpy() for a in out.attentions]),
                               loaded=checkpoints.load_decoder(directory, GPT_OPT_PEFT))
