"""PEFT export/import and merged checkpoints, against PyTorch PEFT and transformers.

The bases are conftest.py's tiny random models: a Llama written by our save_decoder, a GPT-2
and two OPTs written by transformers' save_pretrained; PyTorch PEFT loads our exported adapter onto them (and
writes the adapters we import), so every parity check has an independent reference.
"""

import functools
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft_lib = pytest.importorskip('peft')

from cpeft_jax import checkpoints, interop, trees  # noqa: E402
from cpeft_jax.adaptors import LoraConfig, PeftConfig  # noqa: E402
from cpeft_jax.interop.convert import convert  # noqa: E402
from cpeft_jax.models.decoders import make_decoder  # noqa: E402
from helpers import (GPT_TOKENS as LTOKENS, MASK, PER_CONTEXT, TOKENS, fresh_tables,  # noqa: E402
                     random_tables)

LMASK = MASK  # the GPT-2's and OPTs' tokens share the tiny Llama's padding

ALL_MODULES = ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']


def logits(cfg, params, tables=None, peft=None, context=0, tokens=TOKENS, mask=MASK):
  """Our logits on `tokens` with every token in `context` (the base's without `peft`)."""
  ctx = jnp.full(tokens.shape, context, jnp.int32) if peft is not None else None
  return np.asarray(_apply(cfg, peft, params, tables, ctx, jnp.asarray(tokens), mask))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(cfg, peft, params, tables, ctx, tokens, mask):
  variables = {'params': params}
  if tables is not None:
    variables['adaptors'] = tables
  return make_decoder(cfg, peft).apply(variables, tokens, attention_mask_BL=mask,
                                       context_ids_BL=ctx)


def torch_logits(model, tokens=TOKENS, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens),
                 attention_mask=torch.tensor(mask.astype(np.int64))).logits.float().numpy()


@pytest.fixture(scope='module')
def base(llama_base):
  """conftest's tiny Llama, and a fresh transformers model of it each time (PEFT injects its
  layers in place)."""
  return types.SimpleNamespace(**vars(llama_base), hf=lambda: transformers.LlamaForCausalLM
                               .from_pretrained(llama_base.dir))


@pytest.fixture(scope='module')
def exported(base, tmp_path_factory):
  """Context 1 of a two-context LoRA on every projection, exported; reused by error tests."""
  peft = PeftConfig(methods=('lora',), targets='all', num_contexts=2,
                    lora=LoraConfig(rank=4, alpha=8.0))
  tables = random_tables(fresh_tables(base.cfg, peft), seed=1)
  directory = interop.export_peft(tmp_path_factory.mktemp('adapter'), tables, base.cfg, peft, 1,
                                  base_model_name_or_path=str(base.dir))
  return types.SimpleNamespace(dir=directory, peft=peft, tables=tables)


@pytest.mark.parametrize('method, targets, rslora, context, specs', [
    ('lora', 'all', False, 1, None), ('lora', 'q_proj,v_proj', True, 0, None),
    ('lora', 'all', False, 1, PER_CONTEXT), ('dora', 'AF', False, 1, None)])
def test_exported_adapter_matches_pytorch_peft(base, tmp_path, method, targets, rslora, context,
                                               specs):
  peft = PeftConfig(methods=(method,), targets=targets, num_contexts=2,
                    lora=LoraConfig(rank=4, alpha=8.0, rslora=rslora),
                    **({'contexts': specs} if specs else {}))
  tables = random_tables(fresh_tables(base.cfg, peft), seed=2)
  interop.export_peft(tmp_path, tables, base.cfg, peft, context)
  config = json.loads((tmp_path / interop.ADAPTER_CONFIG).read_text())
  assert (config['r'], config['use_dora']) == (2 if specs else 4, method == 'dora')
  assert config['target_modules'] == (['q_proj', 'v_proj'] if targets == 'q_proj,v_proj'
                                      else ALL_MODULES)
  model = peft_lib.PeftModel.from_pretrained(base.hf(), tmp_path).eval()
  want = torch_logits(model)
  got = logits(base.cfg, base.params, tables, peft, context)
  plain = logits(base.cfg, base.params)
  assert np.abs(want - plain)[MASK].max() > 0.05  # the adapter changes the function
  diff = np.abs(got - want)[MASK].max()
  print(f'export parity ({method}, {targets}, rslora={rslora}, per-context={bool(specs)}): '
        f'max abs logit diff {diff:.2e}')
  assert diff <= 1e-4
  # And back: importing the file restores the context's row (its rank's columns).
  again = trees.flatten(interop.import_peft(tmp_path, fresh_tables(base.cfg, peft), base.cfg,
                                            peft, context))
  r = config['r']
  for k, v in trees.flatten(tables).items():
    cut = {'lora_a': np.s_[:, context, :, :r], 'lora_b': np.s_[:, context, :r],
           'dora_m': np.s_[:, context]}.get(k.rsplit('/', 1)[-1])
    if cut is not None:
      np.testing.assert_allclose(again[k][cut], v[cut], rtol=1e-6, atol=1e-7)


