"""Mixture-of-experts presets: total and active parameters, and the FLOPs MFU counts.

The presets' shapes are those of the releases' Hugging Face config.json; the
counts are checked exactly against a count written out here from those shapes,
and against the figures the releases publish (to their last digit).
"""

import pytest

from experiments import presets
from llm import metrics
from llm import model as model_lib
from llm.model import ModelConfig


def _hand_count(V, L, D, N, K, H, E, k, Fe, F=0, dense=0, shared=0, qk_norm=0):
  """(total, active) parameters of a Llama-style MoE, untied, from its shapes.

  Per layer: attention q, o [D, N*H] and k, v [D, K*H], two RMSNorm scales [D];
  a dense layer's SwiGLU MLP 3 x D x F; a sparse layer's router [D, E], E
  routed experts 3 x D x Fe (k of them active) and a shared MLP 3 x D x
  (shared x Fe). Then the embedding and the output projection [V, D] and the
  final norm [D].
  """
  attn = 2 * D * N * H + 2 * D * K * H + 2 * D + qk_norm * 2 * H
  expert = 3 * D * Fe
  sparse_fixed = attn + D * E + shared * expert
  outer = 2 * V * D + D
  dense_total = dense * (attn + 3 * D * F)
  total = outer + dense_total + (L - dense) * (sparse_fixed + E * expert)
  active = outer + dense_total + (L - dense) * (sparse_fixed + k * expert)
  return total, active


_QK = 1 if presets.QWEN3_30B_A3B.get('qk_norm') else 0

# preset, exact (total, active), published (total, active) in billions, and
# how far from them a count may be: half a unit of the last published digit.
CASES = [
  (
    'mixtral_8x7b',
    (46_702_792_704, 12_879_925_248),
    _hand_count(V=32000, L=32, D=4096, N=32, K=8, H=128, E=8, k=2, Fe=14336),
    (46.7, 12.9),
    0.05,
  ),
  (
    # 141B with the v0.3 tokenizer's 32768 rows; the first base release's
    # 32000 gives 9.4M fewer (140.62B), the same published figure.
    'mixtral_8x22b',
    (140_630_071_296, 39_161_468_928),
    _hand_count(V=32768, L=56, D=6144, N=48, K=8, H=128, E=8, k=2, Fe=16384),
    (141, 39),
    0.5,
  ),
  (
    # Qwen's model card truncates: the active count written out is 3.353B,
    # published as "3.3B activated" (the "A3B" of the name), so that figure
    # is allowed one unit of its last digit, not half. QK-norm adds 2 x 128
    # scales per layer (12,288 in all, total and active alike).
    'qwen3_30b_a3b',
    (30_532_110_336 + _QK * 12_288, 3_353_020_416 + _QK * 12_288),
    _hand_count(V=151936, L=48, D=2048, N=32, K=4, H=128, E=128, k=8, Fe=768, qk_norm=_QK),
    (30.5, 3.3),
    0.1,
  ),
  (
    # DeepSeekMoE 16B has plain multi-head attention (latent attention came
    # with DeepSeek-V2), so this block is its block: 16.4B total and 2.8B
    # active as the paper (Dai et al. 2024, Table 1) and the release publish.
    'deepseek_moe_16b',
    (16_375_728_128, 2_828_650_496),
    _hand_count(
      V=102400, L=28, D=2048, N=16, K=16, H=128, E=64, k=6, Fe=1408, F=10944, dense=1, shared=2
    ),
    (16.4, 2.8),
    0.05,
  ),
]


@pytest.mark.parametrize(
  'preset, exact, hand, published, tolerance', CASES, ids=[c[0] for c in CASES]
)
def test_moe_presets_match_total_and_active_parameter_counts(
  preset, exact, hand, published, tolerance
):
  cfg = ModelConfig(**presets.get(preset))
  counts = (model_lib.count_params(cfg), model_lib.count_active_params(cfg))
  assert counts == exact == hand
  for count, figure in zip(counts, published, strict=True):
    assert abs(count / 1e9 - figure) < tolerance, (preset, count, figure)


