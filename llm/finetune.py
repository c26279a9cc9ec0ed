"""Fine-tuning: starting a run from pretrained params (`config.init_from`).

`init_from` is any model `llm.io.models.open` reads: a training workdir (its
newest complete checkpoint, or `init_from_step`; only the params, never the
optimizer state), a params export, or a Hugging Face model directory.

The trainer calls `init_params` only when its own workdir has no checkpoint:
a preempted fine-tune resumes its own checkpoints, not the base model. The
fresh state is initialised first (optimizer moments zero, step 0); then each
of its params that the pretrained tree also has is replaced, read directly
onto the trainer's shardings (a checkpoint or export reads only those
params). Params only this model has (a classifier head) keep their fresh
initialisation; pretrained params it lacks (the LM unembedding under a
classifier) are dropped, and both lists are printed. A param present in both
with different shapes stops the run with its name.
"""

from flax import traverse_util

from llm.io import models
from llm.model import ModelConfig

# Fields that change what pretrained weights compute without changing their shapes.
_SEMANTIC_FIELDS = (
  'causal',
  'norm',
  'norm_position',
  'norm_eps',
  'mlp',
  'position',
  'rope_theta',
  'rope_scaling',
)


def init_params(params, path: str, *, step: int, model_cfg: ModelConfig, shardings):
  """`params` (freshly initialised) with every param of `path` this model also has.

  Args:
    params: this model's params, placed with `shardings` (a matching tree).
    path: a training workdir, a params export or a Hugging Face model directory.
    step: the workdir's checkpoint to read; 0: the newest.
    model_cfg: this model's config.
  """
  if step and models.kind_of(path) not in ('workdir', None):
    raise ValueError(
      f'init_from_step={step} needs a training workdir, but {path} has no checkpoints/ '
      '(an export or a Hugging Face directory holds one set of params); set it to 0.'
    )
  try:
    source = models.open(
      path, step=step, scan_layers=model_cfg.scan_layers, param_dtype=model_cfg.param_dtype
    )
  except ValueError as e:
    raise ValueError(f'init_from={path!r}: {e}') from None
  ours = traverse_util.flatten_dict(params, sep='/')
  shared, new, dropped = _plan(ours, _shapes(source.shapes), path)
  loaded = traverse_util.flatten_dict(source.read(shardings, names=shared), sep='/')
  merged = {k: loaded[k].astype(v.dtype) if k in loaded else v for k, v in ours.items()}
  _report(source.description, source.model_cfg, model_cfg, shared, new, dropped)
  return traverse_util.unflatten_dict(merged, sep='/')


def _shapes(tree) -> dict:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def _plan(ours: dict, src: dict, path: str) -> tuple[list, list, list]:
  """(shared, new, dropped) param names; stops on a shared name whose shapes differ."""
  src_stacked = any(k.startswith('layers/') for k in src)
  if any(k.startswith('layers/') for k in ours) != src_stacked:
    raise ValueError(
      f'init_from={path!r} stores its layers {"stacked" if src_stacked else "unrolled"}; '
      f"set model.scan_layers={src_stacked}, the pretrained model's layout."
    )
  shared = sorted(set(ours) & set(src))
  for name in shared:
    if tuple(ours[name].shape) != src[name]:
      raise ValueError(
        f'The param {name} has shape {src[name]} in init_from={path!r} but '
        f'{tuple(ours[name].shape)} in this model; make the model config match the pretrained '
        "one's shapes (vocab_size, d_model, num_heads, d_ff, max_seq_len...)."
      )
  if not shared:
    raise ValueError(f"init_from={path!r} has none of this model's params.")
  return shared, sorted(set(ours) - set(src)), sorted(set(src) - set(ours))


def _report(what, src_cfg: ModelConfig, model_cfg: ModelConfig, shared, new, dropped) -> None:
  print(
    f'Initialised {len(shared)} params from {what}; new, freshly initialised: '
    f'{", ".join(new) or "none"}; dropped, not in this model: {", ".join(dropped) or "none"}. '
    'The optimizer starts fresh at step 0.',
    flush=True,
  )
  diffs = [
    f'{f}: {getattr(src_cfg, f)!r} -> {getattr(model_cfg, f)!r}'
    for f in _SEMANTIC_FIELDS
    if getattr(src_cfg, f) != getattr(model_cfg, f)
  ]
  if diffs:
    print(
      f'Note: the pretrained model was trained with other settings ({", ".join(diffs)}); '
      'its params will compute something else here.',
      flush=True,
    )
