r"""Evaluation: perplexity and bits per byte, generation tasks, multiple choice.

  python -m llm.evaluate --workdir=DIR [--split=validation] [--max_batches=0] \
      [--generation=TASK.jsonl ...] [--choice=TASK.jsonl ...]

DIR is a training workdir (its newest checkpoint) or a params export. Results
go to DIR/eval/step_<step>/ (an export: DIR/eval/): `summary.json` with the
step and every metric, and one `<task>.jsonl` of per-example outputs per task.

Language modelling (`--split`): the split is read like training data (packed
rows, every host its own documents, all of it unless --max_batches) and the
sums are taken over all hosts. Loss is the mean next-token NLL in nats,
perplexity exp(loss). Bits per byte divides the summed NLL (in bits) by the
UTF-8 bytes of text the target tokens stand for, so models with different
tokenizers compare on the same text; EOS targets count in the NLL but stand
for no bytes. With data.objective='mlm' the loss is over the masked tokens
(llm/data/mlm.py; the masks are the same at every evaluation), `accuracy` is
the fraction of them predicted exactly, and there are no bits per byte: a
masked token is predicted from both sides, not from the text before it.

Generation tasks: JSON lines with `prompt` and `reference`; the completions
(greedy unless told otherwise) are scored with sacrebleu (corpus BLEU and
chrF, 0-100) and rouge-score (ROUGE-1/2/L F-measure, mean over examples, 0-1),
with those libraries' default settings.

Multiple choice: JSON lines with `context`, `choices` and `label` (the index
of the right choice). Each choice is scored by the log-likelihood of its
tokens after the context's; `accuracy` takes the best sum, `accuracy_norm`
the best sum per UTF-8 byte of the choice (length-normalised, as the LM
evaluation harness does), so long choices are not penalised for their length.
"""

import contextlib
import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from llm import generate, sharding
from llm import model as model_lib
from llm.data import jsonl
from llm.model import ModelConfig, Transformer

# ----------------------------------------------------------------------------
# Perplexity and bits per byte.


def token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] int32: the UTF-8 bytes of text each id stands for (0 for special ids).

  Exact for the project's tokenizers: a byte id is one byte; a sentencepiece
  piece is its text with the whitespace mark as a space, a byte-fallback piece
  one byte. Other tokenizers: the bytes of the id decoded alone.
  """
  from llm.data import tokenizer as data_tokenizer

  table = np.zeros((vocab_size,), np.int32)
  n = min(vocab_size, tokenizer.vocab_size)
  if isinstance(tokenizer, data_tokenizer.ByteTokenizer):
    table[:n] = [1 if tokenizer.decode([i]) else 0 for i in range(n)]
    return table
  byte_piece = re.compile(r'<0x[0-9A-Fa-f]{2}>')
  for i in range(n):
    text = tokenizer.decode([i])
    if not text:
      continue  # Control ids decode to nothing.
    if hasattr(tokenizer, 'id_to_piece'):
      piece = tokenizer.id_to_piece(i)
      table[i] = 1 if byte_piece.fullmatch(piece) else len(piece.replace('\u2581', ' ').encode())
    else:
      table[i] = len(text.encode('utf-8'))
  return table


def nll_sums(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> dict:
  """Summed NLL of the targets where mask_BT is 1, and how many they are."""
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  return {'nll_sum': jnp.sum((log_z_BT - target_logit_BT) * mask_BT), 'tokens': jnp.sum(mask_BT)}


def loss_sums(params, batch: dict, bytes_V: jax.Array, *, cfg: ModelConfig) -> dict:
  """Sums over a packed batch (so batches and hosts add up): NLL, loss tokens, text bytes."""
  logits_BTV = Transformer(cfg).apply(
    {'params': params}, batch['inputs'], batch['positions'], batch['segment_ids']
  )
  mask_BT = batch['loss_mask'].astype(jnp.float32)
  return {
    **nll_sums(logits_BTV, batch['targets'], mask_BT),
    'bytes': jnp.sum(bytes_V[batch['targets']] * mask_BT),
    'correct': jnp.sum((jnp.argmax(logits_BTV, axis=-1) == batch['targets']) * mask_BT),
  }


def summarize(nll_sum: float, tokens: float, num_bytes: float = 0.0) -> dict:
  """Loss (nats per token), perplexity and, when the text's bytes are known, bits per byte."""
  loss = nll_sum / max(tokens, 1.0)
  out = {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0))), 'tokens': tokens}
  if num_bytes > 0:
    out['bits_per_byte'] = nll_sum / math.log(2) / num_bytes
    out['bytes'] = num_bytes
  return out


