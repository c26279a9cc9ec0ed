"""Ahead-of-time compilation reports memory and FLOPs without allocating the state.

A TPU topology compiled on this CPU host must get the TPU program: the kernels
are picked from the mesh's devices, not from the host (llm/model/kernels.py).
"""

import jax
import pytest

from llm import compile as compile_lib
from llm import metrics, model, sharding
from llm.model import ModelConfig
from tests.train_test import tiny_config


def test_compile_reports_memory_and_flops_for_a_sharded_step():
  c = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  cfg = ModelConfig.from_dict(c.model)
  report = compile_lib.compile_train_step(c)
  # Each device holds a shard of params + Adam moments (float32) and of the batch.
  state_bytes = 3 * 4 * model.count_params(cfg)
  assert 0 < report.argument_bytes < state_bytes / 2 + 5 * 4 * c.batch_size * c.seq_len
  assert report.temp_bytes > 0 and report.peak_bytes >= report.argument_bytes
  per_device = metrics.train_flops_per_token(cfg, c.seq_len) * c.batch_size * c.seq_len / 8
  # XLA also counts elementwise work and the optimizer: the same order of magnitude.
  assert 0.5 * per_device < report.flops < 4 * per_device
  assert 'per device: peak' in report.summary()


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match="Cannot build TPU topology 'v99:1x1'"):
    compile_lib.topology_devices('v99:1x1')


def _cpu_variant_traces(devices) -> dict[str, bool]:
  """Which traces of the CPU kernels a tiny bfloat16 train step compiled for `devices` has."""
  c = tiny_config(**{'model.dtype': 'bfloat16', 'mesh.data': 1, 'mesh.fsdp': -1})
  report = compile_lib.compile_train_step(c, devices)
  # 'cpu_kernel' is the named scope of both CPU gradients: XLA keeps it in each
  # op's op_name (jit(train_step)/.../cpu_kernel/...) through the CPU and the
  # TPU compilers alike. With its slashes, so that a Python function named
  # like it (the HLO text lists the traced call stacks) does not count. The
  # matmul gradient's optimization barrier is looked for in the StableHLO as
  # traced, since both compilers expand barriers away: no compiled program shows
  # an opt-barrier. (This config has no remat, whose barriers would count too.)
  return {
    'scope': '/cpu_kernel/' in report.compiled.as_text(),
    'barrier': 'stablehlo.optimization_barrier' in report.lowered.as_text(debug_info=True),
  }


def test_a_tpu_topology_gets_none_of_the_cpu_kernels():
  pytest.importorskip('libtpu', reason='TPU topologies need libtpu: requirements-tpu.txt')
  tpu_devices = compile_lib.topology_devices('v5e:2x2')
  assert _cpu_variant_traces(tpu_devices) == {'scope': False, 'barrier': False}
  # The same config for this host's CPUs has both, so the test can see them.
  assert _cpu_variant_traces(jax.devices()[:4]) == {'scope': True, 'barrier': True}


@pytest.mark.parametrize(
  'topology, sizes',
  [('v5e:16x16', {'fsdp': 64, 'tensor': 4}), ('v5p:4x4x4', {'fsdp': 8, 'expert': 8})],
)
def test_a_split_no_whole_physical_axes_make_still_builds(topology, sizes):
  pytest.importorskip('libtpu', reason='TPU topologies need libtpu: requirements-tpu.txt')
  devices = compile_lib.topology_devices(topology)
  mesh = sharding.make_mesh({'data': 1, **sizes}, devices)
  assert {a: mesh.shape[a] for a in sizes} == sizes
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
