"""Evaluation: perplexity and bits per byte, generation tasks (BLEU, ROUGE), multiple choice.

`lm` evaluates a split of any dataset kind with the training loss
(`llm/losses.py`), `generation` scores completions, `choice` ranks
continuations by log-likelihood, `tasks` reads task files and writes results.
`python -m llm.evaluate` is the command line.
"""