def test_import_pytorch_peft_adapter_as_one_context(base, tmp_path):
  torch.manual_seed(0)
  lora = peft_lib.LoraConfig(r=4, lora_alpha=16, target_modules=ALL_MODULES,
                             init_lora_weights=False, task_type='CAUSAL_LM')
  model = peft_lib.get_peft_model(base.hf(), lora).eval()
  with torch.no_grad():  # PEFT's non-default init leaves B small: make the adapter matter
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.3)
  model.save_pretrained(tmp_path)
  want = torch_logits(model)
  with model.disable_adapter():
    want_base = torch_logits(model)
  # alpha 8 here vs 16 there: the importer folds the scale ratio into B.
  peft = PeftConfig(methods=('lora',), targets='all', num_contexts=2,
                    lora=LoraConfig(rank=4, alpha=8.0))
  fresh = fresh_tables(base.cfg, peft)
  tables = interop.import_peft(tmp_path, fresh, base.cfg, peft, context=1)
  diff = np.abs(logits(base.cfg, base.params, tables, peft, 1) - want)[MASK].max()
  print(f'import parity: max abs logit diff {diff:.2e}')
  assert diff <= 1e-4
  base_diff = np.abs(logits(base.cfg, base.params, tables, peft, 0) - want_base)[MASK].max()
  assert base_diff <= 1e-4  # row 0 is untouched (B = 0)
  flat_new, flat_old = trees.flatten(tables), trees.flatten(fresh)
  for k in flat_old:
    np.testing.assert_array_equal(flat_new[k][:, 0], flat_old[k][:, 0])


def test_export_import_round_trip(base, exported):
  fresh = fresh_tables(base.cfg, exported.peft)
  tables = interop.import_peft(exported.dir, fresh, base.cfg, exported.peft, context=0)
  new, old = trees.flatten(tables), trees.flatten(exported.tables)
  for k in old:
    np.testing.assert_allclose(new[k][:, 0], old[k][:, 1], rtol=1e-6, atol=1e-7)


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  config = json.loads((dst / interop.ADAPTER_CONFIG).read_text())
  config.update(changes)
  (dst / interop.ADAPTER_CONFIG).write_text(json.dumps(config))
  return dst


@pytest.mark.parametrize('changes, match', [
    (dict(use_dora=True), r"is a DORA adapter \(use_dora=True\); context 0 has methods "
                          r"\('lora',\)"),
    (dict(bias='all'), r"bias='all' is not supported"),
    (dict(peft_type='IA3'), r"peft_type='IA3'; only LORA"),
    (dict(target_modules=['q_proj', 'v_proj']), r"targets \['q_proj', 'v_proj'\], the model's "
                                                r"LoRA targets are \['down_proj'"),
    (dict(r=8), r'rank r=8, context 0 of the model has LoRA rank 4'),
])
def test_import_rejects_unsupported_or_mismatched_adapters(base, exported, tmp_path, changes,
                                                           match):
  bad = _edit_config(exported.dir, tmp_path / 'bad', **changes)
  fresh = fresh_tables(base.cfg, exported.peft)
  with pytest.raises(ValueError, match=match):
    interop.import_peft(bad, fresh, base.cfg, exported.peft, context=0)


