r"""Supervised fine-tuning on a tiny task, on CPU in minutes: shout a line, or echo it reversed.

  python -m llm.train --config=experiments/sft_echo.py --workdir=workdirs/sft_echo
  python -m llm.generate --workdir=workdirs/sft_echo --tokenizer=byte \
      --prompt="$(printf '<|user|>\nShout: to be or not\n<|assistant|>\n')"

experiments/data/echo_*.jsonl mix the two formats of `llm/data/sft.py`:
{"prompt": "Shout: to be", "response": "TO BE!"} and chats whose system turn
asks for the user's words in reverse order. The loss is only on the
responses (eval.jsonl: loss per response token). This config trains a
byte-level model from scratch so that it runs anywhere; to fine-tune a
pretrained one instead, point init_from at its workdir, params export or
Hugging Face directory and give its tokenizer and model shape, e.g. the
Shakespeare GPT of experiments/shakespeare.py (ARG 'shakespeare'):

  python -m llm.train --config=experiments/sft_echo.py:shakespeare \
      --workdir=workdirs/sft_shakespeare --config.init_from=workdirs/shakespeare
"""

import os

from experiments import shakespeare
from llm import config as config_lib

DATA = os.path.join(os.path.dirname(__file__), 'data')


def tiny_gpt(vocab_size: int = 259):
  """A 2-layer GPT-2-style model over bytes: ~0.4M parameters."""
  return config_lib.model_config(
    **{
      **shakespeare.small_gpt(vocab_size),
      'num_layers': 2,
      'd_model': 128,
      'd_ff': 512,
      'max_seq_len': 192,
    }
  )


def get_config(arg=None):
  c = config_lib.get_config()
  c.data.dataset = 'sft'
  c.data.train_files = os.path.join(DATA, 'echo_train.jsonl')
  c.data.eval_files = os.path.join(DATA, 'echo_eval.jsonl')
  c.data.tokenizer = 'byte'
  c.data.truncation = 'left'  # Overlong examples lose prompt tokens, never the response.
  c.seq_len = 192
  c.batch_size = 16
  c.total_steps = 300
  c.log_every = 50
  c.eval_every = 150
  c.eval_steps = 0  # The whole eval file.
  c.checkpoint_every = 150
  c.model = tiny_gpt()
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  # c.init_from = 'workdirs/shakespeare'  # A pretrained workdir, export or HF directory.
  if arg == 'shakespeare':
    # Start from experiments/shakespeare.py's model: its shape and sentencepiece model.
    from llm.data import sources

    pretrain = shakespeare.get_config()
    c.model = pretrain.model
    c.data.tokenizer = str(sources.tokenizer_path(pretrain.data))
    c.optim.learning_rate = 3e-4
    c.total_steps = 300
  elif arg:
    raise ValueError(f"ARG={arg!r} is not '' or 'shakespeare'.")
  return c
