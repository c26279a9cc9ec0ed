"""The routed experts of Mixtral and Qwen3-MoE, in both layouts Hugging Face uses.

Dims legend as in `llm/model/moe.py`: E experts, D model width, F an expert's
hidden width.

On disk, as `save_pretrained` writes them (transformers 4 and 5 alike), each
expert of a sparse layer is three `nn.Linear` weights laid out [out, in],
`experts.{j}.{gate,up,down}.weight` (Mixtral names them w1, w3, w2), and the
router is `gate.weight` [E, D]. In memory transformers 5 fuses each layer's
experts into `experts.gate_up_proj` [E, 2F, D] (the gate's F rows first) and
`experts.down_proj` [E, D, F], and converts when it loads or saves; a
checkpoint written from such a state dict by other tools has those names, so
import reads both layouts. Export writes the per-expert one, which every
transformers version loads.

Ours: router [D, E] (float32 softmax router), wg (gate) and wi (up) [E, D, F],
wo [E, F, D]; every mapping is a transpose or a split.
"""

import re
from collections.abc import Callable, Iterator

import numpy as np

from llm.convert import llama
from llm.model import ModelConfig

_FUSED = ('experts.gate_up_proj', 'experts.down_proj')


def is_fused(present) -> bool:
  """Whether a checkpoint's names use transformers 5's fused expert tensors."""
  return any(name.endswith(_FUSED[0]) for name in present)


def names(module: str, num_experts: int, projs: dict[str, str], fused: bool) -> list[str]:
  """A sparse layer's tensors, relative to `model.layers.{i}.` (`module`: their parent)."""
  out = [f'{module}.gate.weight']
  if fused:
    return out + [f'{module}.{n}' for n in _FUSED]
  return out + [f'{module}.experts.{j}.{p}.weight' for j in range(num_experts) for p in projs]


def to_ours(
  name: str, rest: str, w: np.ndarray, cfg: ModelConfig, projs: dict[str, str], layer: int
) -> list[tuple[tuple, int, np.ndarray]]:
  """One sparse-layer tensor (`rest`: its name after the module) -> [(our path, layer, array)].

  projs: Hugging Face's per-expert projection names -> ours (wg, wi, wo).
  """
  if rest == 'gate.weight':
    return [(('moe', 'router'), layer, w.T)]
  if rest == _FUSED[0]:
    F = cfg.expert_d_ff
    if w.ndim != 3 or w.shape[1] != 2 * F:
      raise ValueError(
        f'Tensor {name} has shape {w.shape}, which does not fit [experts, 2 x {F}, d_model] '
        'of the model its config.json describes.'
      )
    gate_EDF, up_EDF = w[:, :F].transpose(0, 2, 1), w[:, F:].transpose(0, 2, 1)
    return [(('moe', 'wg'), layer, gate_EDF), (('moe', 'wi'), layer, up_EDF)]
  if rest == _FUSED[1]:
    return [(('moe', 'wo'), layer, np.swapaxes(w, 1, 2))]
  _, j, proj, _ = rest.split('.')  # experts.{j}.{proj}.weight
  return [(('moe', projs[proj], int(j)), layer, w.T)]


def to_hf(
  prefix: str,
  get: Callable[[tuple, int | None], np.ndarray],
  layer: int,
  num_experts: int,
  projs: dict[str, str],
) -> Iterator[tuple[str, np.ndarray]]:
  """A sparse layer's router and per-expert weights, named `prefix` + the on-disk names."""
  yield prefix + 'gate.weight', get(('moe', 'router'), layer).T
  for j in range(num_experts):
    for proj, ours in projs.items():
      yield f'{prefix}experts.{j}.{proj}.weight', get(('moe', ours, j), layer).T


def layer_to_ours(
  sparse: re.Pattern, name: str, w: np.ndarray, cfg: ModelConfig, projs: dict[str, str]
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One tensor of a Llama-based MoE family -> [(our path, layer or None, array)].

  sparse: matches a sparse layer's tensor names, capturing the layer and the
  name after the experts' module; any other tensor is Llama's.
  """
  match = sparse.match(name)
  if match:
    i, rest = match.groups()
    return to_ours(name, rest, w, cfg, projs, int(i))
  return llama.to_ours(name, w, cfg)
