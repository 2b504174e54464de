"""configs/paper.py: every grid entry parses and converts; a few build end to end, tiny."""

import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import paper  # noqa: E402
from cpeft_jax import checkpoints, contexts, experiment  # noqa: E402
from cpeft_jax.data import pipeline, sources  # noqa: E402
from cpeft_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from cpeft_jax.models import vlm  # noqa: E402
from cpeft_jax.models.connector import ConnectorConfig  # noqa: E402
from cpeft_jax import losses  # noqa: E402
from cpeft_jax import trainable as trainable_lib  # noqa: E402
from cpeft_jax.train import state as state_lib  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_grid_covers_the_paper():
  g = paper.grid()
  assert len(g) == len(set(g)) == 64
  for enc in ('tiny', 'large'):
    runs = [a for a in g if a.endswith(f'encoder={enc}')]
    assert len(runs) == 5 * 3 * 2 + 2
    assert sum('method=lora' in a for a in runs) == 3 * 3 * 2


@pytest.mark.parametrize('arg', paper.grid())
def test_every_grid_config_converts(arg):
  c = paper.get_config(arg)
  peft = experiment.peft_config(c)
  state_lib.OptimConfig.from_dict(c.optim)
  ConnectorConfig.from_dict(c.connector)
  experiment.decoder_config(c)  # numerics only: text_model's config.json gives the shape
  pipeline.AugmentConfig(**c.data.augment)
  assert c.train.mode in trainable_lib.TRAINABLE
  method = dict(kv.split('=') for kv in arg.split(','))['method']
  if method in ('none', 'full'):
    assert peft.methods == () and c.train.mode == {'none': 'connector', 'full': 'full'}[method]
  else:
    assert peft.methods == (method,) and c.train.mode == 'peft'
    assert peft.num_contexts == contexts.num_contexts(c.data.context_map)
  assert c.vision.path in paper.ENCODERS.values()


def test_paper_hyper_parameters():
  c = paper.get_config('method=lora,rank=64,contexts=specific,encoder=large')
  assert (c.train.batch_size, c.train.epochs, c.data.seq_len) == (96, 8, 128)
  opt = state_lib.OptimConfig.from_dict(c.optim)
  assert (opt.learning_rate, opt.b1, opt.b2, opt.schedule) == (1e-4, 0.9, 0.95, 'constant')
  assert (c.connector.kind, c.connector.dropout, c.model.residual_dropout) == ('linear', 0.1, 0.1)
  assert (c.model.dtype, c.model.param_dtype) == ('bfloat16', 'float32')
  assert c.data.context_map == 'modality' and c.peft.num_contexts == 2
  assert c.peft.lora.rank == 64 and c.vision.path == paper.ENCODERS['large']
  assert paper.get_config('contexts=agnostic').data.context_map == 'agnostic'


@pytest.mark.parametrize('arg, match', [
    ('method=vera', r"method='vera'; expected one of"),
    ('method=lora+vera', r"method='lora\+vera'"),
    ('contexts=both', r"contexts='both'; expected one of \('agnostic', 'specific'\)"),
    ('encoder=huge', r"encoder='huge'; expected one of \('tiny', 'large'\)"),
    ('dataset=coco', r"dataset='coco'; expected one of"),
    ('rank=eight', r'rank=.eight.: expected int'),
    ('lr=1', r"Unknown config argument 'lr'"),
])
def test_bad_args_are_named(arg, match):
  with pytest.raises(ValueError, match=match):
    paper.get_config(arg)