def test_active_params_of_a_dense_model_are_all_of_them():
  cfg = ModelConfig(**presets.LLAMA2_7B)
  assert model_lib.count_active_params(cfg) == model_lib.count_params(cfg) == 6_738_415_616


def test_mixtral_8x7b_flops_count_only_the_two_routed_experts():
  cfg = ModelConfig(**presets.MIXTRAL_8X7B)
  # Per layer, by hand (D 4096, 32 heads and 8 kv heads of 128, F 14336, E 8, k 2):
  attn = 4096 * 4096 * 2 + 4096 * 1024 * 2  # q, o + k, v = 33,554,432 + 8,388,608
  assert attn == 41_943_040
  experts = 2 * 3 * 4096 * 14336  # top-2 of the 8 SwiGLU experts (wi, wg, wo)
  assert experts == 352_321_536
  router = 4096 * 8
  assert router == 32_768
  per_layer = attn + experts + router
  assert per_layer == 394_297_344
  unembed = 4096 * 32000  # The output projection; the embedding lookup is no matmul.
  assert unembed == 131_072_000
  n = 32 * per_layer + unembed  # 12,617,515,008 + 131,072,000
  assert n == 12_748_587_008
  assert metrics.matmul_params(cfg) == n
  # The active parameters less what no matmul uses: the embedding table and
  # the 2 x 32 + 1 norm scales.
  assert n == model_lib.count_active_params(cfg) - 32000 * 4096 - 65 * 4096
  T = 4096
  attention = 6 * 32 * T * 32 * 128  # 6 L T N H = 3,221,225,472
  flops = 6 * n + attention  # 76,491,522,048 + 3,221,225,472
  assert flops == 79_712_747_520
  assert metrics.train_flops_per_token(cfg, T) == flops
  # All 8 experts would count 3.65x as many matmul weights (46,571,454,464).
  assert 32 * (attn + 8 * 3 * 4096 * 14336 + router) + unembed > 3.6 * n


def test_matmul_params_are_the_active_params_less_embedding_and_norms():
  """Per layer kind: a dense first layer, then every second layer sparse with a shared MLP."""
  cfg = ModelConfig(
    vocab_size=97,
    num_layers=5,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    d_ff=64,
    num_experts=4,
    experts_per_token=2,
    num_shared_experts=1,
    moe_d_ff=16,
    moe_first_dense=1,
    moe_every=2,
  )
  assert cfg.sparse_layers() == (False, False, True, False, True)
  norms = (2 * 5 + 1) * 32
  assert metrics.matmul_params(cfg) == model_lib.count_active_params(cfg) - 97 * 32 - norms
  attn = 2 * 32 * 4 * 8 + 2 * 32 * 2 * 8
  dense, sparse = attn + 3 * 32 * 64, attn + 3 * 32 * 16 * (2 + 1) + 32 * 4
  assert metrics.matmul_params(cfg) == 3 * dense + 2 * sparse + 32 * 97


def test_an_experiment_config_keeps_the_moe_preset():
  from experiments import synthetic

  cfg = ModelConfig.from_dict(synthetic.get_config('mixtral_8x7b').model)
  assert model_lib.count_params(cfg) == 46_702_792_704
  assert model_lib.count_active_params(cfg) == 12_879_925_248


def test_compile_report_counts_the_active_flops_of_a_mixture_of_experts():
  from llm import compile as compile_lib
  from tests.train_test import tiny_config

  c = tiny_config(
    **{
      'model.num_experts': 4,
      'model.experts_per_token': 2,
      'mesh.data': 1,
      'mesh.fsdp': 2,
      'mesh.expert': 4,
    }
  )
  cfg = ModelConfig.from_dict(c.model)
  report = compile_lib.compile_train_step(c)
  assert report.params == model_lib.count_params(cfg)
  assert report.active_params == model_lib.count_active_params(cfg) < report.params
  tokens_per_device = c.batch_size * c.seq_len / 8
  assert report.model_flops == metrics.train_flops_per_token(cfg, c.seq_len) * tokens_per_device
  assert 'B active)' in report.summary()
