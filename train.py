"""Trains a Context-PEFT captioning model.

    python train.py --config=configs/demo.py --workdir=/tmp/demo [--config.peft.lora.rank=8]

Rerunning the same command resumes from the workdir's latest checkpoint. A run can start from
adaptor plug-ins trained in other runs (config peft.plugins; train.freeze_contexts keeps some
fixed): configs/demo_vqa.py walks through it.

Multi-host (TPU pods, GPU clusters): run the same command on every host with --distributed
(implied when JAX_COORDINATOR_ADDRESS is set); jax.distributed.initialize() then finds the
cluster itself on TPU, SLURM and Open MPI, or takes JAX_COORDINATOR_ADDRESS with
--num_processes and --process_id. Each host reads its own share of the data; the mesh
(config.mesh, or --mesh=data=-1,fsdp=2,tensor=2) spans every device of every host.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from cpeft_jax import xla_flags

xla_flags.set_training_defaults()  # before anything starts JAX

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (get_config(arg)).')
flags.DEFINE_string('workdir', 'workdirs/demo', 'Directory for checkpoints and metrics.')
flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() before any JAX work. '
                  'Default: when JAX_COORDINATOR_ADDRESS is set.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes (else detected).')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index (else detected).')
flags.DEFINE_string('mesh', None, 'Device mesh, e.g. data=2,fsdp=2,tensor=2 (-1: the remaining '
                    'devices); sets config.mesh. Default: config.mesh, else data=-1 (all devices).')
FLAGS = flags.FLAGS


def _start_distributed():
  """jax.distributed.initialize() when asked; it must precede any JAX computation."""
  wanted = FLAGS.distributed
  if wanted is None:
    wanted = bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))
  if not wanted:
    return
  import jax
  jax.distributed.initialize(num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.warning('process %d of %d, %d local of %d devices', jax.process_index(),
                  jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # keep the console to our metrics, not orbax's progress
    logging.set_verbosity(logging.WARNING)
  _start_distributed()
  import jax
  from cpeft_jax import schema, sharding
  if FLAGS.mesh:
    try:
      mesh = sharding.parse_mesh(FLAGS.mesh)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    with FLAGS.config.unlocked():
      FLAGS.config.mesh = mesh
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
  from cpeft_jax import schema
  app.run(main, flags_parser=schema.parse_flags)
