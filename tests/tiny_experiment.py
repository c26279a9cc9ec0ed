"""A one-layer model on the synthetic stream: the experiment that command-line tests run.

  python -m llm.train --config=tests/tiny_experiment.py[:TOTAL_STEPS] --workdir=DIR

Seconds per run on a CPU, checkpoints every 2 steps (default 4 steps).
"""

from llm import config as config_lib


def get_config(arg=None):
  c = config_lib.get_config()
  c.data.dataset = 'synthetic'
  c.total_steps = int(arg or 4)
  c.batch_size = 8
  c.seq_len = 16
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 2
  c.optim.warmup_steps = 0
  c.model = config_lib.model_config(
    vocab_size=64, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, max_seq_len=32
  )
  return c
