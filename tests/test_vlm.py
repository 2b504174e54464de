"""The vision-language model: splicing, connector options, what receives gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpeft_jax.contexts import Kind
from cpeft_jax.data import layout
from cpeft_jax.models.connector import ConnectorConfig
from cpeft_jax.models.llama import Decoder
from cpeft_jax.models.vlm import VisionLanguageModel
from helpers import VLM_DEC, VLM_PEFT, PatchEncoder, vlm_batch

DEC, PEFT = VLM_DEC, VLM_PEFT


def _model(**kw):
  return VisionLanguageModel(PatchEncoder(), DEC, PEFT, **kw)


def _apply(model, v, pixels, b, **kw):
  return model.apply(v, pixels, b['tokens'], b['kinds'], b['context_ids'], b['attention_mask'],
                     **kw)


@pytest.mark.parametrize('connector', [ConnectorConfig(), ConnectorConfig(kind='mlp', pre_norm=True)])
def test_logits_equal_decoder_on_hand_spliced_embeddings(connector):
  pixels, b = vlm_batch()
  model = _model(connector_cfg=connector)
  v = model.init(jax.random.key(0), pixels, b['tokens'], b['kinds'], b['context_ids'])
  got = _apply(model, v, pixels, b)
  # Independent splice: a Python loop over rows and positions.
  img = model.apply(v, pixels, method=VisionLanguageModel.image_embeddings)
  text = Decoder(DEC, PEFT).apply({'params': v['params']['decoder']}, b['tokens'],
                                  method=Decoder.embed)
  emb = np.array(text)
  for r in range(2):
    k = 0
    for t in range(12):
      if b['kinds'][r, t] == Kind.IMAGE:
        emb[r, t] = img[r, k]
        k += 1
  want = Decoder(DEC, PEFT).apply(
      {'params': v['params']['decoder'], 'adaptors': v['adaptors']['decoder']},
      embeddings_BLD=jnp.asarray(emb), context_ids_BL=b['context_ids'],
      attention_mask_BL=b['attention_mask'])
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_boundary_tokens_are_spliced_and_trained():
  pixels, b = vlm_batch(boundary=True)
  model = _model(connector_cfg=ConnectorConfig(boundary_tokens=True))
  v = model.init(jax.random.key(0), pixels, b['tokens'], b['kinds'], b['context_ids'])
  assert v['params']['connector']['boundary'].shape == (2, DEC.hidden_size)
  g = jax.grad(lambda p: _apply(model, {'params': p, 'adaptors': v['adaptors']}, pixels, b,
                                return_hidden=True).sum())(v['params'])
  assert np.all(np.asarray(g['connector']['boundary']) != 0)


def test_only_connector_and_adaptors_receive_gradients_by_default():
  pixels, b = vlm_batch()
  model = _model()
  v = model.init(jax.random.key(0), pixels, b['tokens'], b['kinds'], b['context_ids'])
  v['adaptors'] = jax.tree.map(lambda a: a + 0.1, v['adaptors'])  # B != 0 so A gets gradient

  def loss(variables):
    return jnp.mean(_apply(model, variables, pixels, b) ** 2)

  g = jax.grad(loss)(v)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g['params']['encoder']))
  assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g['params']['connector']))
  assert all(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g['adaptors']))
  trained = dataclasses.replace(model, train_encoder=True)
  g2 = jax.grad(lambda p: jnp.mean(_apply(trained, {'params': p, 'adaptors': v['adaptors']},
                                          pixels, b) ** 2))(v['params'])
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g2['encoder']))


def test_layout_image_count_must_match_encoder():
  pixels, _ = vlm_batch()
  b = layout.layout_captions([[5, 6]], num_image_tokens=3, seq_len=12, bos_id=1, eos_id=2,
                             pad_id=0, context_map='modality')
  model = _model()
  with pytest.raises(ValueError, match=r"\[3\] image positions per row but the encoder gives 4"):
    model.init(jax.random.key(0), pixels[:1], b['tokens'], b['kinds'], b['context_ids'])


def test_bad_connector_config():
  with pytest.raises(ValueError, match="connector.kind='conv'"):
    ConnectorConfig(kind='conv')
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['drop'\] in connector"):
    ConnectorConfig.from_dict({'drop': 0.1})