def test_import_names_shape_mismatch_of_another_base(base, exported, tmp_path):
  from safetensors.numpy import load_file, save_file
  bad = _edit_config(exported.dir, tmp_path / 'bad')
  weights = load_file(str(bad / interop.ADAPTER_WEIGHTS))
  key = 'base_model.model.model.layers.1.mlp.up_proj.lora_B.weight'
  weights[key] = np.zeros((50, 4), np.float32)  # a base with intermediate_size 50
  weights['base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight'] = weights[
      'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight']
  save_file(weights, str(bad / interop.ADAPTER_WEIGHTS))
  fresh = fresh_tables(base.cfg, exported.peft)
  with pytest.raises(ValueError, match=r'(?s)does not fit this base model.*up_proj.lora_B.weight '
                     r'has shape \(50, 4\), the model expects \(48, 4\).*layers.2'):
    interop.import_peft(bad, fresh, base.cfg, exported.peft, context=0)
  with pytest.raises(ValueError, match=r'Context 2 has no adaptor row'):
    interop.import_peft(exported.dir, fresh, base.cfg, exported.peft, context=2)


@pytest.mark.parametrize('methods, num_contexts, context', [
    (('lora',), 1, 0), (('lora', 'ia3'), 2, 1), (('ia3', 'dora'), 2, 0)])
def test_merged_checkpoint_matches_adapted_model(base, tmp_path, methods, num_contexts, context):
  peft = PeftConfig(methods=methods, targets='all', num_contexts=num_contexts,
                    lora=LoraConfig(rank=4, alpha=8.0))
  tables = random_tables(fresh_tables(base.cfg, peft), seed=3)
  want = logits(base.cfg, base.params, tables, peft, context)
  interop.save_merged(tmp_path / 'merged', base.params, tables, base.cfg, peft, context)
  hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  diff = np.abs(torch_logits(hf) - want)[MASK].max()
  print(f'merged ({methods}, C={num_contexts}): max abs logit diff {diff:.2e}')
  assert diff <= 1e-4
  assert np.abs(want - logits(base.cfg, base.params))[MASK].max() > 0.05
  merged = interop.merged_per_context(base.params, tables, base.cfg, peft)
  assert sorted(merged) == list(range(num_contexts))
  for c, params in merged.items():
    np.testing.assert_allclose(logits(base.cfg, params),
                               logits(base.cfg, base.params, tables, peft, c), atol=1e-4)


def test_what_cannot_be_expressed_is_an_error(base, tmp_path):
  peft = PeftConfig(methods=('lora', 'bitfit'), targets='all', lora=LoraConfig(rank=4))
  tables = fresh_tables(base.cfg, peft)
  with pytest.raises(ValueError, match=r"\['bitfit'\] cannot be expressed as PEFT LoRA"):
    interop.export_peft(tmp_path, tables, base.cfg, peft)
  with pytest.raises(ValueError, match=r'BitFit on attn/\w+ cannot be merged'):
    interop.merged_params(base.params, tables, base.cfg, peft)


def test_command_line_conversions_round_trip(base, exported, tmp_path):
  from safetensors.numpy import load_file
  convert(str(base.dir), peft_in=str(exported.dir), plugin_out=str(tmp_path / 'plug'),
          name='imported')
  convert(str(base.dir), plugin=str(tmp_path / 'plug'), peft_out=str(tmp_path / 'again'),
          merged_out=str(tmp_path / 'merged'))
  want, got = (load_file(str(d / interop.ADAPTER_WEIGHTS))
               for d in (exported.dir, tmp_path / 'again'))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
  merged = checkpoints.load_decoder(tmp_path / 'merged')
  np.testing.assert_allclose(logits(base.cfg, merged.params),
                             logits(base.cfg, base.params, exported.tables, exported.peft, 1),
                             atol=1e-4)
  with pytest.raises(ValueError, match='exactly one source'):
    convert(str(base.dir), peft_out=str(tmp_path / 'x'))


# ----------------------------------------------------------------------------- GPT-2 and OPT
# `gpt_opt` (conftest.py): a tiny GPT-2, an OPT with project_in/out and a post-norm OPT.


def _fresh_hf(gpt_opt):
  """A new transformers model of the base each time: PEFT injects its layers in place."""
  return type(gpt_opt.hf).from_pretrained(gpt_opt.dir).eval()


