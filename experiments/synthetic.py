"""Synthetic token stream: the train loop's smoke test and the throughput experiment.

  python -m llm.train --config=experiments/synthetic.py --workdir=/tmp/synthetic
  python -m llm.train --config=experiments/synthetic.py:gpt2_124m --workdir=... \
      --config.total_steps=20
  python -m llm.train --config=experiments/synthetic.py:moe_small --workdir=/tmp/moe_small

ARG names a preset from experiments/presets.py (default: a ~10M-parameter
Llama-style model that trains on a laptop CPU), or `moe_small`: the default
model with each MLP a mixture of 8 SwiGLU experts of width 768, the top 2 per
token (20M parameters, 5.8M active per token), the dropless path unless
`--config.model.capacity_factor` is set.
"""

from experiments import presets
from llm import config as config_lib

_SMALL = dict(vocab_size=512, num_layers=4, d_model=256, num_heads=8, num_kv_heads=4, d_ff=768)
_MOE_SMALL = dict(_SMALL, num_experts=8, experts_per_token=2, moe_d_ff=768)


def get_config(arg=None):
  c = config_lib.get_config()
  c.data.dataset = 'synthetic'
  c.total_steps = 200
  c.batch_size = 8
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 2
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 20
  if arg == 'moe_small':
    c.model = config_lib.model_config(**_MOE_SMALL)
  elif arg:
    c.model = config_lib.model_config(**presets.get(arg))
  else:
    c.model = config_lib.model_config(**_SMALL)
  return c
