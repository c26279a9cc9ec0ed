r"""Prepares an experiment's dataset and tokenizer: `python -m llm.data.prepare --config=...`.

  python -m llm.data.prepare --config=experiments/shakespeare.py
  python -m llm.data.prepare --config=experiments/text_files.py \
      --config.data.text_files='corpus/**/*.txt' --config.data.text_unit=line

Writes the dataset as array_record into `data.data_dir` and, when
`data.tokenizer` is empty, trains the sentencepiece model stored with it;
then prints what was prepared: documents per split, records skipped and why,
and the validation split's size in tokens and unigram entropy (the loss of a
model that ignores context, the bar a trained model must clear). Training
does all this on first use anyway; running it first shows the summary and
lets several hosts start on a prepared dataset.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from llm import cli
from llm.data import sources, stats, tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite', False, 'Prepare the dataset and train the tokenizer again even if present.'
)


def run(data_config, *, overwrite: bool = False) -> dict:
  """Prepares the dataset and tokenizer of `data_config`; returns the summary it prints."""
  if not data_config.tokenizer:
    tokenizer.check_trainable(data_config)  # Not after a long preparation.
  b = sources.prepare(data_config, overwrite=overwrite)
  report = {'dataset': data_config.dataset, **sources.summary(b)}
  if not data_config.tokenizer:
    report['tokenizer'] = str(tokenizer.train(data_config, overwrite=overwrite))
  else:
    report['tokenizer'] = data_config.tokenizer
  tok = tokenizer.load(data_config)
  report['vocab_size'] = tok.vocab_size
  report['validation'] = {
    **report.get('validation', {}),
    **stats.unigram_entropy(data_config, tok, data_config.eval_split),
  }
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=experiments/NAME.py is required.')
  logging.set_verbosity(logging.INFO)
  report = run(config.data, overwrite=_OVERWRITE.value)
  print(json.dumps(report, indent=2, default=str), flush=True)


if __name__ == '__main__':
  cli.run(main)  # Bad input is explained in one sentence; a traceback would only bury it.
