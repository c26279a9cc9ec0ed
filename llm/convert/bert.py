"""BERT (`BertForMaskedLM`) <-> `Transformer` as a post-LayerNorm encoder with the MLM head.

Hugging Face stores `nn.Linear` weights as [out, in]; ours are [in, out] with
the head axes explicit, so query [N*H, D] becomes q [D, N, H] by a transpose
and a reshape, and every mapping is exact in both directions. The layer's two
LayerNorms sit after their residual sums: `attention.output.LayerNorm` is our
'attn_norm' and `output.LayerNorm` our 'mlp_norm'; `embeddings.LayerNorm` is
'embed_norm'. The MLM head's transform (dense + GELU + LayerNorm) is
'mlm_dense' / 'mlm_norm', and its decoder is tied to the word embeddings with
its own bias ('unembed_bias').

That bias has two names. transformers 4 made `cls.predictions.decoder.bias`
the same parameter as `cls.predictions.bias` and saved the latter;
transformers 5 ties them only with tied embeddings, and otherwise computes
with the decoder's own bias while `cls.predictions.bias` goes unused. So a
tied checkpoint is read from `cls.predictions.bias`, an untied one from
`cls.predictions.decoder.bias`, and export writes both names when untied.

What is read besides BertForMaskedLM: BertForPreTraining checkpoints (the
original Google releases, bert-base-uncased among them), whose pooler and
next-sentence head are dropped, since the MLM objective uses neither; and
the pre-2019 LayerNorm names `gamma` / `beta` that those releases still use.
A BertModel has no MLM head and is refused.
"""

import re
from collections.abc import Callable, Iterator

import numpy as np

from llm.model import ModelConfig

ARCHITECTURE = 'BertForMaskedLM'
MODEL_TYPE = 'bert'
# Also read: the full pretraining model, whose extra heads are dropped. BertModel
# is listed only to refuse it with a reason rather than as an unknown architecture.
OTHER_ARCHITECTURES = ('BertForPreTraining', 'BertModel')
# Token ids that config.json records on export: BERT has no BOS/EOS, only padding.
SPECIAL_TOKEN_IDS = ('pad',)

_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu'}
_LAYER = re.compile(r'^encoder\.layer\.(\d+)\.(.+)$')
# Weights of heads that masked-LM does not use, and buffers saved by older versions.
_DROPPED = re.compile(r'^(pooler\.|cls\.seq_relationship\.|embeddings\.position_ids$)')
_NORM_PARAMS = {'weight': 'scale', 'bias': 'bias'}
_LEGACY_NORM = {'gamma': 'weight', 'beta': 'bias'}
_ATTN = {'query': 'q', 'key': 'k', 'value': 'v'}
_NORMS = {
  'embeddings.LayerNorm': 'embed_norm',
  'attention.output.LayerNorm': 'attn_norm',
  'output.LayerNorm': 'mlp_norm',
  'cls.predictions.transform.LayerNorm': 'mlm_norm',
}
_MLP = {'intermediate.dense': 'wi', 'output.dense': 'wo'}


def config_from_hf(hf: dict) -> dict:
  """ModelConfig fields from a BERT `config.json` (missing keys take BertConfig's defaults)."""
  names = hf.get('architectures') or []
  if names and names[0] == 'BertModel':
    raise ValueError(
      'The checkpoint is a BertModel, which has no masked-LM head (cls.predictions.*) to '
      'import; use a BertForMaskedLM or BertForPreTraining checkpoint of the same model.'
    )
  act = hf.get('hidden_act', 'gelu')
  if act not in _ACTIVATIONS:
    raise ValueError(
      f'BERT hidden_act={act!r} is not supported; supported: {", ".join(_ACTIVATIONS)}.'
    )
  for key, want in (
    ('position_embedding_type', 'absolute'),
    ('is_decoder', False),
    ('add_cross_attention', False),
  ):
    if hf.get(key, want) != want:
      raise ValueError(f'BERT {key}={hf[key]!r} is not supported; only {want!r} is.')
  num_heads = hf.get('num_attention_heads', 12)
  return dict(
    vocab_size=hf.get('vocab_size', 30522),
    num_layers=hf.get('num_hidden_layers', 12),
    d_model=hf.get('hidden_size', 768),
    num_heads=num_heads,
    num_kv_heads=num_heads,
    d_ff=hf.get('intermediate_size', 3072),
    max_seq_len=hf.get('max_position_embeddings', 512),
    norm='layernorm',
    norm_eps=hf.get('layer_norm_eps', 1e-12),
    mlp=_ACTIVATIONS[act],
    position='learned',
    use_bias=True,
    tie_embeddings=hf.get('tie_word_embeddings', True),
    causal=False,
    norm_position='post',
    type_vocab_size=hf.get('type_vocab_size', 2),
    head='mlm',
    init_std=hf.get('initializer_range', 0.02),
  )


