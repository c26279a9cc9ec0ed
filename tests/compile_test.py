"""Ahead-of-time compilation reports memory and FLOPs without allocating the state."""

import pytest

from llm import compile as compile_lib
from llm import metrics, model
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
