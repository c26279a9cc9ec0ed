"""Where a run continues: the checks between a workdir's checkpoints and a config.

The rules (docs/workdir.md): a run continues from the newest complete
checkpoint, or from `resume_step` when the user asks (the newer ones are then
set aside, never deleted); it refuses a model whose shapes differ from the
checkpoint's, and data (dataset, files, tokenizer) other than the
checkpoint's unless `resume_on_new_data`; a workdir already at `total_steps`
has nothing to do. `config.json` is written only once every check has passed,
by a run that is about to train.
"""

import os

import jax
from etils import epath

from llm.data import streams
from llm.io import checkpoint


def data_applies(saved: dict, identity: dict, config, path) -> bool:
  """Whether the saved stream position applies: the checkpoint's data is this config's."""
  if 'source' not in saved:  # Saved before checkpoints named their data.
    return True
  change = streams.describe_change(saved['source'], identity)
  if not change:
    return True
  if not config.resume_on_new_data:
    raise ValueError(
      f'The checkpoint {path} was trained on other data: {change.rstrip(".")}; set '
      '--config.resume_on_new_data=True to continue on this data, or give a new --workdir.'
    )
  print(f'Resuming on new data ({change.rstrip(".")}): reading it from its start.', flush=True)
  return False


def open_run(trainer, workdir: str):
  """The checkpointer, state and data stream of the run in `workdir`; None when it is done.

  Nothing is written until every check has passed: the config's shapes and
  data against the checkpoint's, the checkpoint's own integrity.
  """
  config = trainer.config
  has_checkpoints = (epath.Path(workdir) / 'checkpoints').exists()
  ckpt = checkpointer(config, workdir) if has_checkpoints else None
  step = resume_step(ckpt, config)
  if step is not None and step >= config.total_steps:
    print(
      f'{workdir} is already at step {step} ≥ total_steps={config.total_steps}; nothing to do.',
      flush=True,
    )
    ckpt.close()
    return None
  state, train_iter = trainer.restore_or_init(ckpt, step)
  if config.resume_step and step is not None:
    ckpt.close()
    moved = checkpoint.set_aside_after(workdir, step)
    if moved:
      print(f'Set aside checkpoints {moved} in {workdir}/checkpoints-set-aside.', flush=True)
    ckpt = None
  ckpt = ckpt or checkpointer(config, workdir)
  skipped = streams.skipped_report(config.data)
  if skipped:
    print(skipped, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  # After the stream is built: it trains the dataset's tokenizer if it was missing.
  checkpoint.save_tokenizer(workdir, streams.tokenizer_of(config.data))
  return ckpt, state, train_iter


def checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(
    workdir,
    keep=config.keep_checkpoints,
    keep_period=config.keep_period,
    async_save=config.async_checkpointing,
  )


def resume_step(ckpt: checkpoint.Checkpointer | None, config) -> int | None:
  """The step to resume from: the newest complete checkpoint, or `resume_step` if set.

  A `resume_step` left on the command line after its rollback is not applied
  again: once the newest checkpoint was saved by a run resumed from that step,
  the run continues from the newest.
  """
  steps = ckpt.all_steps() if ckpt is not None else []
  if not config.resume_step:
    return steps[-1] if steps else None
  if config.resume_step not in steps:
    raise ValueError(
      f'resume_step={config.resume_step} is not a complete checkpoint of this workdir; '
      f'its complete steps are {steps or "none"}.'
    )
  if steps[-1] > config.resume_step and _saved_resume_step(ckpt, steps[-1]) == config.resume_step:
    print(
      f'Step {steps[-1]} was trained after resuming from step {config.resume_step}: '
      'continuing from it.',
      flush=True,
    )
    return steps[-1]
  return config.resume_step


def _saved_resume_step(ckpt: checkpoint.Checkpointer, step: int) -> int:
  try:
    return int(ckpt.saved_config(step).get('resume_step', 0))
  except ValueError:  # An unreadable checkpoint is what a rollback is for.
    return 0


def check_init_from(config) -> None:
  """Stops at once when `init_from` names nothing, rather than after initialisation."""
  if config.init_from and not epath.Path(config.init_from).exists():
    raise FileNotFoundError(
      f'init_from={config.init_from!r} does not exist; give a training workdir, a params '
      'export or a Hugging Face model directory.'
    )