def _param_shardings(cfg: ModelConfig, mesh):
  return sharding.logical_shardings(model_lib.abstract_params(cfg), mesh)


@functools.lru_cache(maxsize=8)
def _loss_fn(cfg: ModelConfig, mesh):
  replicated = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(loss_sums, cfg=cfg),
    in_shardings=(_param_shardings(cfg, mesh), sharding.batch_sharding(mesh), replicated),
    out_shardings=replicated,
  )


def evaluate_split(
  cfg: ModelConfig,
  params,
  data_config,
  *,
  split: str = 'validation',
  batch_size: int,
  seq_len: int,
  mesh=None,
  seed: int = 0,
  max_batches: int = 0,
  tokenizer=None,
  progress: bool = False,
) -> dict:
  """Loss, perplexity and bits per byte of `params` on a split, over all hosts.

  Args:
    cfg, params: the model; params sharded for `mesh` (see generate.place_params);
      no mesh: one device.
    data_config: `config.data`; the synthetic stream has no text, so no bits per byte.
    split: 'validation' (data.eval_split), 'train' or a TFDS split name.
    batch_size: global rows per batch; seq_len: tokens per row.
    max_batches: stop after this many batches; 0 reads the whole split.
    tokenizer: the data's tokenizer (default: loaded from data_config).
  """
  from llm.data import pipeline

  it = pipeline.make_iterator(
    data_config,
    split=split,
    batch_size=batch_size,
    seq_len=seq_len,
    seed=seed,
    shuffle=False,
    num_epochs=1,
    vocab_size=cfg.vocab_size,
  )
  table = np.zeros((cfg.vocab_size,), np.int32)
  masked_lm = data_config.get('objective', 'lm') == 'mlm'
  if data_config.dataset != 'synthetic' and not masked_lm:
    if tokenizer is None:
      from llm.data import tokenizer as data_tokenizer

      tokenizer = data_tokenizer.load(data_config)
    table = token_bytes(tokenizer, cfg.vocab_size)
  if mesh is None:
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  fn = _loss_fn(cfg, mesh)
  totals = np.zeros(4)
  n = 0
  with sharding.rules_context(mesh):
    table = jax.device_put(table, sharding.replicated(mesh))
    for host_batch in it:
      out = fn(params, sharding.global_batch(host_batch, mesh), table)
      totals += [float(out[k]) for k in ('nll_sum', 'tokens', 'bytes', 'correct')]
      n += 1
      if progress and n % 20 == 0:
        print(f'{split}: {n} batches, loss {totals[0] / max(totals[1], 1):.4f}', flush=True)
      if 0 < max_batches <= n:
        break
  out = {**summarize(*totals[:3]), 'batches': n}
  if masked_lm:
    out['accuracy'] = totals[3] / max(totals[1], 1.0)
  return out


# ----------------------------------------------------------------------------
# Generation tasks.


def read_jsonl(path: str, fields: dict[str, type | tuple]) -> list[dict]:
  """Rows of a JSON-lines task file; stops on the first row lacking a field of the right type."""
  rows = []
  for where, row in jsonl.read(path):
    for name, kind in fields.items():
      jsonl.field(row, where, name, kind)
    rows.append(row)
  return rows


def generation_scores(outputs: list[str], references: list[str]) -> dict:
  """Corpus BLEU and chrF (sacrebleu), mean ROUGE-1/2/L F-measure (rouge-score)."""
  import sacrebleu
  from rouge_score import rouge_scorer

  kinds = ('rouge1', 'rouge2', 'rougeL')
  scorer = rouge_scorer.RougeScorer(list(kinds))
  rouge = [scorer.score(ref, out) for out, ref in zip(outputs, references, strict=True)]
  return {
    'bleu': sacrebleu.corpus_bleu(outputs, [references]).score,
    'chrf': sacrebleu.corpus_chrf(outputs, [references]).score,
    **{k: float(np.mean([r[k].fmeasure for r in rouge])) for k in kinds},
    'examples': len(outputs),
  }


