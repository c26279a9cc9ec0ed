"""Builds the golden Hugging Face fixtures under tests/fixtures/hf/ (run once, by a developer).

The conversion tests compare our logits and token ids against what
transformers produces; CI has no torch, so this script records them once:

  pip install torch==2.13.0 transformers sentencepiece protobuf  # a separate env is fine
  python tests/make_hf_fixtures.py        # everything
  python tests/make_hf_fixtures.py bert   # only bert_tiny* (the others stay as they are)
  python tests/make_hf_fixtures.py moe    # only mixtral* and qwen3_moe*

It writes, from fixed seeds and no downloads:

  gpt2/       GPT2LMHeadModel (tied embeddings, biases) saved with save_pretrained,
              and a byte-level BPE tokenizer trained here (tokenizer.json).
  llama/      LlamaForCausalLM with grouped-query attention (4 query, 2 kv heads),
              head_dim != d_model / num_heads, untied embeddings, llama3 RoPE
              scaling, saved in shards with an index; a sentencepiece BPE
              tokenizer trained here (tokenizer.model), Llama 2 settings.
  *_expected.npz    input_ids [2, 16] and the model's float32 logits.
  tokenizer_cases.json  awkward strings and the reference ids for each tokenizer.
  bert_tiny/  BertForMaskedLM (2 layers, post-LayerNorm, token types, tied decoder
              with its bias) and a lowercasing WordPiece tokenizer over a small
              hand-written vocabulary (tokenizer.json, and the same as vocab.txt).
  bert_tiny_expected.npz  input_ids, attention_mask (right padding) and
              token_type_ids [3, 12], and the model's float32 MLM logits.
  bert_tiny_cases.json  strings ([MASK] among them) and transformers' ids for them.
  mixtral/    MixtralForCausalLM: 2 layers, 4 experts (top 2, renormalised),
              grouped-query attention, head_dim != d_model / num_heads; no tokenizer.
  qwen3_moe/  Qwen3MoeForCausalLM: 5 layers, mlp_only_layers [0, 1, 3] (so dense,
              dense, sparse, dense, sparse: moe_first_dense=1, moe_every=2), 4
              experts (top 2, norm_topk_prob false), QK-norm, head_dim 16; no tokenizer.
  mixtral_expected.npz, qwen3_moe_expected.npz  input_ids [2, 16] and float32 logits.

Every weight, norm scales and biases included, is redrawn at random so that a
swapped or mis-laid-out tensor changes the logits. The live test
(tests/convert_live_test.py) reuses the builders here for other shapes.
"""

import io
import json
import os
import shutil