def _learned(gpt_opt, tables=None, peft=None, context=0):
  return logits(gpt_opt.loaded.config, gpt_opt.loaded.params, tables, peft, context, LTOKENS, LMASK)


@pytest.mark.parametrize('method, targets, rslora', [('lora', 'q_proj,v_proj', True),
                                                     ('dora', 'A', False)])
def test_learned_export_matches_pytorch_peft(gpt_opt, tmp_path, method, targets, rslora):
  """GPT-2's q/k/v LoRAs leave as one c_attn LoRA of rank k*r with a block-diagonal B (k of
  the 3 adapted: rank 8 for q and v, whose k_proj columns stay zero; 12 for all three)."""
  cfg = gpt_opt.loaded.config
  peft = PeftConfig(methods=(method,), targets=targets, num_contexts=2,
                    lora=LoraConfig(rank=4, alpha=8.0, rslora=rslora))
  tables = random_tables(fresh_tables(cfg, peft), seed=4)
  interop.export_peft(tmp_path, tables, cfg, peft, 1)
  config = json.loads((tmp_path / interop.ADAPTER_CONFIG).read_text())
  if gpt_opt.arch == 'gpt2':
    rank = 8 if targets == 'q_proj,v_proj' else 12
    assert config['rank_pattern'] == {'c_attn': rank} and config['fan_in_fan_out']
    names = {'q_proj,v_proj': ['c_attn'], 'A': ['attn.c_proj', 'c_attn']}  # not mlp.c_proj
  else:
    assert config['rank_pattern'] == {} and not config['fan_in_fan_out']
    names = {'q_proj,v_proj': ['q_proj', 'v_proj'], 'A': ['k_proj', 'out_proj', 'q_proj',
                                                         'v_proj']}
  assert config['target_modules'] == names[targets]
  model = peft_lib.PeftModel.from_pretrained(_fresh_hf(gpt_opt), tmp_path).eval()
  want = torch_logits(model, LTOKENS, LMASK)
  got = _learned(gpt_opt, tables, peft, 1)
  assert np.abs(want - gpt_opt.want)[LMASK].max() > 0.05  # the adapter changes the function
  diff = np.abs(got - want)[LMASK].max()
  print(f'export parity {gpt_opt.arch} ({method}, {targets}, rslora={rslora}): max abs logit '
        f'diff {diff:.2e}')
  assert diff <= 1e-4
  # And back: the block-diagonal c_attn splits into the q/k/v rows it came from.
  again = trees.flatten(interop.import_peft(tmp_path, fresh_tables(cfg, peft), cfg, peft, 1))
  for k, v in trees.flatten(tables).items():
    np.testing.assert_allclose(again[k][:, 1], v[:, 1], rtol=1e-6, atol=1e-7)


def test_learned_import_pytorch_peft_adapter(gpt_opt, tmp_path):
  """PEFT's adapter on every module; GPT-2's rank-r c_attn is q, k, v LoRAs sharing its A (and
  exported again it is rank r once more: the same tensors as PEFT's). Then the same through the
  command line's conversion to a merged checkpoint."""
  from safetensors.numpy import load_file
  modules = (['c_attn', 'c_proj', 'c_fc'] if gpt_opt.arch == 'gpt2' else
             ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'])
  torch.manual_seed(0)
  lora = peft_lib.LoraConfig(r=4, lora_alpha=16, target_modules=modules,
                             init_lora_weights=False, task_type='CAUSAL_LM')
  model = peft_lib.get_peft_model(_fresh_hf(gpt_opt), lora).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.normal_(0, 0.3)
  model.save_pretrained(tmp_path / 'peft')
  want = torch_logits(model, LTOKENS, LMASK)
  cfg = gpt_opt.loaded.config
  peft = PeftConfig(methods=('lora',), targets='all', num_contexts=2,
                    lora=LoraConfig(rank=4, alpha=16.0))
  tables = interop.import_peft(tmp_path / 'peft', fresh_tables(cfg, peft), cfg, peft, 1)
  diff = np.abs(_learned(gpt_opt, tables, peft, 1) - want)[LMASK].max()
  print(f'import parity {gpt_opt.arch}: max abs logit diff {diff:.2e}')
  assert diff <= 1e-4
  interop.export_peft(tmp_path / 'again', tables, cfg, peft, 1)
  theirs, ours = (load_file(str(d / interop.ADAPTER_WEIGHTS)) for d in (tmp_path / 'peft',
                                                                        tmp_path / 'again'))
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k])
  # The command line: PEFT's adapter -> a merged checkpoint that transformers runs as PEFT does.
  convert(str(gpt_opt.dir), peft_in=str(tmp_path / 'peft'), merged_out=str(tmp_path / 'hf'))
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  assert np.abs(torch_logits(merged, LTOKENS, LMASK) - want)[LMASK].max() <= 1e-4


