"""Write a small random InternVL checkpoint with tokenizer files, to try the API and the conversion offline.

    python -m vlm_jax.random_checkpoint --output DIR [--seed N]

DIR then holds what a transformers InternVL checkpoint holds: config.json + model.safetensors (transformers layout)
and the tokenizer files (a small byte-level BPE with InternVL's special tokens `<img>`, `</img>`, `<IMG_CONTEXT>`,
`<|im_start|>`, `<|im_end|>` and a chat template). It loads with `vlm_jax.load_pretrained` / `vlm_jax.load_tokenizer`,
converts with `python -m vlm_jax.convert`, and loads in transformers (`InternVLForConditionalGeneration` /
`AutoTokenizer.from_pretrained`). Nothing is downloaded and PyTorch is not needed; it takes a few seconds on a CPU.
The weights are random: outputs have the right shapes and agree with transformers, but mean nothing.
"""

from __future__ import annotations

import argparse

from vlm_jax import tokenizer as tok
from vlm_jax.checkpoints.random_hf import write_random_checkpoint
from vlm_jax.models.config import InternVLConfig

# The InternVL2.5/3 chat format (`vlm_jax.data.prompt`, template "internvl2_5") in the form transformers'
# InternVLProcessor expects: each image item is one `<IMG_CONTEXT>` that the processor expands into the image block.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def small_tokenizer():
    """The demo tokenizer (`tokenizer.build_demo_tokenizer`) with the chat template; `<IMG_CONTEXT>` is its last id."""
    tokenizer = tok.build_demo_tokenizer(tok.DEMO_WORDS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def small_config(tokenizer) -> InternVLConfig:
    """Small but not trivial: 64 px tiles of 8 px patches (16 image tokens per tile), 4+4 layers of width 64, a
    vocabulary of exactly the tokenizer's ids."""
    return InternVLConfig.tiny(image_size=64, vocab_size=len(tokenizer),
                               image_token_id=tokenizer.convert_tokens_to_ids(tok.IMG_CONTEXT),
                               vision=dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256),
                               text=dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                         intermediate_size=192))


def write(output: str, *, seed: int = 0) -> InternVLConfig:
    """Write the random checkpoint and its tokenizer to `output`; returns the model config."""
    tokenizer = small_tokenizer()
    config = small_config(tokenizer)
    write_random_checkpoint(output, config, layout="transformers", seed=seed, tokenizer=tokenizer)
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="output directory (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    config = write(args.output, seed=args.seed)
    print(f"wrote a random InternVL checkpoint with tokenizer files to {args.output} ({config.image_size} px tiles, "
          f"{config.num_image_tokens} <IMG_CONTEXT> tokens per tile, vocabulary {config.text.vocab_size})")


if __name__ == "__main__":
    main()
