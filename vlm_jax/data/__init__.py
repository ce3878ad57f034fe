"""Data: image preprocessing and prompts (`preprocess`, `prompt`), tfds builders (`datasets`) and the input
pipeline (`pipeline`). The tokenizer belongs to the model (`vlm_jax.tokenizer`). Import the submodules you need;
nothing heavy is imported here."""
