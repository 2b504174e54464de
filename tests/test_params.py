"""Parameter accounting against the paper's Table 3, and the config argument parser."""

import dataclasses
import os
import subprocess
import sys

import pytest

from cpeft_jax import adaptors, configlib, experiment, params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import paper_llm150m  # noqa: E402

# ../shared/PAPER.md, Table 3: LM-backbone trainable parameters, AF, (agnostic, specific).
TABLE3 = {'method=ia3': (55_296, 110_592), 'method=bitfit': (119_808, 239_616),
          'method=lora,rank=1': (202_752, 405_504), 'method=lora,rank=8': (1_622_016, 3_244_032),
          'method=lora,rank=64': (12_976_128, 25_952_256)}


@pytest.mark.parametrize('arg', list(TABLE3))
def test_table3_counts(arg):
  for contexts, want in zip(('agnostic', 'specific'), TABLE3[arg]):
    config = paper_llm150m.get_config(f'{arg},targets=AF,contexts={contexts}')
    rep = params.report(experiment.decoder_config(config), experiment.peft_config(config))
    assert rep.adaptor_total == want
    assert all(rep.context_total(c) == want // rep.peft.num_contexts
               for c in range(rep.peft.num_contexts))


def test_cli_prints_table3_grid():
  out = subprocess.run([sys.executable, '-m', 'cpeft_jax.params',
                        '--config=configs/paper_llm150m.py', '--grid'], cwd=ROOT,
                       capture_output=True, text=True, check=True).stdout
  for agnostic, specific in TABLE3.values():
    assert f'| {agnostic:,} | {specific:,} |' in out


def test_full_fine_tuning_row_counts_the_lm_less_its_input_embeddings():
  """Table 3's full fine-tuning row is what train.mode='full' trains in the LM: its layers,
  final norm and untied head, not the input embedding table (frozen, as the paper's)."""
  config = paper_llm150m.get_config('method=none')
  D, V, L = 768, 50272, 12
  layer = 4 * D * D + D * 2 * 3072 + 3072 * D + 2 * D  # q k v o, fused gate+up, down, 2 norms
  want = L * layer + D + D * V  # + final norm + untied LM head
  cfg, peft = experiment.decoder_config(config), experiment.peft_config(config)
  rep = params.report(cfg, peft)
  assert (rep.full_trainable(), rep.embeddings) == (want, V * D)
  assert rep.full_trainable(embeddings=True) == rep.base == want + V * D
  assert f'| full fine-tuning (LM less its {V * D:,} frozen input embeddings) | {want:,} | |' in (
      params.grid(cfg, peft))
  assert f'| full fine-tuning (all LM parameters) | {want + V * D:,} | |' in params.grid(
      cfg, peft, full_embeddings=True)


def test_per_context_split_with_unadapted_context():
  config = paper_llm150m.get_config('method=lora+bitfit,rank=8,targets=A')
  peft = dataclasses.replace(experiment.peft_config(config), num_contexts=3, adapted_contexts=(2,))
  rep = params.report(experiment.decoder_config(config), peft)
  lora = 12 * 4 * (768 * 8 + 8 * 768)
  assert rep.per_method_context == {'lora': {2: lora}, 'bitfit': {2: 12 * 4 * 768}}
  assert rep.context_total(0) == 0
  assert '| lora | 0 | 0 | 589,824 | 589,824 |' in rep.format()


def test_parse_arg_errors():
  assert configlib.parse_arg('rank=4,flag', rank=8, flag=False, name='x').to_dict() == {
      'rank': 4, 'flag': True, 'name': 'x'}
  with pytest.raises(ValueError, match="Unknown config argument 'rnak'"):
    configlib.parse_arg('rnak=4', rank=8)
  with pytest.raises(ValueError, match=r"rank='four': expected int"):
    configlib.parse_arg('rank=four', rank=8)
  with pytest.raises(ValueError, match="contexts='both'"):
    paper_llm150m.get_config('contexts=both')


def test_per_context_specs_count_real_parameters_and_state_padding():
  config = paper_llm150m.get_config('method=lora,rank=8,targets=A')
  peft = dataclasses.replace(experiment.peft_config(config), num_contexts=3, contexts=(
      dict(methods='lora', rank=64), dict(methods='lora+bitfit', rank=8), dict(methods='none')))
  rep = params.report(experiment.decoder_config(config), peft)
  n = 12 * 4  # layers x attention projections, all 768 -> 768
  assert rep.per_method_context == {'lora': {0: n * 768 * 64 * 2, 1: n * 768 * 8 * 2},
                                    'bitfit': {0: 0, 1: n * 768}}
  assert rep.context_total(2) == 0
  pad = n * 768 * (64 - 8) * 2 + n * 768  # context 1's rank padding, context 0's bitfit row
  assert (rep.padding, rep.padding_bytes) == (pad, 4 * pad)
  assert f'padding: {pad:,} stored entries' in rep.format()
  dora = dataclasses.replace(peft, contexts=(dict(methods='dora', rank=4), dict(methods='lora'),
                                             dict(methods='none')))
  rep = params.report(experiment.decoder_config(config), dora)
  assert rep.per_method_context == {'lora': {0: 0, 1: n * 768 * 8 * 2},
                                    'dora': {0: n * (768 * 4 * 2 + 768), 1: 0}}
  assert rep.padding == n * 768 * 4 * 2 + n * 768  # context 0's rank padding, 1's magnitude row


@pytest.mark.parametrize('model_type', ['gpt2', 'opt'])
def test_counts_for_learned_position_decoders(model_type):
  """LoRA r on A (q, k, v, out) counts r * (d_in + d_out) per projection; base as transformers."""
  transformers = pytest.importorskip('transformers')
  from cpeft_jax.models import hf_configs
  if model_type == 'gpt2':
    hf = transformers.GPT2Config(vocab_size=50, bos_token_id=0, eos_token_id=1, n_positions=16, n_embd=24, n_layer=2, n_head=2)
    hf_model = transformers.GPT2LMHeadModel(hf)
  else:
    hf = transformers.OPTConfig(vocab_size=50, max_position_embeddings=16, hidden_size=24,
                                num_hidden_layers=2, num_attention_heads=2, ffn_dim=40,
                                word_embed_proj_dim=24)
    hf_model = transformers.OPTForCausalLM(hf)
  cfg = hf_configs.decoder_config(hf.to_dict())
  peft = adaptors.PeftConfig(methods=('lora',), targets='A', lora=adaptors.LoraConfig(rank=3))
  rep = params.report(cfg, peft)
  assert rep.adaptor_total == 2 * 4 * 3 * (24 + 24)
  assert rep.base == sum(p.numel() for p in hf_model.parameters())  # tied lm_head once