def generation_task(
  cfg: ModelConfig,
  params,
  tokenizer,
  examples: list[dict],
  *,
  max_new_tokens: int = 128,
  sampling: generate.Sampling = generate.GREEDY,
  seed: int = 0,
  stop=(),
  mesh=None,
  batch_size: int = 16,
) -> tuple[dict, list[dict]]:
  """Generates for every `prompt` and scores against `reference`: (summary, per-example rows)."""
  import sacrebleu

  gens = generate.generate_text(
    cfg,
    params,
    tokenizer,
    [e['prompt'] for e in examples],
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    seed=seed,
    stop=stop,
    mesh=mesh,
    batch_size=batch_size,
  )
  outputs = [g.text for g in gens]
  references = [e['reference'] for e in examples]
  summary = generation_scores(outputs, references)
  rows = [
    {
      'prompt': e['prompt'],
      'reference': ref,
      'output': out,
      'finish_reason': g.finish_reason,
      'bleu': sacrebleu.sentence_bleu(out, [ref]).score,
    }
    for e, ref, out, g in zip(examples, references, outputs, gens, strict=True)
  ]
  return summary, rows


# ----------------------------------------------------------------------------
# Multiple choice.


def _logprob_sums(params, inputs_BT, targets_BT, mask_BT, *, cfg: ModelConfig):
  T = inputs_BT.shape[1]
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), inputs_BT.shape)
  logits_BTV = Transformer(cfg).apply(
    {'params': params}, inputs_BT, positions_BT, (mask_BT >= 0).astype(jnp.int32)
  )
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  target_logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
  return jnp.sum(target_logp_BT * (mask_BT > 0), axis=-1)


@functools.lru_cache(maxsize=8)
def _logprob_fn(cfg: ModelConfig, mesh):
  fn = functools.partial(_logprob_sums, cfg=cfg)
  if mesh is None:
    return jax.jit(fn)
  rows = sharding.batch_sharding(mesh)
  params = _param_shardings(cfg, mesh)
  return jax.jit(fn, in_shardings=(params, rows, rows, rows), out_shardings=rows)


def continuation_logprobs(
  cfg: ModelConfig, params, pairs: list[tuple[list[int], list[int]]], *, mesh=None, batch_size=16
) -> np.ndarray:
  """log p(continuation | context) for (context ids, continuation ids) pairs (float32 sums).

  Rows are padded to length buckets (generate.bucket_length) and batch_size
  rows (a multiple of the data-parallel ways), so a task compiles a few times.
  """
  for i, (ctx, cont) in enumerate(pairs):
    if not ctx or not cont:
      raise ValueError(f'Request {i} has an empty context or continuation (in tokens).')
    if len(ctx) + len(cont) - 1 > cfg.max_seq_len:
      raise ValueError(
        f"Request {i} has {len(ctx) + len(cont)} tokens but the model's context is "
        f'{cfg.max_seq_len} (model.max_seq_len); shorten its context.'
      )
  ways = 1 if mesh is None else sharding.batch_divisor(mesh)
  rows = math.ceil(batch_size / ways) * ways
  fn = _logprob_fn(cfg, mesh)
  # Similar lengths together: less padding.
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
  out = np.zeros((len(pairs),), np.float64)
  for start in range(0, len(order), rows):
    idx = order[start : start + rows]
    seqs = [pairs[i][0] + pairs[i][1] for i in idx]
    T = generate.bucket_length(max(len(s) - 1 for s in seqs), cfg.max_seq_len)
    inputs = np.zeros((rows, T), np.int32)
    targets = np.zeros((rows, T), np.int32)
    # 1: a continuation target; 0: a context target; -1: padding (its own segment).
    mask = np.full((rows, T), -1, np.int32)
    for r, i in enumerate(idx):
      seq, n_cont = seqs[r], len(pairs[i][1])
      inputs[r, : len(seq) - 1] = seq[:-1]
      targets[r, : len(seq) - 1] = seq[1:]
      mask[r, : len(seq) - 1] = 0
      mask[r, len(seq) - 1 - n_cont : len(seq) - 1] = 1
    with sharding.rules_context(mesh) if mesh is not None else contextlib.nullcontext():
      sums = fn(params, *(_rows(x, mesh) for x in (inputs, targets, mask)))
    out[idx] = np.asarray(jax.device_get(sums), np.float64)[: len(idx)]
  return out


