"""InternVL's generative stage 2 on a converted InternVL3-1B: projector + language model on instruction data.

Starts from the align stage's run (`internvl3_1b_align.py`: its trained projector and the frozen towers) and trains
the projector and the whole language model (vision tower frozen) on RefCOCO's referring expressions asked the way
InternVL asks them: its grounding question -> `<ref>expression</ref><box>[[x1, y1, x2, y2]]</box>` (0..1000), and
"Describe the image." -> the expression. With the argument `lora` the language model stays frozen and LoRA of rank
16 on its attention and MLP linears trains instead (with the projector).

Run (after the align stage):
    python -m vlm_jax.main --config configs/internvl3_1b_sft.py --workdir /runs/internvl3_1b_sft \\
        --config.model.converted_dir=/data/internvl3_1b --config.data.manual_dir=/data/refcoco \\
        --config.init_from=/runs/internvl3_1b_align
    python -m vlm_jax.main --config configs/internvl3_1b_sft.py:lora ...          # LoRA instead of the full LM
    python -m vlm_jax.generative_eval --workdir /runs/internvl3_1b_sft --split validation

Result: not measured here (needs the real checkpoint, RefCOCO and an accelerator). What to expect: the validation
`lm_loss_grounding` and `lm_token_acc_grounding` during training, and from `vlm_jax.generative_eval` the grounding
accuracy at IoU >= 0.5 of the generated boxes, the metric of InternVL's RefCOCO table (`vlm_jax.grounding_eval`
reproduces the released checkpoint's own protocol).
"""

from vlm_jax.config_files import load_sibling

LM_LINEARS = "backbone/language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def get_config(arg: str | None = None):
    c = load_sibling(__file__, "internvl3_1b_align")
    c.init_from_keys = ("backbone",)  # the align run's backbone: its trained projector and the frozen towers
    c.data.name = "refcoco"
    c.data.builder_config = "refcoco"
    c.data.lm_kinds = ("grounding", "caption")
    c.model.frozen_param_dtype = "bfloat16"
    if arg == "lora":
        c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
        c.lora.targets = (LM_LINEARS,)
        c.optim.rules = ((".*/lora_(a|b)", "lora"), ("backbone/multi_modal_projector/.*", "projector"),
                         (".*", "frozen"))
        c.optim.groups = {"lora": dict(lr=2e-4, weight_decay=0.0, schedule="cosine", warmup_frac=0.03,
                                       end_lr_frac=0.0),
                          "projector": dict(c.optim.groups.projector)}
    elif arg:
        raise ValueError(f"internvl3_1b_sft.py takes no argument or 'lora', got {arg!r}")
    else:
        c.optim.rules = (("backbone/(multi_modal_projector|language_model|lm_head)/.*", "llm"), (".*", "frozen"))
        c.optim.groups = {"llm": dict(lr=2e-5, weight_decay=0.05, schedule="cosine", warmup_frac=0.03,
                                      end_lr_frac=0.0)}
        c.model.remat = "full"  # the language model's activations are differentiated now
    c.batch_size = 8
    c.num_epochs = 1.0
    c.checkpoint.best_metric = "validation/lm_token_acc_grounding"
    c.checkpoint.best_mode = "max"
    return c
