r"""Ahead-of-time compilation of the train step: will this config fit, and how fast does it build?

  python -m llm.compile --config=experiments/synthetic.py:llama3_8b \
      --topology=v5e:16x16 --config.mesh.fsdp=-1 --config.batch_size=256

compiles the real train step for the target mesh without the hardware (a TPU
topology needs the optional `jax[tpu]` extra: `pip install -r requirements-tpu.txt`;
without --topology it compiles for the local devices) and prints the per-device
memory XLA plans (parameters and optimizer state in, temporaries, outputs), the
compile time, and the FLOPs of a step: XLA's count and the model's
(`llm/metrics.py`, what MFU divides: for a mixture of experts, only the active
parameters, also printed next to the total). Nothing is allocated: the state
exists only as shapes. The model's kernels are those of the target's platform
(the trainer resolves them from the mesh), so a TPU topology compiled on a CPU
host gets the TPU program.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp

from llm import metrics, sharding, train
from llm import model as model_lib


@dataclasses.dataclass
class CompileReport:
  compile_seconds: float
  argument_bytes: int  # Per device: state and batch shards.
  output_bytes: int
  alias_bytes: int  # Outputs written in place of donated arguments.
  temp_bytes: int  # Activations, gradients, collectives' buffers.
  flops: float  # XLA's count for one step on one device.
  model_flops: float  # The model's (metrics.train_flops_per_token) for one step, per device.
  params: int  # Total parameters.
  active_params: int  # Those one token uses: fewer for a mixture of experts.
  # The program itself, e.g. to see which kernels the target got:
  # `lowered.as_text(debug_info=True)` is the StableHLO as traced, each op
  # located by its named scopes; `compiled.as_text()` the HLO after XLA's passes.
  lowered: jax.stages.Lowered = dataclasses.field(repr=False)
  compiled: jax.stages.Compiled = dataclasses.field(repr=False)

  @property
  def peak_bytes(self) -> int:
    """Per-device bytes live at the peak: inputs, temporaries and non-donated outputs."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def summary(self) -> str:
    gib = 2**30
    return (
      f'compiled in {self.compile_seconds:.1f}s; per device: peak {self.peak_bytes / gib:.2f} GiB '
      f'(arguments {self.argument_bytes / gib:.2f}, temporaries {self.temp_bytes / gib:.2f}, '
      f'outputs {self.output_bytes / gib:.2f}, aliased {self.alias_bytes / gib:.2f}); '
      f'{self.flops / 1e12:.2f} TFLOP per step (XLA), {self.model_flops / 1e12:.2f} by the '
      f'model ({self.params / 1e9:.2f}B parameters, {self.active_params / 1e9:.2f}B active)'
    )


def topology_devices(topology: str) -> list:
  """Devices of a TPU topology such as 'v5e:4x4', usable for compilation only."""
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(topology, 'tpu').devices)
  except Exception as e:  # libtpu missing or an unknown topology name.
    raise ValueError(
      f'Cannot build TPU topology {topology!r} ({e}); install the TPU extra '
      '(pip install -r requirements-tpu.txt) and use a name like v5e:4x4 or v4:2x2x2.'
    ) from e


def compile_train_step(config, devices=None) -> CompileReport:
  """Lowers and compiles `config`'s train step for `devices` (default: local) from shapes."""
  trainer = train.Trainer.create(config, devices)
  batch_shape = (config.batch_size, config.seq_len)
  state = trainer.abstract_state()
  row = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=sharding.batch_sharding(trainer.mesh))
  batch = {
    'inputs': row,
    'targets': row,
    'segment_ids': row,
    'positions': row,
    'loss_mask': jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=row.sharding),
  }
  start = time.perf_counter()
  with sharding.rules_context(trainer.mesh):
    lowered = trainer.step_fn.lower(state, batch)
    compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  cfg = trainer.model_cfg
  tokens_per_device = config.batch_size * config.seq_len / trainer.mesh.size
  return CompileReport(
    compile_seconds=seconds,
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    flops=float((cost or {}).get('flops', 0.0)),
    model_flops=metrics.train_flops_per_token(cfg, config.seq_len) * tokens_per_device,
    params=model_lib.count_params(cfg),
    active_params=model_lib.count_active_params(cfg),
    lowered=lowered,
    compiled=compiled,
  )


def main(argv):
  del argv
  from absl import flags

  FLAGS = flags.FLAGS
  devices = topology_devices(FLAGS.topology) if FLAGS.topology else None
  report = compile_train_step(FLAGS.config, devices)
  print(report.summary())


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags

  from llm import cli

  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('topology', '', "TPU topology to compile for, e.g. 'v5e:4x4'.")
  flags.mark_flags_as_required(['config'])
  cli.run(main)
