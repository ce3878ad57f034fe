"""Data: image preprocessing, tokenizers and prompts (`preprocess`, `tokenizer`, `prompt`), tfds builders
(`datasets`) and the input pipeline (`pipeline`). Import the submodules you need; nothing heavy is imported here."""
