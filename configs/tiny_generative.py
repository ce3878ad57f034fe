"""The tiny demo with a language-model task: the model also learns to answer in text (`vlm_jax.tasks.lm`), so
grounding and relations are learned both by heads and through generated text.

Run, then score what the model generates on the validation split:
    python -m vlm_jax.main --config configs/tiny_generative.py --workdir /tmp/vlm_jax_generative
    python -m vlm_jax.generative_eval --workdir /tmp/vlm_jax_generative --split validation

Each training example asks one of three questions about its image (drawn per example, `vlm_jax.data.generative`):
describe the image (the caption), InternVL's grounding question about the caption's subject (answer
`<ref>..</ref><box>[[x1, y1, x2, y2]]</box>`, 0..1000) and where the subject is relative to the reference object
(a relation word). The box and spatial heads train on the same batches, so the run gives "grounding by head" and
"grounding by generation" side by side.
"""

from vlm_jax.config_files import load_sibling


def get_config():
    c = load_sibling(__file__, "tiny_synthetic")
    c.data.lm_kinds = ("caption", "grounding", "relation")
    c.tasks.lm = dict(
        weight=1.0,
        chunk_size=0,  # > 0: positions per chunk of the logits (long sequences, large vocabularies)
        span_weights=dict(caption=1.0, grounding=1.0, relation=1.0, box=1.0),  # per answer span (generative.SPANS)
    )
    return c
