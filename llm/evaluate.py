r"""`python -m llm.evaluate`: a split's loss metrics, generation tasks, multiple choice.

  python -m llm.evaluate --workdir=DIR [--split=validation] [--max_batches=0] \
      [--generation=TASK.jsonl ...] [--choice=TASK.jsonl ...]

DIR is a training workdir (its newest checkpoint), a params export or a
Hugging Face model directory (`llm.io.models`). The split is read with the
run's data settings (or --config's), never preparing a dataset or training a
tokenizer; the tasks are scored with the model's own tokenizer. What each
metric means is in `llm/eval/` (`lm`, `generation`, `choice`); where the
results go in `llm/eval/tasks.py`.
"""

import json
import os

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from llm import cli, sharding
from llm.data import streams, tokenizer
from llm.eval import choice, generation, lm, tasks
from llm.generate import Sampling
from llm.io import models

FLAGS = flags.FLAGS


def split_metrics(cfg, params, tok, config: dict, mesh, source) -> dict:
  """The split's metrics (`lm.evaluate_split`) with the run's data settings, the text
  tokenized by the model's own tokenizer (its copy), not one rebuilt from those settings."""
  data = ml_collections.ConfigDict(config['data'])
  copy = os.path.join(source.path, tokenizer.DIRECTORY)
  data.tokenizer = FLAGS.tokenizer or (copy if tokenizer.is_dir(copy) else data.tokenizer)
  return lm.evaluate_split(
    cfg,
    params,
    data,
    split=FLAGS.split,
    batch_size=FLAGS.batch_size or config['batch_size'],
    seq_len=FLAGS.seq_len or config['seq_len'],
    mesh=mesh,
    seed=config.get('seed', 0),
    max_batches=FLAGS.max_batches,
    tokenizer=tok,
    progress=True,
  )


def _data_settings(source) -> dict | None:
  """The data settings to read the split with: --config's, else the run's."""
  if FLAGS.config is not None:
    return json.loads(FLAGS.config.to_json_best_effort())
  if source.config is None and FLAGS['split'].present and FLAGS.split:
    raise ValueError(
      f'{source.path} has no training config to read the data settings from; pass '
      "--config=experiments/NAME.py for them, or --split='' to skip the split."
    )
  if source.config is None and FLAGS.split:
    print(
      f'{source.path} has no data settings: no split metrics '
      '(pass --config=experiments/NAME.py for them).',
      flush=True,
    )
  return source.config


def run() -> tuple[str, dict, dict]:
  """(results directory, summary, per-example rows of each task)."""
  # Bad task files stop the run before any work is done.
  gen_tasks = {
    tasks.task_name(p): tasks.read_jsonl(p, {'prompt': str, 'reference': str})
    for p in FLAGS.generation
  }
  choice_tasks = {
    tasks.task_name(p): tasks.read_jsonl(p, {'context': str, 'choices': list, 'label': int})
    for p in FLAGS.choice
  }
  sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  cli.check_positive('eval_batch_size', 'max_new_tokens')
  mesh = sharding.mesh_from_spec(FLAGS.mesh)
  source = models.open(FLAGS.workdir)
  config = _data_settings(source)
  cfg, params, tok = source.load(mesh, FLAGS.tokenizer)
  summary = {'step': source.step, 'checkpoint': os.path.abspath(FLAGS.workdir)}
  per_example = {}
  if FLAGS.split and config is not None:
    finetune = streams.kind(ml_collections.ConfigDict(config['data'])) in streams.FINETUNE
    key = 'finetune' if finetune else 'lm'
    summary[key] = split_metrics(cfg, params, tok, config, mesh, source)
    print(f'{FLAGS.split}: ' + json.dumps(summary[key]), flush=True)
  for name, examples in gen_tasks.items():
    summary[f'generation/{name}'], per_example[name] = generation.generation_task(
      cfg,
      params,
      tok,
      examples,
      max_new_tokens=FLAGS.max_new_tokens,
      sampling=sampling,
      seed=FLAGS.seed,
      stop=FLAGS.stop or (),
      mesh=mesh,
      batch_size=FLAGS.eval_batch_size,
    )
    print(f'{name}: ' + json.dumps(summary[f'generation/{name}']), flush=True)
  for name, examples in choice_tasks.items():
    summary[f'choice/{name}'], per_example[name] = choice.choice_task(
      cfg, params, tok, examples, mesh=mesh, batch_size=FLAGS.eval_batch_size
    )
    print(f'{name}: ' + json.dumps(summary[f'choice/{name}']), flush=True)
  return FLAGS.output_dir or tasks.results_dir(FLAGS.workdir, source.step), summary, per_example


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax's restore chatter off the output.
  out, summary, per_example = run()
  tasks.write_results(out, summary, per_example)
  print(f'Wrote {os.path.join(out, "summary.json")}.')


if __name__ == '__main__':
  flags.DEFINE_string(
    'workdir', None, 'Training workdir (newest checkpoint), params export or Hugging Face dir.'
  )
  config_flags.DEFINE_config_file('config', None, 'Experiment whose data settings to use.')
  flags.DEFINE_string('split', 'validation', "Split for the loss metrics; '' skips it.")
  flags.DEFINE_integer('batch_size', 0, 'Rows per split batch; 0: the config batch_size.')
  flags.DEFINE_integer('seq_len', 0, 'Tokens per row; 0: the config seq_len.')
  flags.DEFINE_integer('max_batches', 0, 'Split batches; 0: the whole split.')
  flags.DEFINE_multi_string('generation', [], 'JSON lines with prompt and reference.')
  flags.DEFINE_multi_string('choice', [], 'JSON lines with context, choices and label.')
  flags.DEFINE_integer('eval_batch_size', 16, 'Prompts or choices per batch.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Generation tasks: tokens per completion, at most.')
  flags.DEFINE_float('temperature', 0.0, 'Generation tasks: 0 is greedy.')
  flags.DEFINE_integer('top_k', 0, 'Generation tasks: top-k cut; 0: none.')
  flags.DEFINE_float('top_p', 1.0, 'Generation tasks: nucleus mass; 1: none.')
  flags.DEFINE_integer('seed', 0, 'Generation tasks: sampling seed.')
  flags.DEFINE_multi_string('stop', [], 'Generation tasks: a string that ends a completion.')
  flags.DEFINE_string('tokenizer', '', "'byte', a .model file or a tokenizer directory.")
  flags.DEFINE_string('mesh', '', "Mesh sizes, e.g. 'tensor=4'; default: all devices on data.")
  flags.DEFINE_string('output_dir', '', 'Where to write; default DIR/eval/step_<step>.')
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
