"""Trains a Context-PEFT captioning model.

    python train.py --config=configs/demo.py --workdir=/tmp/demo [--config.peft.lora.rank=8]

Rerunning the same command resumes from the workdir's latest checkpoint. A run can start from
adaptor plug-ins trained in other runs (config peft.plugins; train.freeze_contexts keeps some
fixed): configs/demo_vqa.py walks through it.

Multi-host (TPU pods, GPU clusters): run the same command on every host with --distributed
(implied when JAX_COORDINATOR_ADDRESS is set); jax.distributed.initialize() then finds the
cluster itself on TPU, SLURM and Open MPI, or takes JAX_COORDINATOR_ADDRESS with
--num_processes and --process_id. Each host reads its own rows of every global batch; the mesh
(config.mesh, or --mesh=data=-1,fsdp=2,tensor=2) spans every device of every host. A signal
to any one host stops them all after the same step, with one checkpoint (see
cpeft_jax/train/trainer.py).
"""


from absl import app, flags, logging
from ml_collections import config_flags

from cpeft_jax import xla_flags

# Before anything starts JAX; as a command, restarted first with glibc's malloc tunables.
xla_flags.set_training_defaults(restart=__name__ == '__main__')

from cpeft_jax import hosts, schema  # noqa: E402  (import JAX, after the flags)

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', 'workdirs/demo', 'Directory for checkpoints and metrics.')
hosts.define_flags()
schema.define_mesh_flag()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # keep the console to our metrics, not orbax's progress
    logging.set_verbosity(logging.WARNING)
  hosts.start_from_flags()
  import jax
  from cpeft_jax import sharding
  schema.apply_mesh_flag(FLAGS.config)
  with schema.exit_on_config_error():
    sharding.mesh_shape(FLAGS.config.get('mesh'), jax.device_count())  # fail before any work
    schema.check(FLAGS.config)
    if FLAGS.config.get('variants'):  # the two-variant demo: stage 0, then one run per variant
      from cpeft_jax import demo
      demo.run(FLAGS.config, FLAGS.workdir)
      return
    from cpeft_jax.train import trainer
    result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info('done: %s', result)
  print(f"best validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.3f} "
        f"after {result['steps']} steps; workdir {FLAGS.workdir}")


if __name__ == '__main__':
  app.run(main, flags_parser=schema.parse_flags)