# ----------------------------------------------------------------------------- end to end, tiny


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A demo split, a tiny Swin V2 (+ ImageNet preprocessor) and a tiny Llama with a tokenizer."""
  torch = pytest.importorskip('torch')
  import transformers as T
  from cpeft_jax.data.demo import builder
  tmp = tmp_path_factory.mktemp('configs')
  demo = builder.make_config(image_size=32, num_train=4, num_validation=2, num_test=2, seed=3)
  split = sources.load('demo', 'train', str(tmp / 'tfds'), demo)
  torch.manual_seed(0)
  swin = str(tmp / 'swin')
  # 32 px, patch 4: an 8x8 grid, merged to 4x4 -> 16 image tokens of width 32.
  T.Swinv2Model(T.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                               num_heads=[2, 4], window_size=4)).save_pretrained(swin)
  T.ViTImageProcessor(size={'height': 32, 'width': 32}, image_mean=list(IMAGENET_MEAN),
                      image_std=list(IMAGENET_STD)).save_pretrained(swin)
  tok = tokenizer_lib.word_level(c for caps in split.captions for c in caps)
  llama = str(tmp / 'llama')
  T.LlamaForCausalLM(T.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id)).save_pretrained(llama)
  tok.save_pretrained(llama)
  return dict(split=split, swin=swin, llama=llama, tmp=tmp)


def _config(arg, tiny):
  c = paper.get_config(f'{arg},text_model={tiny["llama"]}')
  c.vision.update(path=tiny['swin'], dtype='float32')
  c.model.dtype = 'float32'
  c.data.seq_len = 48  # BOS + 16 image tokens + caption + EOS
  c.train.batch_size = c.eval.batch_size = 4
  return c


@pytest.mark.parametrize('arg', [
    'method=lora,rank=8,targets=AF,contexts=specific',
    'method=ia3,targets=A,contexts=agnostic',
    'method=bitfit,targets=F,contexts=specific',
    'method=none',
    'method=full',
])
def test_grid_entries_build_and_run(arg, tiny, tmp_path):
  c = _config(arg, tiny)
  exp = experiment.build(c, str(tmp_path), tiny['split'])
  assert (exp.num_image_tokens, exp.image_size) == (16, 32)  # from the encoder's config
  assert exp.image_mean == IMAGENET_MEAN and exp.image_std == IMAGENET_STD
  data = exp.batches(tiny['split'], train=True)
  assert (data.mean, data.std) == (IMAGENET_MEAN, IMAGENET_STD)

  # The frozen parts are the checkpoints' weights, not a random init.
  _, enc_params = checkpoints.load_vision(tiny['swin'])
  dec = checkpoints.load_decoder(tiny['llama'])
  for got, want in ((exp.variables['params']['encoder'], enc_params),
                    (exp.variables['params']['decoder'], dec.params)):
    jax.tree.map(np.testing.assert_array_equal, got, want)

  trainable, frozen = trainable_lib.split(exp.variables, c.train.mode)
  tops = {f'{k}/{m}' for k, v in trainable.items() for m in v}
  assert tops == {'none': {'params/connector'}, 'full': {'params/connector', 'params/decoder'}
                  }.get(arg.split(',')[0][7:], {'params/connector', 'adaptors/decoder'})
  assert 'encoder' in frozen['params']
  batch = {k: v for k, v in data.batch(0, 0).items() if k in experiment.BATCH_KEYS}
  out = losses.eval_step(trainable, frozen, batch, apply_fn=vlm.apply_fn(exp.model))
  loss = float(out['loss_sum'] / out['tokens'])
  assert np.isfinite(loss) and loss > 0


def test_lora_rank_above_the_width_is_refused(tiny, tmp_path):
  c = _config('method=lora,rank=64,targets=A', tiny)
  with pytest.raises(ValueError, match=r'peft.lora.rank=64 is larger than the adapted projection '
                                       r'layers/attn/\w+ \(32 -> 32\).*expected a rank <= 32'):
    experiment.build(c, str(tmp_path), tiny['split'])


def test_hf_vision_needs_a_path(tiny, tmp_path):
  c = _config('method=none', tiny)
  c.vision.path = ''
  with pytest.raises(ValueError, match=r"vision.kind='hf' needs vision.path"):
    experiment.build(c, str(tmp_path), tiny['split'])
  c.vision.kind = 'clip'
  with pytest.raises(ValueError, match=r"vision.kind='clip'; expected 'patch' or 'hf'"):
    experiment.build(c, str(tmp_path), tiny['split'])


def test_vision_model_names_an_encoder_with_the_catalogs_settings(tiny, tmp_path):
  from cpeft_jax import catalog
  c = _config('method=none', tiny)
  c.vision = {'dtype': 'float32'}
  c.vision_model = tiny['swin']  # a local path: the loader's defaults
  assert dict(experiment.vision_config(c)) == dict(kind='hf', path=tiny['swin'], feature_layer=-1,
                                             drop_cls=True, dtype='float32')
  exp = experiment.build(c, str(tmp_path), tiny['split'])
  assert (exp.num_image_tokens, exp.image_size) == (16, 32)
  name = 'openai/clip-vit-base-patch32'
  c.vision_model = name
  want = catalog.VISION[name]
  got = experiment.vision_config(c)
  assert (got.path, got.feature_layer, got.drop_cls) == (name, want.feature_layer, want.drop_cls)
  # Presets not in this machine's cache: the error says what they are and how to fetch them.
  with pytest.raises(FileNotFoundError, match=r'clip-vit-base-patch32.*catalog preset: clip'):
    experiment.build(c, str(tmp_path), tiny['split'])
  c.vision_model, c.text_model = tiny['swin'], 'HuggingFaceTB/SmolLM2-135M'
  with pytest.raises(FileNotFoundError, match=r'SmolLM2-135M.*catalog preset: llama'):
    experiment.build(c, str(tmp_path), tiny['split'])
