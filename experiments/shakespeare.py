"""A small GPT on Shakespeare's complete works: real text, trained on a laptop CPU in minutes.

  python -m llm.train --config=experiments/shakespeare.py --workdir=/tmp/shakespeare

The corpus (5 MB, ~1.8M tokens) and a 2,048-piece BPE tokenizer are prepared
into data/ on first use (or by `python -m llm.data.prepare
--config=experiments/shakespeare.py`, which also prints the validation
split's unigram entropy: the loss of a model that ignores context).
GPT-2-style blocks (LayerNorm, GELU, learned positions, biases, tied
embeddings), 4 layers of width 256: ~3.7M parameters.
"""

from llm import config as config_lib


def small_gpt(vocab_size: int):
  """GPT-2-style blocks, 4 layers of width 256: a model a laptop CPU trains in minutes."""
  return config_lib.model_config(
    norm='layernorm',
    mlp='gelu',
    position='learned',
    use_bias=True,
    tie_embeddings=True,
    vocab_size=vocab_size,
    num_layers=4,
    d_model=256,
    num_heads=4,
    num_kv_heads=4,
    d_ff=1024,
    max_seq_len=256,
  )


def get_config(arg=None):
  del arg
  c = config_lib.get_config()
  c.data.dataset = 'shakespeare'
  c.data.tokenizer = ''  # The sentencepiece model trained on the corpus.
  c.data.spm_vocab_size = 2048
  c.data.spm_model_type = 'bpe'
  c.seq_len = 256
  c.batch_size = 16
  c.total_steps = 400  # 1.6M tokens: most of one pass over the corpus.
  c.log_every = 25
  c.eval_every = 150
  c.eval_steps = 0  # The whole validation split (~100k tokens).
  c.checkpoint_every = 150
  c.model = small_gpt(vocab_size=2048)
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 50
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  return c
