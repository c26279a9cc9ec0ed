"""Models and runs on disk: checkpoints and exports (`checkpoint`), and the one way from a
path to a model, whatever wrote it (`models`). Hugging Face conversion is `llm/convert/`."""
