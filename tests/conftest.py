"""Runs every test on 8 fake CPU devices, so sharded code paths are exercised."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax initialises its backends.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# From its first use to the end of the process libtpu holds a host-wide lock
# file, which fails any other process's topology (another pytest on this host);
# compiling for a topology opens no chip, so the processes may share libtpu.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# One persistent compilation cache for the session, shared with the `llm.train`
# and other processes the tests start (they inherit the environment): most of
# them compile the same tiny programs, and a cached compile halves a tiny
# run's start-up (24 s -> 11 s on the 2-core CI host). Fresh per session, so
# nothing from another checkout is ever read.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='llm-tests-jax-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
