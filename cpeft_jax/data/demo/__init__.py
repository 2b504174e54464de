"""An offline demo captioning dataset: procedural shape scenes with templated true captions,
and true question-answer pairs about the same scenes (the 'qa' task).

`generate_examples` is the pure-numpy source; `builder.CpeftDemoCaptions` stores it as a TFDS
dataset with coco_captions' features (imported separately, since it needs tensorflow_datasets).
"""

from cpeft_jax.data.demo.captions import caption, reference_captions
from cpeft_jax.data.demo.examples import SPLITS, generate_examples, make_example, qa_pairs
from cpeft_jax.data.demo.questions import questions
from cpeft_jax.data.demo.scenes import Group, Item, Scene, draw, sample_scene

__all__ = ['SPLITS', 'Group', 'Item', 'Scene', 'caption', 'draw', 'generate_examples',
           'make_example', 'qa_pairs', 'questions', 'reference_captions', 'sample_scene']