def _rows(x: np.ndarray, mesh):
  if mesh is None:
    return x
  return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh), lambda i: x[i])


def choice_task(
  cfg: ModelConfig, params, tokenizer, examples: list[dict], *, mesh=None, batch_size: int = 16
) -> tuple[dict, list[dict]]:
  """Accuracy by raw and length-normalised log-likelihood: (summary, per-example rows)."""
  pairs = []
  for n, e in enumerate(examples):
    if not e['choices'] or not all(isinstance(c, str) for c in e['choices']):
      raise ValueError(f'Example {n}: choices must be a non-empty list of strings.')
    if not 0 <= e['label'] < len(e['choices']):
      raise ValueError(
        f'Example {n}: label {e["label"]} is not an index into its {len(e["choices"])} choices.'
      )
    ctx = generate.encode_prompt(tokenizer, e['context'])
    pairs += [(ctx, list(tokenizer.encode(c))) for c in e['choices']]
  logp = continuation_logprobs(cfg, params, pairs, mesh=mesh, batch_size=batch_size)
  rows, k = [], 0
  for e in examples:
    scores = logp[k : k + len(e['choices'])]
    k += len(e['choices'])
    per_byte = scores / np.array([max(len(c.encode('utf-8')), 1) for c in e['choices']])
    rows.append(
      {
        'context': e['context'],
        'label': e['label'],
        'prediction': int(np.argmax(scores)),
        'prediction_norm': int(np.argmax(per_byte)),
        'logprobs': scores.tolist(),
      }
    )
  summary = {
    'accuracy': float(np.mean([r['prediction'] == r['label'] for r in rows])),
    'accuracy_norm': float(np.mean([r['prediction_norm'] == r['label'] for r in rows])),
    'examples': len(rows),
  }
  return summary, rows


# ----------------------------------------------------------------------------
# Results and the command line.


def results_dir(path: str, step: int | None) -> str:
  """Where results of `path`'s checkpoint go: DIR/eval/step_<step>, or DIR/eval for an export."""
  return os.path.join(path, 'eval', f'step_{step}' if step is not None else '')


