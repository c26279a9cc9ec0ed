r"""BERT-base or BERT-large pretrained with masked language modelling on C4 (English).

  python -m llm.data.prepare --config=experiments/c4_bert.py  # Tokenizer; checks the data.
  python -m llm.train --config=experiments/c4_bert.py:base --workdir=gs://BUCKET/runs/bert_base
  python -m llm.train --config=experiments/c4_bert.py:large --workdir=gs://BUCKET/runs/bert_large

ARG: 'base' (default, 110M parameters) or 'large' (335M). C4 must already be
prepared as array_record in data.data_dir (see experiments/c4_gpt2_124m.py).
The shapes are BERT's (experiments/presets.py); the vocabulary is a 30,521-piece
BPE model trained on C4 plus the [MASK] id, so the model has BERT's 30,522 rows
(and its exact parameter count) without BERT's WordPiece files. The optimizer
and budget follow the BERT paper: 1M steps of 256 sequences, Adam with
b2=0.999, peak learning rate 1e-4 after 10k warmup steps then linear decay,
weight decay 0.01, 15% of tokens chosen (80/10/10). Unlike the paper: every
step uses 512-token rows (the paper ran 90% of steps at 128), documents are
packed with segment ids instead of sentence pairs, there is no next-sentence
prediction (RoBERTa found it unhelpful), and no dropout.
"""

from experiments import c4_gpt2_124m, presets
from llm import config as config_lib

SIZES = {'base': 'bert_base', 'large': 'bert_large'}


def get_config(arg=None):
  size = arg or 'base'
  if size not in SIZES:
    raise ValueError(f'experiments/c4_bert.py:{size} is not one of {", ".join(SIZES)}.')
  c = config_lib.get_config()
  c4_gpt2_124m.c4_data(c, vocab_size=30521)
  c.data.objective = 'mlm'
  c.model = config_lib.model_config(**dict(presets.get(SIZES[size]), dtype='bfloat16'))
  c.seq_len = 512
  c.batch_size = 256
  c.total_steps = 1_000_000
  c.log_every = 100
  c.eval_every = 10_000
  c.eval_steps = 40  # 5M tokens, 750k of them masked.
  c.checkpoint_every = 5_000
  c.optim.learning_rate = 1e-4
  c.optim.schedule = 'linear'
  c.optim.warmup_steps = 10_000
  c.optim.min_lr_ratio = 0.0
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  if size == 'large':  # Parameters and optimizer state sharded over all chips.
    c.mesh.data = 1
    c.mesh.fsdp = -1
  return c
