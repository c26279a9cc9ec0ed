"""Datasets, tokenizers and the input pipeline; see pipeline.py for the batch format."""
