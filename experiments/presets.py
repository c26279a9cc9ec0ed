"""Published model shapes, as `ModelConfig` field overrides.

Each entry reproduces the parameter count of the paper or release it names
(checked in tests for GPT-2 124M, a Llama-2-7B shape and BERT base and large).
Experiments start from one of these and override what they need, e.g.
`vocab_size` for their tokenizer.
"""

_GPT2 = dict(
  norm='layernorm',
  mlp='gelu',
  position='learned',
  use_bias=True,
  tie_embeddings=True,
  vocab_size=50257,
  max_seq_len=1024,
  norm_eps=1e-5,
)
_LLAMA = dict(
  norm='rmsnorm',
  mlp='swiglu',
  position='rope',
  use_bias=False,
  tie_embeddings=False,
  norm_eps=1e-5,
)

# GPT-2 (Radford et al. 2019) and GPT-3 175B (Brown et al. 2020, Table 2.1).
GPT2_124M = dict(_GPT2, num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, d_ff=3072)
GPT2_355M = dict(_GPT2, num_layers=24, d_model=1024, num_heads=16, num_kv_heads=16, d_ff=4096)
GPT2_774M = dict(_GPT2, num_layers=36, d_model=1280, num_heads=20, num_kv_heads=20, d_ff=5120)
GPT2_1_5B = dict(_GPT2, num_layers=48, d_model=1600, num_heads=25, num_kv_heads=25, d_ff=6400)
GPT3_175B = dict(
  _GPT2,
  num_layers=96,
  d_model=12288,
  num_heads=96,
  num_kv_heads=96,
  d_ff=49152,
  max_seq_len=2048,
)

# Llama 2 7B (Touvron et al. 2023) and the Llama 3.x family (Meta 2024).
LLAMA2_7B = dict(
  _LLAMA,
  vocab_size=32000,
  num_layers=32,
  d_model=4096,
  num_heads=32,
  num_kv_heads=32,
  d_ff=11008,
  max_seq_len=4096,
  rope_theta=10000.0,
)
_LLAMA3 = dict(_LLAMA, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0)
LLAMA3_1B = dict(
  _LLAMA3,
  num_layers=16,
  d_model=2048,
  num_heads=32,
  num_kv_heads=8,
  d_ff=8192,
  head_dim=64,
  tie_embeddings=True,
)
LLAMA3_8B = dict(_LLAMA3, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, d_ff=14336)
LLAMA3_70B = dict(_LLAMA3, num_layers=80, d_model=8192, num_heads=64, num_kv_heads=8, d_ff=28672)
LLAMA3_405B = dict(
  _LLAMA3, num_layers=126, d_model=16384, num_heads=128, num_kv_heads=8, d_ff=53248
)

# BERT (Devlin et al. 2019) as BertForMaskedLM: encoder, post-LN, WordPiece vocabulary (its
# [MASK] included), two token types, and the masked-LM head (no pooler).
_BERT = dict(
  norm='layernorm',
  norm_eps=1e-12,
  norm_position='post',
  mlp='gelu_exact',
  position='learned',
  use_bias=True,
  tie_embeddings=True,
  causal=False,
  head='mlm',
  vocab_size=30522,
  max_seq_len=512,
  type_vocab_size=2,
)
BERT_BASE = dict(_BERT, num_layers=12, d_model=768, num_heads=12, num_kv_heads=12, d_ff=3072)
BERT_LARGE = dict(_BERT, num_layers=24, d_model=1024, num_heads=16, num_kv_heads=16, d_ff=4096)

PRESETS = {
  'gpt2_124m': GPT2_124M,
  'gpt2_355m': GPT2_355M,
  'gpt2_774m': GPT2_774M,
  'gpt2_1.5b': GPT2_1_5B,
  'gpt3_175b': GPT3_175B,
  'llama2_7b': LLAMA2_7B,
  'llama3_1b': LLAMA3_1B,
  'llama3_8b': LLAMA3_8B,
  'llama3_70b': LLAMA3_70B,
  'llama3_405b': LLAMA3_405B,
  'bert_base': BERT_BASE,
  'bert_large': BERT_LARGE,
}


def get(name: str) -> dict:
  """Returns a copy of the preset `name`; unknown names list the valid ones."""
  if name not in PRESETS:
    raise ValueError(f'Unknown model preset {name!r}; valid presets: {", ".join(PRESETS)}.')
  return dict(PRESETS[name])
