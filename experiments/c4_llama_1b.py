r"""A Llama 3.2 1B-shaped model on C4 (English), with a 32,768-piece BPE tokenizer trained on C4.

  python -m llm.data.prepare --config=experiments/c4_llama_1b.py  # Tokenizer; checks the data.
  python -m llm.train --config=experiments/c4_llama_1b.py --workdir=gs://BUCKET/runs/llama1b

C4 must already be prepared as array_record in data.data_dir (see
experiments/c4_gpt2_124m.py). The Llama 3.2 1B shape (16 layers, width 2,048,
grouped-query attention, SwiGLU, RoPE, tied embeddings) with our own
32,768-piece vocabulary instead of Llama 3's 128,256, which would spend a
fifth of the parameters on embeddings. 20B tokens (20,000 steps of
512 x 2,048 tokens), about the compute-optimal amount for this size
(Hoffmann et al. 2022). Parameters and optimizer state are sharded over all
chips (FSDP); activations are rematerialised except the matmuls.
"""

from experiments import c4_gpt2_124m, presets
from llm import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.get_config()
  c4_gpt2_124m.c4_data(c, vocab_size=32768)
  c.model = config_lib.model_config(
    **dict(
      presets.get('llama3_1b'),
      vocab_size=32768,
      max_seq_len=2048,
      dtype='bfloat16',
      remat='dots_saveable',
    )
  )
  c.seq_len = 2048
  c.batch_size = 512
  c.total_steps = 20000
  c.log_every = 50
  c.eval_every = 1000
  c.eval_steps = 20  # 21M tokens.
  c.checkpoint_every = 1000
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
