"""The device mesh, the logical-axis rules, and the model's shard_map layers.

This is the only package that names mesh axes (`mesh` builds the mesh and
the shardings, `collectives` the shard_map layers). Everything else speaks in
logical axes: parameters (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `layers`, `norm`) and activations (`act_batch`, `act_length`,
`act_embed`, `act_heads`, `act_kv_heads`, `act_mlp`, `act_vocab`).

Mesh axes:
  data      pure data parallelism: parameters replicated, batch split.
  fsdp      ZeRO-3: the batch split, and the weights and optimizer state too,
            gathered per layer inside the step.
  sequence  context parallelism: every activation's length split; attention
            gathers the whole row's keys and values (`context_parallel`), causal
            rows reordered first so every chip has as much of the triangle
            (`balance_length`). Weights are split over it as over fsdp.
  expert    expert parallelism: each sparse layer's experts split, the tokens
            gathered and the outputs reduce-scattered (`expert_parallel`).
            Elsewhere one more data-parallel axis splitting weights, like fsdp.
  tensor    Megatron-style: heads, MLP hidden and vocab split; between attention
            and the MLP the residual stream is split on length over it
            (Megatron's sequence parallelism, `act_res_length`): the all-reduce
            after each block becomes a reduce-scatter and an all-gather of the
            same volume, and each chip keeps 1/tensor of the stream.

Each axis has an ICI size (within a slice) and a DCN size (across slices); the
mesh axis is their product. Put `data` on DCN: it only all-reduces gradients
once per step, while fsdp, sequence and tensor communicate every layer.
"""

from llm.sharding.collectives import (
  balance_length,
  balance_order,
  check_length,
  context_parallel,
  embedding_lookup,
  expert_parallel,
  per_shard,
  sequence_shards,
)
from llm.sharding.mesh import (
  BATCH_AXES,
  EXPERT_AXIS,
  MESH_AXES,
  RULES,
  SEQUENCE_AXIS,
  as_axes,
  axes_size,
  batch_divisor,
  batch_sharding,
  check_divisible,
  global_batch,
  like_params,
  logical_shardings,
  make_mesh,
  mesh_from_spec,
  one_device_mesh,
  replicated,
  rules_context,
)

__all__ = [
  'BATCH_AXES',
  'EXPERT_AXIS',
  'MESH_AXES',
  'RULES',
  'SEQUENCE_AXIS',
  'as_axes',
  'axes_size',
  'balance_length',
  'balance_order',
  'batch_divisor',
  'batch_sharding',
  'check_divisible',
  'check_length',
  'context_parallel',
  'embedding_lookup',
  'expert_parallel',
  'global_batch',
  'like_params',
  'logical_shardings',
  'make_mesh',
  'mesh_from_spec',
  'one_device_mesh',
  'per_shard',
  'replicated',
  'rules_context',
  'sequence_shards',
]
