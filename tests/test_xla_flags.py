"""The XLA flags train.py sets before JAX starts: added to the user's, never overriding them."""

import subprocess
import sys

from cpeft_jax import xla_flags


def test_training_defaults_join_the_users_flags_and_keep_their_values():
  env = {}
  assert xla_flags.set_training_defaults(env) == ' '.join(xla_flags.TRAINING)
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  assert env['XLA_FLAGS'].split() + list(xla_flags.TRAINING) == xla_flags.set_training_defaults(
      env).split()
  name = xla_flags.TRAINING[0].split('=')[0]
  env = {'XLA_FLAGS': f'{name}=true'}
  assert xla_flags.set_training_defaults(env) == f'{name}=true'


def test_train_py_sets_them_before_jax_starts():
  """Importing train.py (which loads its default config, and with it JAX) sets the flags while
  XLA can still read them, keeping the user's (here: a 3-device CPU platform)."""
  code = ('import os, sys; sys.argv = ["train.py"]; import train, jax; '
          'print(os.environ["XLA_FLAGS"]); print(jax.device_count())')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={'PATH': '', 'JAX_PLATFORMS': 'cpu',
                            'XLA_FLAGS': '--xla_force_host_platform_device_count=3'})
  flags, devices = out.stdout.split('\n')[:2]
  assert flags.split() == ['--xla_force_host_platform_device_count=3', *xla_flags.TRAINING]
  assert devices == '3'


def test_tunables_join_the_users_and_user_environ_takes_back_only_ours():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  assert xla_flags.add_tunables(env)
  assert env['GLIBC_TUNABLES'].split(':') == ['glibc.malloc.arena_max=2', *xla_flags.TUNABLES]
  assert not xla_flags.add_tunables(env)  # all named now: nothing to add, no restart
  assert xla_flags.user_environ(env) == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  name = xla_flags.TUNABLES[0].split('=')[0]
  mine = {'GLIBC_TUNABLES': f'{name}=0'}  # the user's own value of ours is kept
  assert not xla_flags.add_tunables(mine) and mine == {'GLIBC_TUNABLES': f'{name}=0'}
  assert xla_flags.user_environ(mine) == mine
  empty = {}
  assert xla_flags.add_tunables(empty) and xla_flags.user_environ(empty) == {}


def test_restart_reexecutes_once_with_the_tunables_and_the_same_arguments():
  code = ('import os, sys; from cpeft_jax import xla_flags; '
          'print("start", os.environ.get("GLIBC_TUNABLES"), flush=True); '
          'xla_flags.restart_with_tunables(); '
          'print("run", os.environ["GLIBC_TUNABLES"], sys.argv[1:])')
  out = subprocess.run([sys.executable, '-c', code, 'a', '--b=c'], capture_output=True,
                       text=True, check=True, env={'PATH': '', 'PYTHONPATH': ':'.join(sys.path)})
  assert out.stdout.splitlines() == [
      'start None', f'start {":".join(xla_flags.TUNABLES)}',
      f"run {':'.join(xla_flags.TUNABLES)} ['a', '--b=c']"]


def test_release_freed_memory_hands_freed_heap_pages_back():
  # 160 MiB of 64 KiB blocks (malloc's heap, below its mmap threshold) with one block after
  # them, so that freeing them leaves a hole inside the heap that free() alone keeps.
  code = ('from bench.harness import current_rss_mib; from cpeft_jax import xla_flags\n'
          'blocks = [b"x" * 65536 for _ in range(2560)]; after = b"y" * 65536\n'
          'del blocks; before = current_rss_mib()\n'
          'print(xla_flags.release_freed_memory(), int(before - current_rss_mib()))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={'PATH': '', 'PYTHONPATH': ':'.join(sys.path)})
  returned, released_mib = out.stdout.split()
  assert returned == 'True' and int(released_mib) >= 150, out.stdout
