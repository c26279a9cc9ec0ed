"""Fine-tuning: starting a run from pretrained params, and its data.

`config.init_from` names where the params come from:
  a training workdir    its newest complete checkpoint, or `init_from_step`;
                        only the params are read, never the optimizer state;
  a params export       from `python -m llm.checkpoint export` (model_config.json);
  a Hugging Face model  a directory with config.json and safetensors, imported
                        with `llm.convert.hf.load`.

The trainer calls `init_params` only when its own workdir has no checkpoint:
a preempted fine-tune resumes its own checkpoints, not the base model. The
fresh state is initialised first (optimizer moments zero, step 0); then each
of its params that the pretrained tree also has is replaced, restored
directly onto the trainer's shardings (a checkpoint or export reads only
those params). Params only this model has (a classifier head) keep their
fresh initialisation; pretrained params it lacks (the LM unembedding under
a classifier) are dropped, and both lists are printed. A param present in
both with different shapes stops the run with its name.
"""

import json
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from llm import checkpoint
from llm import model as model_lib
from llm.model import ModelConfig

DATASETS = ('sft', 'classification')
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


# ----------------------------------------------------------------------------
# Data.


def make_iterator(config, split: str, *, model_cfg: ModelConfig, num_epochs=None):
  """This host's batches of a fine-tuning dataset, after checking the model can learn them."""
  from llm.data import classification, sft  # Late, as train.py imports the pipeline: grain.

  d = config.data
  if d.get('objective', 'lm') != 'lm':
    raise ValueError(
      f'data.objective={d.objective!r} applies to pretraining corpora; data.dataset='
      f"{d.dataset!r} has its own targets: leave data.objective='lm'."
    )
  common = dict(
    split=split,
    batch_size=config.batch_size,
    seq_len=config.seq_len,
    seed=config.seed,
    shuffle=split == 'train',
    num_epochs=num_epochs,
    vocab_size=model_cfg.vocab_size,
  )
  if d.dataset == 'sft':
    if model_cfg.head != 'lm' or not model_cfg.causal:
      raise ValueError(
        "data.dataset='sft' trains next-token prediction: it needs model.head='lm' and "
        f'model.causal=True, not head={model_cfg.head!r}, causal={model_cfg.causal}.'
      )
    return sft.make_iterator(d, **common)
  if model_cfg.head != 'classifier':
    names = classification.label_names(d)
    raise ValueError(
      f"data.dataset='classification' needs model.head='classifier' (not {model_cfg.head!r}) "
      f'and model.num_labels={len(names)}, the number of data.labels.'
    )
  return classification.make_iterator(
    d,
    **common,
    num_labels=model_cfg.num_labels,
    causal=model_cfg.causal,
    token_types=model_cfg.type_vocab_size > 0,
  )


# ----------------------------------------------------------------------------
# Params from a pretrained model.


def init_params(params, path: str, *, step: int, model_cfg: ModelConfig, shardings):
  """`params` (freshly initialised) with every param of `path` this model also has.

  Args:
    params: this model's params, placed with `shardings` (a matching tree).
    path: a training workdir, a params export or a Hugging Face model directory.
    step: the workdir's checkpoint to read; 0: the newest.
    model_cfg: this model's config.
  """
  root = epath.Path(path)
  ours = traverse_util.flatten_dict(params, sep='/')
  places = traverse_util.flatten_dict(shardings, sep='/')
  if (root / 'checkpoints').exists():
    ckpt = checkpoint.Checkpointer(path, async_save=False)
    try:
      step = step or ckpt.latest_step()
      if step is None or not (ckpt.directory / str(step)).exists():
        raise ValueError(
          f'init_from={path!r} has no complete checkpoint '
          f'{"" if step is None else f"at step {step} "}under {ckpt.directory}.'
        )
      src_cfg = ModelConfig.from_dict(ckpt.saved_config(step)['model'])
      src = _shapes(nn.unbox(model_lib.abstract_params(src_cfg)))
      shared, new, dropped = _plan(ours, src, path)
      target, target_shardings = _targets(ours, places, shared)
      loaded = ckpt.restore_params(step, target, target_shardings)
    finally:
      ckpt.close()
    what = f'{path} (step {step})'
  elif step:
    raise ValueError(
      f'init_from_step={step} needs a training workdir, but {path} has no checkpoints/ '
      '(an export or a Hugging Face directory holds one set of params); set it to 0.'
    )
  elif (root / 'model_config.json').exists():
    src_cfg = ModelConfig.from_dict(json.loads((root / 'model_config.json').read_text()))
    with ocp.StandardCheckpointer() as reader:
      meta = reader.metadata(_params_dir(path)).item_metadata.tree
    src = _shapes(meta)
    shared, new, dropped = _plan(ours, src, path)
    target, target_shardings = _targets(ours, places, shared)
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, target_shardings
    )
    with ocp.PyTreeCheckpointer() as reader:
      loaded = reader.restore(
        _params_dir(path),
        args=ocp.args.PyTreeRestore(
          item=abstract,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True,
        ),
      )
    what = path
  elif (root / 'config.json').exists():
    from llm.convert import hf

    src_cfg, hf_params = hf.load(
      path, scan_layers=model_cfg.scan_layers, param_dtype=model_cfg.param_dtype
    )
    src = _shapes(hf_params)
    shared, new, dropped = _plan(ours, src, path)
    flat = traverse_util.flatten_dict(hf_params, sep='/')
    loaded = {k: _place(flat[k], places[k]) for k in shared}
    loaded = traverse_util.unflatten_dict(loaded, sep='/')
    what = f'{path} (Hugging Face)'
  else:
    raise ValueError(
      f'init_from={path!r} is neither a training workdir (checkpoints/), a params export '
      '(model_config.json) nor a Hugging Face model directory (config.json).'
    )
  loaded = traverse_util.flatten_dict(loaded, sep='/')
  merged = {k: loaded[k].astype(v.dtype) if k in loaded else v for k, v in ours.items()}
  _report(what, src_cfg, model_cfg, shared, new, dropped)
  return traverse_util.unflatten_dict(merged, sep='/')


def _params_dir(path: str) -> epath.Path:
  """An export's params; orbax wants absolute local paths (gs:// ones are left as they are)."""
  return epath.Path(path if '://' in path else os.path.abspath(path)) / 'params'


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


def _targets(ours: dict, places: dict, shared: list) -> tuple[dict, dict]:
  """Restore targets for the shared params: this model's shapes, dtypes and shardings."""
  target = {k: jax.ShapeDtypeStruct(ours[k].shape, ours[k].dtype) for k in shared}
  target_shardings = {k: places[k] for k in shared}
  return (
    traverse_util.unflatten_dict(target, sep='/'),
    traverse_util.unflatten_dict(target_shardings, sep='/'),
  )


def _place(host_array, sharding):
  """A host numpy array -> a global array; each host fills only its own shards."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


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
