"""An offline demo captioning dataset: procedural shape scenes with templated true captions.

`generate_examples` is the pure-numpy source; `builder.CpeftDemoCaptions` stores it as a TFDS
dataset with coco_captions' features (imported separately, since it needs tensorflow_datasets).
"""

from cpeft_jax.data.demo.captions import caption, reference_captions
from cpeft_jax.data.demo.examples import SPLITS, generate_examples, make_example
from cpeft_jax.data.demo.scenes import Group, Item, Scene, draw, sample_scene

__all__ = ['SPLITS', 'Group', 'Item', 'Scene', 'caption', 'draw', 'generate_examples',
           'make_example', 'reference_captions', 'sample_scene']