def write_results(directory: str, summary: dict, per_example: dict[str, list[dict]]) -> None:
  """summary.json plus <task>.jsonl per task; only process 0 writes."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  for name, rows in per_example.items():
    with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  tmp = os.path.join(directory, 'summary.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(directory, 'summary.json'))


def task_name(path: str) -> str:
  name = os.path.basename(path)
  return name[: -len('.jsonl')] if name.endswith('.jsonl') else name


def checkpoint_step(path: str) -> int | None:
  """The step of the checkpoint `checkpoint.load_params(path)` reads; None for an export."""
  from llm import checkpoint

  if not os.path.isdir(os.path.join(path, 'checkpoints')):
    return None
  ckpt = checkpoint.Checkpointer(path, async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def main(argv):
  del argv
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # Keep orbax's restore chatter off the output.
  import ml_collections
  from absl import flags

  FLAGS = flags.FLAGS
  try:
    from llm import checkpoint, finetune, finetune_metrics

    # Bad task files stop the run before any work is done.
    generation = {
      task_name(p): read_jsonl(p, {'prompt': str, 'reference': str}) for p in FLAGS.generation
    }
    choice = {
      task_name(p): read_jsonl(p, {'context': str, 'choices': list, 'label': int})
      for p in FLAGS.choice
    }
    mesh = sharding.mesh_from_spec(FLAGS.mesh)
    step = checkpoint_step(FLAGS.workdir)
    cfg, params, config = checkpoint.load_params(FLAGS.workdir, mesh=mesh)
    if FLAGS.config is not None:
      config = json.loads(FLAGS.config.to_json_best_effort())
    tok = checkpoint.load_tokenizer(FLAGS.workdir, config, FLAGS.tokenizer)
    summary = {'step': step, 'checkpoint': os.path.abspath(FLAGS.workdir)}
    per_example = {}
    if FLAGS.split and config is None:
      if FLAGS['split'].present:
        raise ValueError(
          f'{FLAGS.workdir} has no training config to read the data settings from; pass '
          "--config=experiments/NAME.py for them, or --split='' to skip perplexity."
        )
      print(
        f'{FLAGS.workdir} is a params export without data settings: no perplexity '
        '(pass --config=experiments/NAME.py for it).',
        flush=True,
      )
    if FLAGS.split and config is not None and config['data']['dataset'] in finetune.DATASETS:
      run = ml_collections.ConfigDict(config)  # Accuracy and macro-F1, or response-token loss.
      run.batch_size, run.seq_len = FLAGS.batch_size or run.batch_size, FLAGS.seq_len or run.seq_len
      summary['finetune'] = finetune_metrics.evaluate_config(
        cfg, params, run, split=FLAGS.split, mesh=mesh, max_batches=FLAGS.max_batches
      )
      print(f'{FLAGS.split}: ' + json.dumps(summary['finetune']), flush=True)
    elif FLAGS.split and config is not None:
      batch = FLAGS.batch_size or config['batch_size']
      seq_len = FLAGS.seq_len or config['seq_len']
      summary['lm'] = evaluate_split(
        cfg,
        params,
        ml_collections.ConfigDict(config['data']),
        split=FLAGS.split,
        batch_size=batch,
        seq_len=seq_len,
        mesh=mesh,
        seed=config.get('seed', 0),
        max_batches=FLAGS.max_batches,
        progress=True,
      )
      print(f'{FLAGS.split}: ' + json.dumps(summary['lm']), flush=True)
    sampling = generate.Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    for name, examples in generation.items():
      summary[f'generation/{name}'], per_example[name] = generation_task(
        cfg,
        params,
        tok,
        examples,
        max_new_tokens=FLAGS.max_new_tokens,
        sampling=sampling,
        seed=FLAGS.seed,
        stop=FLAGS.stop or (),
        mesh=mesh,
        batch_size=FLAGS.eval_batch_size,
      )
      print(f'{name}: ' + json.dumps(summary[f'generation/{name}']), flush=True)
    for name, examples in choice.items():
      summary[f'choice/{name}'], per_example[name] = choice_task(
        cfg, params, tok, examples, mesh=mesh, batch_size=FLAGS.eval_batch_size
      )
      print(f'{name}: ' + json.dumps(summary[f'choice/{name}']), flush=True)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f'{type(e).__name__}: {e}') from None
  out = FLAGS.output_dir or results_dir(FLAGS.workdir, step)
  write_results(out, summary, per_example)
  print(f'Wrote {os.path.join(out, "summary.json")}.')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string('workdir', None, 'Training workdir (newest checkpoint) or params export.')
  config_flags.DEFINE_config_file('config', None, 'Experiment whose data settings to use.')
  flags.DEFINE_string('split', 'validation', "Split for perplexity; '' skips it.")
  flags.DEFINE_integer('batch_size', 0, 'Rows per perplexity batch; 0: the config batch_size.')
  flags.DEFINE_integer('seq_len', 0, 'Tokens per row; 0: the config seq_len.')
  flags.DEFINE_integer('max_batches', 0, 'Perplexity batches; 0: the whole split.')
  flags.DEFINE_multi_string('generation', [], 'JSON lines with prompt and reference.')
  flags.DEFINE_multi_string('choice', [], 'JSON lines with context, choices and label.')
  flags.DEFINE_integer('eval_batch_size', 16, 'Prompts or choices per batch.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Generation tasks: tokens per completion, at most.')
  flags.DEFINE_float('temperature', 0.0, 'Generation tasks: 0 is greedy.')
  flags.DEFINE_integer('top_k', 0, 'Generation tasks: top-k cut; 0: none.')
  flags.DEFINE_float('top_p', 1.0, 'Generation tasks: nucleus mass; 1: none.')
  flags.DEFINE_integer('seed', 0, 'Generation tasks: sampling seed.')
  flags.DEFINE_multi_string('stop', [], 'Generation tasks: a string that ends a completion.')
  flags.DEFINE_string('tokenizer', '', "'byte', a .model file or a Hugging Face tokenizer dir.")
  flags.DEFINE_string('mesh', '', "Mesh sizes, e.g. 'tensor=4'; default: all devices on data.")
  flags.DEFINE_string('output_dir', '', 'Where to write; default DIR/eval/step_<step>.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
