r"""GPT-2 124M on C4 (English), with a 50,304-piece BPE tokenizer trained on C4.

  python -m llm.data.prepare --config=experiments/c4_gpt2_124m.py  # Tokenizer; checks the data.
  python -m llm.train --config=experiments/c4_gpt2_124m.py --workdir=gs://BUCKET/runs/gpt2

C4 must already be prepared as array_record in data.data_dir (building it
needs TensorFlow and a few hundred GB of downloads, which the error message
explains; `tfds build c4/en --data_dir=... --file_format=array_record`).
Shape and vocabulary size (50,304: GPT-2's 50,257 padded to a multiple of 128)
match GPT-2 small; the tokenizer is learned from 500k lines of the train
split. 10B tokens (19,073 steps of 512 x 1,024 tokens) with the GPT-3 paper's
small-model optimizer settings, as in the llm.c / nanoGPT reproductions.
"""

from experiments import presets
from llm import config as config_lib


def c4_data(c, vocab_size: int) -> None:
  """C4 prepared in a bucket, with a BPE tokenizer of `vocab_size` trained on it."""
  c.data.dataset = 'c4/en'
  c.data.data_dir = 'gs://YOUR_BUCKET/tensorflow_datasets'
  c.data.tokenizer = ''
  c.data.spm_vocab_size = vocab_size
  c.data.spm_max_lines = 500_000
  c.data.read_threads = 16
  c.data.worker_count = 4


def get_config(arg=None):
  del arg
  c = config_lib.get_config()
  c4_data(c, vocab_size=50304)
  c.model = config_lib.model_config(
    **dict(presets.get('gpt2_124m'), vocab_size=50304, dtype='bfloat16')
  )
  c.seq_len = 1024
  c.batch_size = 512
  c.total_steps = 19073
  c.log_every = 50
  c.eval_every = 1000
  c.eval_steps = 40  # 21M tokens.
  c.checkpoint_every = 1000
  c.optim.learning_rate = 6e-4
  c.optim.warmup_steps = 715
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  return c