def check_exportable(cfg: ModelConfig) -> list[str]:
  """Reasons `cfg` cannot be written as BertForMaskedLM; empty when it can."""
  reasons = [
    f'model.{field}={getattr(cfg, field)!r} (BERT needs {want!r})'
    for field, want in (
      ('norm', 'layernorm'),
      ('position', 'learned'),
      ('causal', False),
      ('norm_position', 'post'),
      ('head', 'mlm'),
      ('num_experts', 0),
      ('qk_norm', False),
      ('num_kv_heads', cfg.num_heads),
    )
    if getattr(cfg, field) != want
  ]
  if cfg.mlp not in ('gelu_exact', 'gelu'):
    reasons.append(f"model.mlp={cfg.mlp!r} (BERT needs 'gelu_exact' or 'gelu')")
  if cfg.head_dim * cfg.num_heads != cfg.d_model:
    reasons.append(
      f'model.head_dim={cfg.head_dim} (BERT needs d_model / num_heads = '
      f'{cfg.d_model / cfg.num_heads:g})'
    )
  return reasons


def config_to_hf(cfg: ModelConfig, biases: dict[str, bool]) -> dict:
  """A BertForMaskedLM `config.json` (biases is unused: BERT always has them).

  A model without token types gets one all-zero type row, which adds nothing:
  transformers' BERT always has the table.
  """
  del biases
  return dict(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    intermediate_size=cfg.d_ff,
    hidden_act='gelu' if cfg.mlp == 'gelu_exact' else 'gelu_new',
    max_position_embeddings=cfg.max_seq_len,
    type_vocab_size=max(cfg.type_vocab_size, 1),
    layer_norm_eps=cfg.norm_eps,
    initializer_range=cfg.init_std,
    position_embedding_type='absolute',
    is_decoder=False,
    tie_word_embeddings=cfg.tie_embeddings,
  )


def _strip(name: str) -> str:
  # BertForMaskedLM / BertForPreTraining prefix the encoder with 'bert.'; BertModel does not.
  name = name.removeprefix('bert.')
  head, _, last = name.rpartition('.')
  if head.endswith('LayerNorm') and last in _LEGACY_NORM:
    name = f'{head}.{_LEGACY_NORM[last]}'
  return name


def expected_names(hf: dict, cfg: ModelConfig, present: frozenset[str]) -> set[str]:
  """Tensor names (prefix stripped, LayerNorm names modern) a checkpoint must hold."""
  del hf, present  # One layout, whatever the config.
  wb = ('weight', 'bias')
  names = {
    'embeddings.word_embeddings.weight',
    'embeddings.position_embeddings.weight',
    'cls.predictions.bias',
  }
  for module in (
    'embeddings.LayerNorm',
    'cls.predictions.transform.dense',
    'cls.predictions.transform.LayerNorm',
  ):
    names.update(f'{module}.{p}' for p in wb)
  if cfg.type_vocab_size:
    names.add('embeddings.token_type_embeddings.weight')
  if not cfg.tie_embeddings:
    names.remove('cls.predictions.bias')
    names.update({'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias'})
  per_layer = [f'attention.self.{k}' for k in _ATTN]
  per_layer += ['attention.output.dense', 'attention.output.LayerNorm', *_MLP, 'output.LayerNorm']
  for i in range(cfg.num_layers):
    names.update(f'encoder.layer.{i}.{m}.{p}' for m in per_layer for p in wb)
  return names


def canonical_name(name: str, cfg: ModelConfig) -> str | None:
  """The name `expected_names` uses, or None for tensors that masked-LM does not use
  (including the one of the two bias names that the model does not compute with)."""
  name = _strip(name)
  if cfg.tie_embeddings:
    unused = name in ('cls.predictions.decoder.weight', 'cls.predictions.decoder.bias')
  else:
    unused = name == 'cls.predictions.bias'
  return None if unused or _DROPPED.match(name) else name


