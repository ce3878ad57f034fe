"""The config reference: one line per config field saying what it does, and the printed config tree.

``python -m vlm_jax.main --config configs/X.py [--config.a.b=v ...] --print_config`` prints `describe(config)`:

    # The resolved config; change a field with --config.<name>=<value>.
    seed = 0                                          # random init, data order and caption draws; ...
    ...
    model:                                            # the backbone and the shared embedding layers (...)
      model.backbone = 'tiny'                         # 'tiny': random InternVLConfig.tiny(**model.tiny) | ...

`DESCRIPTIONS` is the only place the fields are documented. Its keys are dotted field or section names; a ``*``
component stands for any one name (``optim.groups.*.lr``: every group's learning rate). Its order is the printing
order.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections

DESCRIPTIONS: dict[str, str] = {
    "seed": "random init, data order and caption draws; dropout masks use seed + 1",
    "init_from": "'' | a stage-1 workdir | a `vlm_jax.convert` output: init_from_keys start from it (unless resuming)",
    "init_from_keys": "top-level modules taken from init_from ('backbone', "
                      "'text_proj', 'tasks', ...); converted: backbone",

    "model": "the backbone and the shared embedding layers (vlm_jax.build, vlm_jax.multitask)",
    "model.backbone": "'tiny': random InternVLConfig.tiny(**model.tiny) "
                      "| 'converted': config + weights of converted_dir",
    "model.converted_dir": "backbone 'converted': the output of `python -m "
                           "vlm_jax.convert` (config, weights, tokenizer)",
    "model.tokenizer": "'demo' (BPE over the demo words) | a directory with tokenizer files | '' = converted_dir's",
    "model.tiny": "backbone 'tiny': overrides of InternVLConfig.tiny() (its fields or its vision / text fields)",
    "model.tiny.vision": "vision tower sizes (VisionConfig fields: hidden_size, num_layers, num_heads, ...)",
    "model.tiny.vision.*": "a field of VisionConfig",
    "model.tiny.text": "language model sizes (TextConfig fields: hidden_size, num_layers, num_heads, ...)",
    "model.tiny.text.*": "a field of TextConfig",
    "model.tiny.image_size": "tile side in px; LM tokens per tile = (image_size / 16)^2 (patch 8 px, pixel shuffle 2)",
    "model.dtype": "towers' compute: 'float32' | 'bfloat16' | 'float16' (norms, softmax, logits, heads: float32)",
    "model.frozen_param_dtype": "storage of the 'frozen' group: float32 | bfloat16 | float16 (trained: float32)",
    "model.attention": "'auto' (map on CPU, cuDNN flash on NVIDIA bf16, else xla) | xla | cudnn | map | einsum",
    "model.remat": "towers' backward recompute: 'none' | 'full' | a jax.checkpoint_policies name",
    "lora": "LoRA on backbone linears (vlm_jax.lora); its factors need a trained group in optim.rules",
    "lora.rank": "r: rank of the factors A [in, r], B [r, out]; 0 = no LoRA",
    "lora.alpha": "the update x A B is scaled by alpha / r",
    "lora.dropout": "dropout rate on the LoRA update's input (dropout(x) A B), training only; 0 = none",
    "lora.targets": "regexes, each matching the whole path of >= 1 linear (e.g. .../self_attn/(q|v)_proj)",
    "lora.vision_layers": "(start, stop) of the vision tower's layers that get LoRA; () = all",
    "lora.text_layers": "(start, stop) of the language model's layers that get LoRA; () = all",
    "model.embedding": "shared layers on the backbone features: adapters, projectors, temperature, pair fusion",
    "model.embedding.adapter_dim": "A: width of the vision and text adapters (Linear + ReLU + Dropout)",
    "model.embedding.embed_dim": "E: width of the L2-normalised image and text embeddings",
    "model.embedding.dropout": "dropout rate after the adapters' ReLU (training only)",
    "model.embedding.vision_pool": "ViT tokens -> one vector: 'cls' | 'mean' | 'map' (learned attention pooling)",
    "model.embedding.tile_pool": "an image's tiles -> one vector: 'all' (vision_pool over every tile) | "
                                 "'thumbnail' (the last tile)",
    "model.embedding.text_pool": "caption tokens -> one vector: 'last' (last valid "
                                 "token) | 'mean' | 'first' (sees only itself)",
    "model.embedding.fusion": "pair feature of the ITM / box / spatial heads: "
                              "'late' (from the embeddings) | 'lm' (LM last token)",
    "model.embedding.fusion_features": "fusion 'late': 'interact' [u, v, u*v, |u-v|] (4E wide) | 'concat' [u, v] (2E)",
    "model.embedding.map_num_heads": "vision_pool 'map': attention heads",
    "model.embedding.logit_scale_init": "initial contrastive logit scale (1 / temperature; learned as its log)",
    "model.embedding.logit_scale_max": "upper clip of the learned logit scale (>= logit_scale_init)",

    "tasks": "the tasks trained, one section each (itc, itm, box, spatial, detection, lm); loss: weighted sum",
    "tasks.*.weight": "scale of this task's loss in the total loss",
    "tasks.itc": "image-text contrastive retrieval: symmetric InfoNCE over in-batch negatives; metrics R@1/5/10",
    "tasks.itc.matryoshka": "> 0: adds this times the mean contrastive loss over matryoshka_dims (0 = off)",
    "tasks.itc.matryoshka_dims": "nested embedding widths (each in (0, embed_dim]) of the matryoshka loss",
    "tasks.itm": "image-text matching: a head tells the B positives from 2B in-batch hard true negatives",
    "tasks.itm.hidden_dim": "head MLP width (Linear-GELU-Linear); 0 = a linear head",
    "tasks.box": "box regression: the xyxy box (normalised to 0..1) of the object the caption names",
    "tasks.box.l1": "weight of L1 in the box loss l1 * L1 + giou * (1 - GIoU)",
    "tasks.box.giou": "weight of (1 - GIoU) in the box loss (GIoU is logged either way)",
    "tasks.box.head": "'attention' (fused feature attends over the ViT patch tokens) | 'linear' (on the fused feature)",
    "tasks.box.num_heads": "head 'attention': attention heads",
    "tasks.box.hidden_dim": "head 'attention': MLP width (0 = the vision width)",
    "tasks.spatial": "relation between a caption's two objects (left, right, above, below, inside, outside)",
    "tasks.spatial.query": "'objects': 'the red circle and the blue square', relation from the image | "
                           "'caption' (names it)",
    "tasks.spatial.head": "'attention' (over the ViT patch tokens, like the box head) | 'mlp' (on the fused feature)",
    "tasks.spatial.num_heads": "attention head: heads (each can look at one of the objects)",
    "tasks.spatial.locate": "attention head: weight of L1(heads 0, 1 attended position, subject / reference centre)",
    "tasks.spatial.num_relations": "relation classes (6: the datasets' label set)",
    "tasks.spatial.hidden_dim": "head MLP width (Linear-GELU-Linear); 0 = a linear head",
    "tasks.detection": "every object: DETR-style queries, Hungarian matching, focal objectness; COCO-style AP",
    "tasks.detection.num_queries": "Q object queries (at least the most objects an image holds)",
    "tasks.detection.width": "decoder width W (memory tokens are projected to it)",
    "tasks.detection.num_layers": "decoder layers (self-attention, cross-attention to the memory, MLP)",
    "tasks.detection.num_heads": "attention heads of the decoder",
    "tasks.detection.mlp_dim": "decoder MLP width",
    "tasks.detection.memory": "'vision' (ViT patch tokens + positions) | 'vision_text' (+ the caption's LM tokens)",
    "tasks.detection.classes": "object names as the class vocabulary; () = class-agnostic (objectness only)",
    "tasks.detection.objectness": "weight of the sigmoid focal objectness loss (and of its matching cost)",
    "tasks.detection.focal_alpha": "focal loss alpha (weight of the positives; < 0 = none)",
    "tasks.detection.focal_gamma": "focal loss gamma (down-weights easy queries)",
    "tasks.detection.l1": "weight of the matched L1 box loss on (cx, cy, w, h) (and of its matching cost)",
    "tasks.detection.giou": "weight of the matched 1 - GIoU loss (and of -GIoU in the matching cost)",
    "tasks.detection.class_weight": "weight of the matched queries' class cross-entropy (and -p(class) cost)",
    "tasks.detection.aux_loss": "the heads and losses on every decoder layer, not only the last",
    "tasks.lm": "language-model targets: next-token cross-entropy on the answers of data.lm_kinds",
    "tasks.lm.chunk_size": "> 0: logits formed this many positions at a time (no [B, T, V] float32 tensor)",
    "tasks.lm.span_weights": "weight of each answer span's tokens (vlm_jax.data.generative.SPANS)",
    "tasks.lm.span_weights.*": "weight of this span's tokens (box: a grounding answer's <box> part)",
    "tasks.detection.matching": "'jax' (on device) | 'scipy' (host callback): see vlm_jax.matching",

    "data": "dataset and input pipeline (vlm_jax.data.pipeline); tile size and tokenizer come from the model",
    "data.name": "tfds builder: 'spatial_shapes' (generated) | 'coco_captions' | 'refcoco' | 'coco_detection'",
    "data.builder_config": "tfds config ('' = default): coco_captions 'karpathy'; "
                           "refcoco 'refcoco' | 'refcocoplus' | 'refcocog'",
    "data.builder_params": "spatial_shapes without builder_config: overrides "
                           "of spatial_shapes.make_config(); else empty",
    "data.builder_params.image_size": "generated image side in px (>= 32)",
    "data.builder_params.num_train": "images in the train split (2 captions each)",
    "data.builder_params.num_validation": "images in the validation split (2 captions each)",
    "data.builder_params.num_test": "images in the test split (2 captions each)",
    "data.builder_params.*": "a field of spatial_shapes.SpatialShapesConfig",
    "data.data_dir": "tfds data_dir the dataset is built into and read from ('' = ~/tensorflow_datasets)",
    "data.manual_dir": "coco_captions / refcoco / coco_detection: the folder with the user's images and annotations",
    "data.prepare": "build the dataset into data_dir when it is not there yet (False: it must exist)",
    "data.skip_bad_records": "coco_captions / refcoco: skip and count missing "
                             "or corrupt images at build time, not fail",
    "data.train_split": "split trained on (checked against the built dataset before any work)",
    "data.num_epochs": "passes the training iterator makes over the images; -1 = forever (num_train_steps decides)",
    "data.num_workers": "grain worker processes for decoding (0 = in the main process, faster on 2 cores)",
    "data.worker_buffer_size": "batches each grain worker prepares ahead",
    "data.template": "chat template of prompt_ids ('lm' fusion, generation): 'plain' (tiny models) | 'internvl2_5'",
    "data.max_text_length": "caption tokens incl. EOS (text_ids length); longer captions are truncated and counted",
    "data.max_prompt_length": "prompt_ids length; -1 = tokens per tile * tiles + max_text_length + 16",
    "data.min_tiles": "dynamic tiles (max_tiles > 1): fewest tiles per image",
    "data.max_tiles": "dynamic resolution, training and evaluation: 1 = one whole-image tile; > 1 = up to this many",
    "data.use_thumbnail": "max_tiles > 1: add a whole-image thumbnail tile",
    "data.tile_budget": "mean tiles per image a batch may hold; over it, its largest images get fewer; 0 = no limit",
    "data.lm_kinds": "generative targets for the lm task: some of caption, grounding, relation; () = none",
    "data.max_lm_length": "longest LM sequence; longer answers are cut and counted; -1 = room for any target",
    "data.tile_buckets": "sizes the tile array and prompts are padded to (the step compiles one shape per size)",

    "optim": "parameter groups, freezing and AdamW (vlm_jax.optim)",
    "optim.rules": "ordered (regex, group) over '/'-joined parameter "
                   "paths; first full match wins; 'frozen': not trained",
    "optim.groups": "AdamW settings of each trainable group named in rules",
    "optim.groups.*": "one group's learning rate, weight decay and schedule",
    "optim.groups.*.lr": "peak learning rate",
    "optim.groups.*.weight_decay": "AdamW decoupled weight decay (matrices only unless decay_vectors)",
    "optim.groups.*.schedule": "after warmup: 'constant' | 'linear' | 'cosine' decay to end_lr_frac * lr",
    "optim.groups.*.warmup_frac": "fraction of the optimizer updates spent warming up linearly from 0",
    "optim.groups.*.end_lr_frac": "final learning rate as a fraction of lr",
    "optim.b1": "AdamW first-moment decay",
    "optim.b2": "AdamW second-moment decay",
    "optim.eps": "AdamW epsilon",
    "optim.grad_clip_norm": "clip the global norm of the trainable gradients to this (0 = off)",
    "optim.accum_steps": "micro-steps (batches) per optimizer update (gradient "
                         "accumulation, 1 = off); schedules count updates",
    "optim.decay_vectors": "also weight-decay 1-D parameters (biases, norm scales, logit scale), as torch AdamW does",

    "mesh": "device mesh axis sizes; product = device count; one axis may be -1 = the remaining devices",
    "mesh.data": "data-parallel axis (batches split over data x fsdp)",
    "mesh.fsdp": "fully sharded data-parallel axis: weights' 'embed' dimension and batches split over it",
    "mesh.tensor": "tensor-parallel axis: weights' 'mlp', 'heads' and 'vocab' dimensions split over it",
    "logical_rules": "(logical axis, mesh axis | axes | None) pairs replacing sharding.LOGICAL_RULES; () = those",

    "batch_size": "global train batch: image-caption pairs per micro-step, all processes (multiple of data x fsdp)",
    "eval_batch_size": "global evaluation batch (a multiple of data x fsdp)",
    "num_train_steps": "training micro-steps; <= 0 = num_epochs passes over the training images",
    "num_epochs": "num_train_steps <= 0: passes over the training images (each image once, one random caption)",
    "log_every": "micro-steps between training-metric logs (means over the window)",
    "eval_every": "micro-steps between evaluations of eval_splits (0 = only at the end); each writes a checkpoint",
    "eval_splits": "splits evaluated at each evaluation (() = none)",
    "max_consecutive_nonfinite": "NaN/Inf steps in a row (each skipped, state "
                                 "kept) before the run checkpoints and stops",

    "checkpoint": "orbax checkpoints in WORKDIR/checkpoints/<step>; a run resumes from the newest intact one",
    "feature_cache": "the frozen backbone's outputs on disk (vlm_jax.feature_cache); needs late fusion, no lm task",
    "feature_cache.enabled": "compute the frozen backbone once per split, then train heads from its cached outputs",
    "feature_cache.dir": "where the feature cache lives; '' = <workdir>/feature_cache",
    "checkpoint.every_steps": "micro-steps between checkpoints (also written at every evaluation and at the end)",
    "checkpoint.keep": "retention: the newest plus the keep best by best_metric (or the keep newest when it is '')",
    "checkpoint.best_metric": "'' | 'split/metric' ranking the checkpoints "
                              "written at evaluations, e.g. 'validation/t2i_r1'",
    "checkpoint.best_mode": "'max' | 'min': whether a higher or a lower best_metric is better",
    "checkpoint.async_save": "write checkpoints in the background while training goes on",
}


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` (dotted, ``*`` = any one component) names ``name``."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(w in ("*", p) for p, w in zip(parts, wanted))


def _rank(name: str) -> int:
    """Index of the first `DESCRIPTIONS` key naming ``name`` (len(DESCRIPTIONS) when none does)."""
    return next((i for i, pattern in enumerate(DESCRIPTIONS) if _matches(name, pattern)), len(DESCRIPTIONS))


def description(name: str) -> str | None:
    """The one-line description of the dotted field or section ``name``, or None."""
    rank = _rank(name)
    return list(DESCRIPTIONS.values())[rank] if rank < len(DESCRIPTIONS) else None


def walk(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, object]]:
    """``(dotted name, value)`` of every section and field, depth first, in `DESCRIPTIONS` order (fields it does not
    know last, by name); a section's value is its ConfigDict."""
    names = sorted(config.keys(), key=lambda k: (_rank(prefix + k), k))
    for key in names:
        value = config[key]
        yield prefix + key, value
        if isinstance(value, ml_collections.ConfigDict):
            yield from walk(value, f"{prefix}{key}.")


def describe(config: ml_collections.ConfigDict, comment_column: int = 48) -> str:
    """The config tree, one ``dotted.name = repr(value)`` line per field and one ``name:`` line per section,
    indented by depth, each followed by ``# description`` when `DESCRIPTIONS` has one."""
    rows = []
    for name, value in walk(config):
        depth = name.count(".")
        if isinstance(value, ml_collections.ConfigDict):
            if depth == 0:
                rows.append(("", None))
            text = f"{'  ' * depth}{name}:"
        else:
            text = f"{'  ' * depth}{name} = {value!r}"
        rows.append((text, description(name)))
    lines = ["# The resolved config; change a field with --config.<name>=<value>."]
    for text, note in rows:
        lines.append(f"{text.ljust(comment_column)}  # {note}" if note else text)
    return "\n".join(lines)
