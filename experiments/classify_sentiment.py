r"""Sentence classification on a tiny sentiment task, with a decoder or an encoder, on CPU.

  python -m llm.train --config=experiments/classify_sentiment.py:decoder --workdir=workdirs/cls_dec
  python -m llm.train --config=experiments/classify_sentiment.py:encoder --workdir=workdirs/cls_enc

experiments/data/sentiment_*.jsonl hold templated one-line reviews
({"text": "what a lovely concert!", "label": "positive"}); the words that
decide the label appear in both splits, the sentences do not. The decoder
(GPT-2-style) reads its class from the last token, the encoder (BERT-style:
bidirectional, post-LayerNorm, token types, a tanh pooler) from the first.
eval.jsonl rows carry accuracy and macro_f1 over the whole eval file.

Both train byte-level models from scratch so that they run anywhere. To
fine-tune a pretrained model, set init_from to its training workdir, params
export or Hugging Face directory (e.g. an imported BERT) and give its model
shape and tokenizer; its LM or MLM head is dropped and the classifier head
starts fresh:

  python -m llm.train --config=experiments/classify_sentiment.py:decoder \
      --workdir=workdirs/cls_from_sft --config.init_from=workdirs/sft_echo
"""

import os

from experiments import sft_echo
from llm import config as config_lib

DATA = os.path.join(os.path.dirname(__file__), 'data')
LABELS = 'negative,positive'


def get_config(arg='decoder'):
  c = config_lib.get_config()
  c.data.dataset = 'classification'
  c.data.train_files = os.path.join(DATA, 'sentiment_train.jsonl')
  c.data.eval_files = os.path.join(DATA, 'sentiment_eval.jsonl')
  c.data.labels = LABELS
  c.data.tokenizer = 'byte'
  c.data.truncation = 'right'  # A long text keeps its start.
  c.seq_len = 64
  c.batch_size = 32
  c.total_steps = 300
  c.log_every = 25
  c.eval_every = 100
  c.eval_steps = 0  # The whole eval file.
  c.checkpoint_every = 100
  num_labels = len(LABELS.split(','))
  if arg in (None, 'decoder'):
    c.model = config_lib.model_config(
      **{**sft_echo.tiny_gpt(), 'head': 'classifier', 'num_labels': num_labels}
    )
  elif arg == 'encoder':
    c.model = config_lib.model_config(
      **{
        **sft_echo.tiny_gpt(),
        'causal': False,
        'norm_position': 'post',
        'mlp': 'gelu_exact',
        'type_vocab_size': 2,
        'head': 'classifier',
        'num_labels': num_labels,
      }
    )
  else:
    raise ValueError(f"ARG={arg!r} is not 'decoder' or 'encoder'.")
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.1
  # c.init_from = 'workdirs/sft_echo'  # A pretrained workdir, export or HF directory.
  return c
