"""`python -m llm.generate`: sample from a workdir, a params export or a Hugging Face directory."""

import json
import sys

from absl import flags

from llm import cli, sharding
from llm.generate.sampling import Sampling
from llm.generate.text import generate_text, read_prompts
from llm.io import models


def _check_flags(FLAGS) -> None:
  """Every flag's value, checked before the weights are read."""
  if FLAGS['prompt'].present and not FLAGS.prompt:
    raise ValueError("--prompt='' is empty; give the text to continue (or --prompts_file).")
  if bool(FLAGS.prompt) == bool(FLAGS.prompts_file):
    raise ValueError('Give exactly one of --prompt and --prompts_file.')
  cli.check_positive('max_new_tokens', 'batch_size')


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Keep orbax's restore chatter off the output.
  from absl import flags

  FLAGS = flags.FLAGS
  _check_flags(FLAGS)
  sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
  prompts = [FLAGS.prompt] if FLAGS.prompt else read_prompts(FLAGS.prompts_file)
  mesh = sharding.mesh_from_spec(FLAGS.mesh)
  cfg, params, tok = models.load(FLAGS.workdir, mesh=mesh, tokenizer=FLAGS.tokenizer)
  single = len(prompts) == 1

  def on_text(i, piece):
    sys.stdout.write(piece)
    sys.stdout.flush()

  if single:
    sys.stdout.write(prompts[0])
  gens = generate_text(
    cfg,
    params,
    tok,
    prompts,
    max_new_tokens=FLAGS.max_new_tokens,
    sampling=sampling,
    seed=FLAGS.seed,
    stop=FLAGS.stop or (),
    mesh=mesh,
    batch_size=FLAGS.batch_size,
    on_text=on_text if single else None,
  )
  if single:
    sys.stdout.write(f'\n[{gens[0].finish_reason}, {len(gens[0].tokens)} tokens]\n')
  else:
    for i, (p, g) in enumerate(zip(prompts, gens, strict=True)):
      print(f'=== {i} [{g.finish_reason}, {len(g.tokens)} tokens]\n{p}{g.text}')
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      for p, g in zip(prompts, gens, strict=True):
        row = dict(prompt=p, completion=g.text, finish_reason=g.finish_reason, tokens=g.tokens)
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  flags.DEFINE_string(
    'workdir', None, 'Training workdir (newest checkpoint), params export or Hugging Face dir.'
  )
  flags.DEFINE_string('prompt', '', 'One prompt; its completion is printed as it is produced.')
  flags.DEFINE_string('prompts_file', '', 'JSON lines with a "prompt" field each.')
  flags.DEFINE_string('output', '', 'Optional JSON-lines file for the completions.')
  flags.DEFINE_integer('max_new_tokens', 256, 'Tokens to generate per prompt, at most.')
  flags.DEFINE_float('temperature', 0.8, '0: greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k best tokens only; 0: all.')
  flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass; 1: off.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_multi_string('stop', [], 'A string that ends a completion (repeatable).')
  flags.DEFINE_integer('batch_size', 16, 'Prompts decoded together.')
  flags.DEFINE_string('tokenizer', '', "'byte', a .model file or a Hugging Face tokenizer dir.")
  flags.DEFINE_string('mesh', '', "Mesh sizes, e.g. 'tensor=4' or 'data=2,tensor=4'.")
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