def to_ours(
  name: str, w: np.ndarray, cfg: ModelConfig
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One canonical Hugging Face tensor -> [(our path, layer or None, array)]."""
  D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
  top = {
    'embeddings.word_embeddings.weight': ('embedding',),
    'embeddings.position_embeddings.weight': ('pos_embedding',),
    'embeddings.token_type_embeddings.weight': ('type_embedding',),
    'cls.predictions.bias': ('unembed_bias',),
    'cls.predictions.decoder.bias': ('unembed_bias',),
    'cls.predictions.transform.dense.bias': ('mlm_dense', 'bias'),
  }
  if name in top:
    return [(top[name], None, w)]
  if name == 'cls.predictions.transform.dense.weight':
    return [(('mlm_dense', 'kernel'), None, w.T)]
  if name == 'cls.predictions.decoder.weight':
    return [(('unembed',), None, w.T)]
  layer = _LAYER.match(name)
  i, rest = (int(layer.group(1)), layer.group(2)) if layer else (None, name)
  module, _, param = rest.rpartition('.')
  if module in _NORMS:
    return [((_NORMS[module], _NORM_PARAMS[param]), i, w)]
  if module.startswith('attention.self.'):
    k = _ATTN[module.rpartition('.')[2]]
    if param == 'bias':
      return [(('attn', f'{k}_bias'), i, w.reshape(N, H))]
    return [(('attn', k), i, w.T.reshape(D, N, H))]
  if module == 'attention.output.dense':
    if param == 'bias':
      return [(('attn', 'o_bias'), i, w)]
    return [(('attn', 'o'), i, w.T.reshape(N, H, D))]
  ours = _MLP[module]
  if param == 'bias':
    return [(('mlp', f'{ours}_bias'), i, w)]
  return [(('mlp', ours), i, w.T)]


def to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict[str, bool]
) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every tensor, reading ours through `get(path, layer)`.

  Names are those `save_pretrained` writes for BertForMaskedLM: the tied
  decoder weight and its bias alias are left out, and an untied decoder's bias
  is written under both names (see the module docstring). A model without
  biases gets zeros from `get`; `biases` is unused.
  """
  del biases
  D = cfg.d_model
  p = 'bert.embeddings.'
  embedding = get(('embedding',), None)
  yield p + 'word_embeddings.weight', embedding
  yield p + 'position_embeddings.weight', get(('pos_embedding',), None)
  if cfg.type_vocab_size:
    yield p + 'token_type_embeddings.weight', get(('type_embedding',), None)
  else:
    yield p + 'token_type_embeddings.weight', np.zeros((1, D), embedding.dtype)
  yield p + 'LayerNorm.weight', get(('embed_norm', 'scale'), None)
  yield p + 'LayerNorm.bias', get(('embed_norm', 'bias'), None)
  for i in range(cfg.num_layers):
    p = f'bert.encoder.layer.{i}.'
    for hf_name, k in _ATTN.items():
      yield p + f'attention.self.{hf_name}.weight', get(('attn', k), i).reshape(D, -1).T
      yield p + f'attention.self.{hf_name}.bias', get(('attn', f'{k}_bias'), i).reshape(-1)
    yield p + 'attention.output.dense.weight', get(('attn', 'o'), i).reshape(-1, D).T
    yield p + 'attention.output.dense.bias', get(('attn', 'o_bias'), i)
    yield p + 'attention.output.LayerNorm.weight', get(('attn_norm', 'scale'), i)
    yield p + 'attention.output.LayerNorm.bias', get(('attn_norm', 'bias'), i)
    for module, ours in _MLP.items():
      yield p + f'{module}.weight', get(('mlp', ours), i).T
      yield p + f'{module}.bias', get(('mlp', f'{ours}_bias'), i)
    yield p + 'output.LayerNorm.weight', get(('mlp_norm', 'scale'), i)
    yield p + 'output.LayerNorm.bias', get(('mlp_norm', 'bias'), i)
  p = 'cls.predictions.'
  yield p + 'bias', get(('unembed_bias',), None)
  yield p + 'transform.dense.weight', get(('mlm_dense', 'kernel'), None).T
  yield p + 'transform.dense.bias', get(('mlm_dense', 'bias'), None)
  yield p + 'transform.LayerNorm.weight', get(('mlm_norm', 'scale'), None)
  yield p + 'transform.LayerNorm.bias', get(('mlm_norm', 'bias'), None)
  if not cfg.tie_embeddings:
    yield p + 'decoder.weight', get(('unembed',), None).T
    yield p + 'decoder.bias', get(('unembed_bias',), None)
