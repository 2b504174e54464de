"""The names of what a training run's workdir holds, in one place for every reader and writer.

    DIR/config.json        the run's config (written first; evaluation and plug-ins rebuild from it)
    DIR/tokenizer/         the tokenizer built from the training captions (word-level runs)
    DIR/base_lm/           the demo's stage-0 text decoder (a Hugging Face checkpoint)
    DIR/base_vision/       the demo's stage-0 vision tower (a Hugging Face checkpoint)
    DIR/tfds/              the demo dataset, built on first use unless data.data_dir is set
    DIR/checkpoints/       orbax steps of the train state and its data position
    DIR/best, best.json    the best-validation trainable tree and its step, loss, perplexity
    DIR/export/            the adaptor-only export
    DIR/plugins/<context>  every adapted context's plug-in (train.plugins)
    DIR/metrics.jsonl, DIR/tensorboard/, DIR/eval/   metrics of training and evaluation
"""

CONFIG = 'config.json'
TOKENIZER = 'tokenizer'
BASE_LM = 'base_lm'
BASE_VISION = 'base_vision'
TFDS = 'tfds'
CHECKPOINTS = 'checkpoints'
BEST = 'best'
BEST_VERSIONS = 'best_versions'
EXPORT = 'export'
PLUGINS = 'plugins'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tensorboard'
EVAL = 'eval'
