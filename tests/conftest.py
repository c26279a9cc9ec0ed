"""Runs every test on 8 fake CPU devices, so sharded code paths are exercised."""

import os

# Must happen before jax initialises its backends.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# From its first use to the end of the process libtpu holds a host-wide lock
# file, which fails any other process's topology (another pytest on this host);
# compiling for a topology opens no chip, so the processes may share libtpu.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