def test_learned_merged_checkpoint_matches_adapted_model(gpt_opt, tmp_path):
  """LoRA + IA3 + BitFit folded into GPT-2 / OPT weights (c_attn re-fused), read by
  transformers and by our loader."""
  cfg = gpt_opt.loaded.config
  peft = PeftConfig(methods=('lora', 'ia3', 'bitfit'), targets='all', num_contexts=2,
                    lora=LoraConfig(rank=4, alpha=8.0))
  tables = random_tables(fresh_tables(cfg, peft), seed=5)
  want = _learned(gpt_opt, tables, peft, 1)
  interop.save_merged(tmp_path / 'merged', gpt_opt.loaded.params, tables, cfg, peft, 1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  assert type(hf) is type(gpt_opt.hf)
  diff = np.abs(torch_logits(hf, LTOKENS, LMASK) - want)[LMASK].max()
  print(f'merged {gpt_opt.arch} (lora+ia3+bitfit): max abs logit diff {diff:.2e}')
  assert diff <= 1e-4
  assert np.abs(want - gpt_opt.want)[LMASK].max() > 0.05
  assert checkpoints.load_decoder(tmp_path / 'merged', strict=True).config == cfg


@pytest.mark.parametrize('gpt_opt', ['gpt2'], indirect=True)
def test_learned_what_does_not_fit_is_an_error(gpt_opt, tmp_path):
  """GPT-2's fused c_attn: what a per-projection model cannot hold is named, nothing changed."""
  from safetensors.numpy import load_file, save_file
  cfg = gpt_opt.loaded.config
  qkv = PeftConfig(methods=('lora',), targets='q_proj,k_proj,v_proj', num_contexts=1,
                   lora=LoraConfig(rank=4, alpha=8.0))
  interop.export_peft(tmp_path / 'qkv', random_tables(fresh_tables(cfg, qkv), seed=6), cfg, qkv)
  qv = PeftConfig(methods=('lora',), targets='q_proj,v_proj', num_contexts=1,
                  lora=LoraConfig(rank=4, alpha=8.0))
  with pytest.raises(ValueError, match=r'(?s)layer 0 attn.c_attn: the adapter changes outputs '
                     r"of it that the model does not adapt \(it adapts only \['attn/q_proj', "
                     r"'attn/v_proj'\]\)"):
    interop.import_peft(tmp_path / 'qkv', fresh_tables(cfg, qv), cfg, qv)
  weights = load_file(str(tmp_path / 'qkv' / interop.ADAPTER_WEIGHTS))
  key = 'base_model.model.transformer.h.1.attn.c_attn.lora_B.weight'
  weights[key] = np.ones_like(weights[key])  # not block-diagonal: rank 12 for each of q, k, v
  save_file(weights, str(tmp_path / 'qkv' / interop.ADAPTER_WEIGHTS))
  with pytest.raises(ValueError, match=r'layer 1: attn/k_proj gets a rank-12 update from '
                     r"attn.c_attn \(12 non-zero columns of lora_B\), more than the model's "
                     'LoRA rank 4'):
    interop.import_peft(tmp_path / 'qkv', fresh_tables(cfg, qkv), cfg, qkv)
  dora = PeftConfig(methods=('dora',), targets='q_proj,v_proj', lora=LoraConfig(rank=4))
  with pytest.raises(ValueError, match=r'DoRA on attn.c_attn covers only some of its outputs'):
    interop.export_peft(tmp_path / 'dora', fresh_tables(cfg, dora), cfg, dora)
