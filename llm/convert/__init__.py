"""Hugging Face interoperability: weights and tokenizers in and out.

`from llm.convert import hf`: `hf.load(dir) -> (ModelConfig, params)`,
`hf.save(cfg, params, dir)`, `hf.load_tokenizer(dir)`, `hf.save_tokenizer`.
`python -m llm.convert import|export` converts to and from params checkpoints
(`llm/checkpoint.py` params-only export). Safetensors only: pickles are never loaded.
"""