import numpy as np
import sentencepiece as spm
import torch
import transformers
from tokenizers import (
  Tokenizer,
  decoders,
  implementations,
  models,
  pre_tokenizers,
  processors,
  trainers,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf')

# Strings that trip tokenizers: whitespace runs at the edges, newlines and tabs,
# accents (composed and combining), CJK, emoji with joiners, byte-fallback
# characters, digits, contractions, special-token text and zero-width spaces.
AWKWARD_STRINGS = [
  '',
  ' ',
  'Hello world',
  '  two leading spaces',
  'trailing spaces   ',
  'many     inner   spaces',
  '\n\nnewlines\nin\n\nthe middle\n',
  '\ttabs\tand \t mixed',
  'café naïve résumé',
  'e\u0301 combining accent',
  '日本語のテキスト',
  'emoji 🙂 and family 👩\u200d👩\u200d👧',
  'rare symbols ∮ ⊕ ℵ',
  'zero\u200bwidth',
  "don't won't it's I'm",
  'numbers 1234567890 3.14159 -42',
  'CamelCaseIdentifier snake_case_name',
  'def f(x):\n    return x ** 2  # comment',
  'special <s> </s> <unk> <|endoftext|> text',
  'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
]

_SENTENCES = [
  'The quick brown fox jumps over the lazy dog.',
  'Language models learn the statistics of text from large corpora.',
  'In 2024, the model was trained on 1,234,567 tokens at 3.5 tokens per second.',
  'def train_step(state, batch):\n    return state.apply_gradients(grads=grads)\n',
  'She said: "It\'s not what we expected, but it works."',
  'Café au lait costs 3 euros; naïve questions are welcome.',
  'Attention is all you need, they wrote, and the field listened.',
  'for i in range(10):\n\tprint(i * i)\n',
  'Shakespeare wrote: to be, or not to be, that is the question.',
  'Rotary position embeddings rotate query and key vectors by angles.',
]


def corpus(repeats: int = 30) -> list[str]:
  """A small deterministic training corpus for the toy tokenizers."""
  return [s for _ in range(repeats) for s in _SENTENCES]


def train_byte_bpe(out_dir: str, vocab_size: int = 384) -> transformers.PreTrainedTokenizerBase:
  """A GPT-2 style byte-level BPE, saved as tokenizer.json with a GPT2Tokenizer config."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=['<|endoftext|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(corpus(), trainer)
  hf_tok = transformers.GPT2TokenizerFast(
    tokenizer_object=tok,
    bos_token='<|endoftext|>',
    eos_token='<|endoftext|>',
    unk_token='<|endoftext|>',
  )
  hf_tok.save_pretrained(out_dir)
  return transformers.AutoTokenizer.from_pretrained(out_dir)


def train_sentencepiece(out_dir: str, vocab_size: int = 400) -> spm.SentencePieceProcessor:
  """A Llama 2 style sentencepiece BPE (byte fallback, split digits), as tokenizer.model."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus()),
    model_writer=model,
    vocab_size=vocab_size,
    model_type='bpe',
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name='identity',
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    minloglevel=2,
  )
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'tokenizer.model'), 'wb') as f:
    f.write(model.getvalue())
  config = dict(
    tokenizer_class='LlamaTokenizer',
    bos_token='<s>',
    eos_token='</s>',
    unk_token='<unk>',
    add_bos_token=True,
    add_eos_token=False,
    legacy=False,
  )
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return spm.SentencePieceProcessor(model_file=os.path.join(out_dir, 'tokenizer.model'))


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
  """Redraws every parameter: weights ~ N(0, std), norm scales ~ 1 + N(0, std)."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in sorted(model.named_parameters()):
    noise = torch.randn(p.shape, generator=gen) * std
    is_norm_scale = ('norm' in name.lower() or '.ln_' in name) and name.endswith('weight')
    p.copy_(1.0 + noise if is_norm_scale else noise)


def build_model(
  out_dir: str, config, seed: int, max_shard_size=None, auto=transformers.AutoModelForCausalLM
) -> torch.nn.Module:
  """A randomly initialised model (`auto`: a causal LM) from `config`, saved as safetensors."""
  torch.manual_seed(seed)
  model = auto.from_config(config, attn_implementation='eager')
  randomize_(model, seed)
  model.eval()
  kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
  model.save_pretrained(out_dir, **kwargs)
  return model


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: np.ndarray) -> np.ndarray:
  return model(torch.from_numpy(input_ids)).logits.float().numpy()


@torch.no_grad()
def bert_logits(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
  """MLM logits for input_ids with attention_mask and token_type_ids."""
  return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()


def input_ids(vocab_size: int, seed: int, shape=(2, 16)) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab_size, shape).astype(np.int64)


def gpt2_config(vocab_size: int, **overrides) -> transformers.GPT2Config:
  fields = dict(
    vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0
  )
  fields.update(eos_token_id=0, **overrides)
  return transformers.GPT2Config(**fields)


def _decoder_config(cls, vocab_size: int, fields: dict, overrides: dict):
  """A `cls` (Llama, Mixtral or Qwen3-MoE config) with the tiny shape those fixtures share."""
  shared = dict(
    vocab_size=vocab_size,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
  )
  return cls(**{**shared, **fields, **overrides})


def llama_config(vocab_size: int, **overrides) -> transformers.LlamaConfig:
  fields = dict(
    intermediate_size=64,
    num_hidden_layers=2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters=dict(
      rope_type='llama3',
      rope_theta=10000.0,
      factor=4.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=64,
    ),
  )
  return _decoder_config(transformers.LlamaConfig, vocab_size, fields, overrides)


def mixtral_config(vocab_size: int, **overrides) -> transformers.MixtralConfig:
  fields = dict(
    intermediate_size=24,
    num_hidden_layers=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    rope_parameters=dict(rope_type='default', rope_theta=1e6),
  )
  return _decoder_config(transformers.MixtralConfig, vocab_size, fields, overrides)


def qwen3_moe_config(vocab_size: int, **overrides) -> transformers.Qwen3MoeConfig:
  fields = dict(
    intermediate_size=40,
    moe_intermediate_size=16,
    num_hidden_layers=5,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=False,
    mlp_only_layers=[0, 1, 3],
    decoder_sparse_step=1,
    rope_parameters=dict(rope_type='default', rope_theta=1e6),
  )
  return _decoder_config(transformers.Qwen3MoeConfig, vocab_size, fields, overrides)


def make_moe() -> None:
  """mixtral/, qwen3_moe/ and their *_expected.npz: the mixture-of-experts families."""
  for name, config, seed in (
    ('mixtral', mixtral_config(96), 11),
    ('qwen3_moe', qwen3_moe_config(96), 13),
  ):
    out = os.path.join(FIXTURES, name)
    shutil.rmtree(out, ignore_errors=True)
    model = build_model(out, config, seed=seed)
    ids = input_ids(96, seed=seed + 1)
    np.savez(
      os.path.join(FIXTURES, f'{name}_expected.npz'), input_ids=ids, logits=logits(model, ids)
    )


def bert_config(vocab_size: int, **overrides) -> transformers.BertConfig:
  fields = dict(
    vocab_size=vocab_size,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
  )
  fields.update(overrides)
  return transformers.BertConfig(**fields)


# A hand-written WordPiece vocabulary (trained ones differ from run to run):
# specials, characters and their continuations, then whole words and pieces.
_BERT_WORDS = (
  'hello my dog cat is are cute happy and the a quick brown fox jumps over lazy to be or not '
  'that question language model models text of in it was said what we but works '
  'un ##believ ##able ##ly ##s ##ing ##ed ##er ##es lang ##ua ##ge'
)
# What the BERT tokenizer is checked on: [MASK] and the other specials inside
# text, case and accents (lowercased and stripped), CJK (split per character),
# unknown characters, whitespace runs and continuation pieces.
BERT_STRINGS = [
  'Hello, my dog is [MASK].',
  '[MASK] [MASK]dog is[MASK]',
  '[CLS] hello [SEP] world [PAD]',
  'HELLO Café naïve résumé',
  '日本語 text',
  'rare symbols ∮ ⊕ ℵ',
  '  spaces\tand\nnewlines  ',
  'unbelievably languages',
  '',
]


def make_wordpiece(out_dir: str) -> transformers.PreTrainedTokenizerBase:
  """A lowercasing BERT WordPiece tokenizer: tokenizer.json and the same vocab.txt."""
  chars = [chr(c) for c in range(ord('a'), ord('z') + 1)] + list('0123456789!"\'(),-.:;?')
  pieces = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *chars, *(f'##{c}' for c in chars)]
  pieces += [w for w in _BERT_WORDS.split() if w not in pieces]
  tok = implementations.BertWordPieceTokenizer({p: i for i, p in enumerate(pieces)}, lowercase=True)
  hf_tok = transformers.BertTokenizerFast(tokenizer_object=tok._tokenizer)
  hf_tok.save_pretrained(out_dir)
  tok.save_model(out_dir)  # vocab.txt
  return transformers.AutoTokenizer.from_pretrained(out_dir)


def bert_batch(tok: transformers.PreTrainedTokenizerBase, seed: int, length: int = 12) -> dict:
  """Three rows: a sentence with [MASK] and right padding, a padded sentence pair (token
  types 0 and 1), and random ids and token types without padding."""
  pad = dict(padding='max_length', max_length=length, truncation=True, return_tensors='np')
  rows = [
    tok('Hello, my dog is [MASK].', **pad),
    tok('my dog is cute', 'hello [MASK]', **pad),
  ]
  rng = np.random.RandomState(seed)
  rows.append(
    dict(
      input_ids=rng.randint(0, len(tok), (1, length)),
      token_type_ids=rng.randint(0, 2, (1, length)),
      attention_mask=np.ones((1, length)),
    )
  )
  names = ('input_ids', 'attention_mask', 'token_type_ids')
  return {n: np.concatenate([r[n] for r in rows]).astype(np.int64) for n in names}


def make_bert() -> None:
  """bert_tiny/, bert_tiny_expected.npz and bert_tiny_cases.json."""
  bert_dir = os.path.join(FIXTURES, 'bert_tiny')
  shutil.rmtree(bert_dir, ignore_errors=True)
  tok = make_wordpiece(bert_dir)
  config = bert_config(len(tok))
  model = build_model(bert_dir, config, seed=5, auto=transformers.AutoModelForMaskedLM)
  batch = bert_batch(tok, seed=6)
  np.savez(
    os.path.join(FIXTURES, 'bert_tiny_expected.npz'), logits=bert_logits(model, batch), **batch
  )
  cases = dict(strings=BERT_STRINGS, **hf_token_cases(tok, BERT_STRINGS))
  # A directory with only vocab.txt (as older BERT releases ship) gives the same ids.
  vocab_dir = os.path.join(FIXTURES, 'bert_vocab_only.tmp')
  os.makedirs(vocab_dir)
  shutil.copy(os.path.join(bert_dir, 'vocab.txt'), vocab_dir)
  vocab_only = transformers.BertTokenizer.from_pretrained(vocab_dir)
  shutil.rmtree(vocab_dir)
  assert [vocab_only.encode(s) for s in BERT_STRINGS] == cases['ids_with_special']
  with open(os.path.join(FIXTURES, 'bert_tiny_cases.json'), 'w') as f:
    json.dump(cases, f, indent=1, ensure_ascii=False)


def hf_token_cases(tok: transformers.PreTrainedTokenizerBase, strings: list[str]) -> dict:
  """Ids with and without special tokens, and decodes, as transformers gives them."""
  ids = [tok.encode(s, add_special_tokens=False) for s in strings]
  return dict(
    ids=ids,
    ids_with_special=[tok.encode(s) for s in strings],
    decoded=[tok.decode(i, skip_special_tokens=True) for i in ids],
    decoded_with_special=[tok.decode(i, skip_special_tokens=False) for i in ids],
  )


def sentencepiece_cases(sp: spm.SentencePieceProcessor, strings: list[str]) -> dict:
  """The same, from sentencepiece itself (Llama's original tokenizer; BOS prepended)."""
  ids = [sp.encode(s) for s in strings]
  return dict(
    ids=ids,
    ids_with_special=[[sp.bos_id(), *i] for i in ids],
    decoded=[sp.decode(i) for i in ids],
  )


def main(argv):
  if argv[1:] == ['bert']:
    make_bert()
    return
  if argv[1:] == ['moe']:
    make_moe()
    return
  shutil.rmtree(FIXTURES, ignore_errors=True)
  os.makedirs(FIXTURES)
  cases = dict(strings=AWKWARD_STRINGS)

  gpt2_dir = os.path.join(FIXTURES, 'gpt2')
  gpt2_tok = train_byte_bpe(gpt2_dir)
  gpt2 = build_model(gpt2_dir, gpt2_config(len(gpt2_tok)), seed=1)
  ids = input_ids(len(gpt2_tok), seed=2)
  np.savez(os.path.join(FIXTURES, 'gpt2_expected.npz'), input_ids=ids, logits=logits(gpt2, ids))
  cases['gpt2'] = dict(reference='transformers', **hf_token_cases(gpt2_tok, AWKWARD_STRINGS))
  raw = Tokenizer.from_file(os.path.join(gpt2_dir, 'tokenizer.json'))
  assert cases['gpt2']['ids'] == [
    raw.encode(s, add_special_tokens=False).ids for s in AWKWARD_STRINGS
  ]

  llama_dir = os.path.join(FIXTURES, 'llama')
  sp = train_sentencepiece(llama_dir)
  llama = build_model(llama_dir, llama_config(sp.get_piece_size()), seed=3, max_shard_size='120KB')
  ids = input_ids(sp.get_piece_size(), seed=4)
  np.savez(os.path.join(FIXTURES, 'llama_expected.npz'), input_ids=ids, logits=logits(llama, ids))
  cases['llama'] = dict(reference='sentencepiece', **sentencepiece_cases(sp, AWKWARD_STRINGS))
  # transformers 5 rebuilds a Llama tokenizer with a Metaspace pre-tokenizer that
  # skips sentencepiece's dummy prefix before leading whitespace and parses
  # special-token text; record where it departs from sentencepiece.
  hf_llama = hf_token_cases(transformers.AutoTokenizer.from_pretrained(llama_dir), AWKWARD_STRINGS)
  cases['llama']['transformers_differs'] = [
    s
    for s, a, b in zip(AWKWARD_STRINGS, hf_llama['ids'], cases['llama']['ids'], strict=True)
    if a != b
  ]
  with open(os.path.join(FIXTURES, 'tokenizer_cases.json'), 'w') as f:
    json.dump(cases, f, indent=1, ensure_ascii=False)
  make_bert()
  make_moe()

  total = sum(
    os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(FIXTURES) for n in names
  )
  print(f'Wrote {FIXTURES}: {total / 1024:.0f} KiB.')


if __name__ == '__main__':
  import sys

  main(sys.argv)
