"""A small BERT pretrained with masked language modelling on Shakespeare: a laptop CPU, minutes.

  python -m llm.train --config=experiments/bert_shakespeare.py --workdir=/tmp/bert_shakespeare

The corpus and its 2,048-piece BPE tokenizer are the ones of
experiments/shakespeare.py (prepared into data/ on first use); the model has
one more id, 2,048, for [MASK] (llm/data/mlm.py). BERT's layout (encoder,
post-LayerNorm, learned positions, exact GELU, masked-LM head with the tied
decoder) at 4 layers of width 256: ~3.8M parameters. Documents are packed
into rows of 128 tokens, each [bos] text [eos] with bos and eos in the roles
of [CLS] and [SEP]; 15% of the text tokens are chosen, 80/10/10 masked,
randomised or kept. Evaluation reports the loss and accuracy on the masked
tokens of the whole validation split (the same masks every time); the loss
to beat is the unigram entropy of the text tokens, which a model ignoring the
context reaches (`python -m llm.data.prepare --config=experiments/shakespeare.py`
prints it, counting eos as well).
"""

from experiments import presets
from llm import config as config_lib

SEQ_LEN = 128


def small_bert(vocab_size: int, max_seq_len: int = SEQ_LEN):
  """BERT base's options at 4 layers of width 256."""
  return config_lib.model_config(
    **dict(
      presets.BERT_BASE,
      vocab_size=vocab_size,
      num_layers=4,
      d_model=256,
      num_heads=4,
      num_kv_heads=4,
      d_ff=1024,
      max_seq_len=max_seq_len,
    )
  )


def get_config(arg=None):
  del arg
  c = config_lib.get_config()
  c.data.dataset = 'shakespeare'
  c.data.tokenizer = ''  # The sentencepiece model trained on the corpus.
  c.data.spm_vocab_size = 2048
  c.data.spm_model_type = 'bpe'
  c.data.objective = 'mlm'
  c.seq_len = SEQ_LEN
  c.batch_size = 32
  c.total_steps = 400  # 1.6M tokens: most of one pass over the corpus.
  c.log_every = 25
  c.eval_every = 200
  c.eval_steps = 0  # The whole validation split (~15k masked tokens).
  c.checkpoint_every = 200
  c.model = small_bert(vocab_size=2048 + 1)  # + [MASK].
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 40
  c.optim.schedule = 'linear'
  c.optim.min_lr_ratio = 0.0
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.98
  return c
