"""Published model shapes, as `ModelConfig` field overrides.

Each entry reproduces the parameter count of the paper or release it names
(checked in tests for GPT-2 124M, a Llama-2-7B shape, BERT base and large, and
the mixtures of experts' total and active counts).
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

# Mixtures of experts: the Llama block with its MLP replaced by routed experts
# (llm/model/moe.py). Shapes from the releases' Hugging Face config.json.
# Mixtral 8x7B and 8x22B (Jiang et al. 2024; Mistral AI 2024): every layer
# sparse, 8 experts of the full d_ff, top-2 renormalised. 8x22B's vocabulary
# is the 32768 of its v0.3 tokenizer (the first base release had 32000).
_MIXTRAL = dict(_LLAMA, num_kv_heads=8, rope_theta=1e6, num_experts=8, experts_per_token=2)
MIXTRAL_8X7B = dict(
  _MIXTRAL,
  vocab_size=32000,
  num_layers=32,
  d_model=4096,
  num_heads=32,
  d_ff=14336,
  max_seq_len=32768,
)
MIXTRAL_8X22B = dict(
  _MIXTRAL,
  vocab_size=32768,
  num_layers=56,
  d_model=6144,
  num_heads=48,
  d_ff=16384,
  max_seq_len=65536,
)
# Qwen3-30B-A3B (Qwen team 2025): every layer sparse, 128 experts 768 wide,
# top-8 renormalised, no shared expert. d_ff is the release's unused dense
# width (no layer of it is dense). Qwen3 also normalises queries and keys per
# head (QK-norm, `qk_norm`: 2 x 48 x 128 parameters).
QWEN3_30B_A3B = dict(
  _LLAMA,
  vocab_size=151936,
  num_layers=48,
  d_model=2048,
  num_heads=32,
  num_kv_heads=4,
  head_dim=128,
  d_ff=6144,
  max_seq_len=40960,
  rope_theta=1e6,
  norm_eps=1e-6,
  num_experts=128,
  experts_per_token=8,
  moe_d_ff=768,
  router_renormalize=True,
  qk_norm=True,
)
# DeepSeekMoE 16B (Dai et al. 2024): multi-head attention (no latent
# attention, so the block is ours), a dense first layer 10944 wide, then 64
# fine-grained experts 1408 wide, top-6 with the weights kept as the softmax
# gives them, and 2 shared experts (one always-active MLP 2 x 1408 wide).
DEEPSEEK_MOE_16B = dict(
  _LLAMA,
  vocab_size=102400,
  num_layers=28,
  d_model=2048,
  num_heads=16,
  num_kv_heads=16,
  d_ff=10944,
  max_seq_len=4096,
  norm_eps=1e-6,
  num_experts=64,
  experts_per_token=6,
  num_shared_experts=2,
  moe_d_ff=1408,
  moe_first_dense=1,
  router_renormalize=False,
)

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
  'mixtral_8x7b': MIXTRAL_8X7B,
  'mixtral_8x22b': MIXTRAL_8X22B,
  'qwen3_30b_a3b': QWEN3_30B_A3B,
  'deepseek_moe_16b': DEEPSEEK_MOE_16B,
}


def get(name: str) -> dict:
  """Returns a copy of the preset `name`; unknown names list the valid ones."""
  if name not in PRESETS:
    raise ValueError(f'Unknown model preset {name!r}; valid presets: {", ".join(PRESETS)}.')
  return dict(PRESETS[name])
