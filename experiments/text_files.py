r"""A small GPT on your own text files: .txt, .txt.gz, .jsonl, .jsonl.gz.

  python -m llm.train --config=experiments/text_files.py:'corpus/**/*.txt' --workdir=/tmp/mine
  python -m llm.data.prepare --config=experiments/text_files.py:'notes/*.jsonl' \
      --config.data.text_field=body   # Prepare first to see what was read and skipped.

ARG (or --config.data.text_files) is a comma-separated list of globs. Files
are cut at blank lines into passages of ~2,000 characters (a whole short file
is one); set --config.data.text_unit=file or =line for one document per file
or per line. 5% of documents, chosen by a hash of file name and position, are
held out for validation. A 4,096-piece BPE tokenizer is trained on the train
split; for a corpus too small for that, the error names the largest size it
supports (set data.spm_vocab_size and model.vocab_size to it).
"""

from experiments import shakespeare
from llm import config as config_lib


def get_config(arg=None):
  c = config_lib.get_config()
  c.data.dataset = 'text_files'
  c.data.text_files = arg or ''
  c.data.text_unit = 'passage'
  c.data.tokenizer = ''
  c.data.spm_vocab_size = 4096
  c.seq_len = 256
  c.batch_size = 16
  c.total_steps = 2000
  c.log_every = 25
  c.eval_every = 250
  c.eval_steps = 20
  c.checkpoint_every = 250
  c.model = shakespeare.small_gpt(vocab_size=4096)
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  return c
