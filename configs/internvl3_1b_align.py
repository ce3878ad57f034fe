"""InternVL's generative stage 1 on a converted InternVL3-1B: the projector learns to caption, the towers frozen.

The vision tower and the language model are frozen (stored in bfloat16); only the MLP projector (`mlp1`) trains,
on next-token loss over COCO captions (`tasks.lm`, generative target "caption": "Describe the image." -> the
caption), the images as InternVL's dynamic tiles (up to 6 + thumbnail, at most 4 per image on average in a batch).
The LM's logits are formed 512 positions at a time. Then `internvl3_1b_sft.py` continues from this run.

Run:
    python -m vlm_jax.convert --checkpoint /path/to/InternVL3-1B-hf --output /data/internvl3_1b
    python -m vlm_jax.main --config configs/internvl3_1b_align.py --workdir /runs/internvl3_1b_align \\
        --config.model.converted_dir=/data/internvl3_1b --config.data.manual_dir=/data/coco

Result: not measured here (needs the real checkpoint, COCO and an accelerator). What to expect: a converted
InternVL3-1B already captions, so the validation `lm_loss_caption` starts low and this stage mostly adapts the
projector to the caption style; `lm_token_acc` is logged after every evaluation.
"""

from vlm_jax.config_files import load_sibling


def get_config():
    c = load_sibling(__file__, "internvl3_1b_retrieval")  # converted backbone, bf16 towers, COCO Karpathy splits
    c.data.lm_kinds = ("caption",)
    c.data.max_tiles = 6
    c.data.tile_budget = 4.0
    c.data.max_text_length = 40
    c.tasks = {"lm": dict(weight=1.0, chunk_size=512,
                          span_weights=dict(caption=1.0, grounding=1.0, relation=1.0, box=1.0))}
    c.optim.rules = (("backbone/multi_modal_projector/.*", "projector"), (".*", "frozen"))
    c.optim.groups = {"projector": dict(lr=2e-4, weight_decay=0.01, schedule="cosine", warmup_frac=0.03,
                                        end_lr_frac=0.0)}
    c.optim.grad_clip_norm = 1.0
    c.optim.decay_vectors = False
    c.batch_size = 8
    c.eval_batch_size = 16
    c.num_epochs = 1.0
    c.eval_every = 5000
    c.eval_splits = ("validation",)
    c.checkpoint.best_metric = "validation/lm_loss"
    c.checkpoint.best_mode = "min"
    return c
