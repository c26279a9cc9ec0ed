"""Generation tasks: completions of prompts, scored against references.

A task is JSON lines with `prompt` and `reference`; the completions (greedy
unless told otherwise) are scored with sacrebleu (corpus BLEU and chrF,
0-100) and rouge-score (ROUGE-1/2/L F-measure, mean over examples, 0-1), with
those libraries' default settings: never re-implemented.
"""

import numpy as np

from llm import generate
from llm.model import ModelConfig


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
