"""Tiny InternVL trained from scratch with the multitask heads on `spatial_shapes` (the default demo).

Run:
    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir /tmp/vlm_jax_demo

Measured on the 2-core CPU (3000 steps of batch 32, fresh workdir, dataset already built): 9 min 10 s before dynamic
tiles came in, 11 min 24 s for this version with another training run sharing the cores. Validation split (500
images, 1000 captions), step 3000 (chance; ceiling = best expected strict R@1, see spatial_shapes):
    retrieval text->image R@1 / R@5 / R@10 = 7.1 / 29.2 / 41.5 %   (chance 0.2 / 1 / 2 %; ceiling R@1 65.8 %)
              image->text R@1 / R@5 / R@10 = 4.2 / 21.4 / 36.4 %   (ceiling R@1 64.3 %)
              R@1 when any image the caption is true of counts: text->image 10.6 %, image->text 6.6 %
    ITM against random true negatives: balanced accuracy 0.805, AUC 0.943 (chance 0.5);
        against the hardest true negatives: 0.438, AUC 0.455
    spatial relation from the image ("the A and the B"): accuracy 83.3 %, macro-F1 0.832   (chance 17.6 %)
    subject box mean IoU 0.478, acc@0.5 55.6 %       (constant mean box: IoU 0.087)
"""

import ml_collections



def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a stage-1 workdir or a converted checkpoint dir: its modules init_from_keys replace the init
    c.init_from_keys = ("backbone",)  # top-level modules taken from init_from (a stage-1 run may give more)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "tiny"  # "tiny" (random, vocabulary sized to the tokenizer) | "converted"
    c.model.converted_dir = ""  # backbone 'converted': python -m vlm_jax.convert's output (config, weights, tokenizer)
    c.model.tokenizer = "demo"  # "demo" (BPE over the demo words) | a tokenizer directory | "" = converted_dir's
    # Overrides of InternVLConfig.tiny: the image size and the towers' sizes.
    c.model.tiny = ml_collections.ConfigDict(dict(
        image_size=64,
        vision=dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        text=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
    ))
    c.model.dtype = "float32"  # towers' compute (norm statistics, softmax, logits, heads and losses stay float32)
    c.model.frozen_param_dtype = "float32"  # storage of the frozen group; trained parameters are float32 always
    c.model.attention = "auto"  # auto | xla | cudnn | map | einsum (auto: map on CPU, cuDNN flash on NVIDIA bf16)
    c.model.remat = "none"  # none | full | a jax.checkpoint_policies name, e.g. dots_with_no_batch_dims_saveable
    # LoRA on backbone linears (vlm_jax.lora): rank 0 = off. Its factors need a trained group in optim.rules.
    c.lora = ml_collections.ConfigDict(dict(
        rank=0,
        alpha=16.0,
        dropout=0.0,  # on the update's input in training (PEFT's lora_dropout)
        targets=(),  # regexes over linear paths, e.g. "backbone/language_model/layers/self_attn/(q|v)_proj"
        vision_layers=(),  # (start, stop) of the vision tower's layers; () = all
        text_layers=(),  # (start, stop) of the language model's layers; () = all
    ))
    # Shared layers on the backbone's features (vlm_jax.multitask).
    c.model.embedding = ml_collections.ConfigDict(dict(
        adapter_dim=64,           # A: adapters Dv -> A and D -> A (seed recipe: 256)
        embed_dim=64,             # E: projectors A -> E (seed recipe: 256)
        dropout=0.1,              # after the adapters' ReLU
        vision_pool="cls",        # cls | mean | map
        tile_pool="all",          # over an image's tiles: all (vision_pool over every tile) | thumbnail (the last tile)
        text_pool="last",         # last | mean | first (seed recipe: first)
        fusion="late",            # late (pair features from the embeddings) | lm (image + caption through the LM)
        fusion_features="interact",  # late fusion: interact [u, v, u*v, |u-v|] | concat [u, v] (seed recipe)
        map_num_heads=8,          # attention pooling heads (vision_pool='map')
        logit_scale_init=1 / 0.07,
        logit_scale_max=100.0,
    ))

    # The tasks to train (vlm_jax.tasks): each weight scales that task's loss in the total.
    c.tasks = ml_collections.ConfigDict()
    c.tasks.itc = ml_collections.ConfigDict(dict(
        weight=1.0,
        matryoshka=0.0,  # > 0: adds this times the mean contrastive loss over the nested widths below
        matryoshka_dims=(16, 32, 64),
    ))
    c.tasks.itm = ml_collections.ConfigDict(dict(weight=1.0, hidden_dim=256))  # hidden_dim 0 = linear head (seed)
    # Box: weight * (l1 * L1 + giou * (1 - GIoU)). The seed recipe has weight 0.1 and L1 only; the demo adds GIoU
    # (with L1 alone the tiny box head stays at the mean box) and weight 1.0 (box IoU 0.41 vs 0.25 with 0.1 at 800
    # steps: experiments/results/ablation.jsonl).
    c.tasks.box = ml_collections.ConfigDict(dict(
        weight=1.0, l1=1.0, giou=1.0,
        head="attention",  # attention (over the ViT patch tokens) | linear (on the fused feature; seed recipe)
        num_heads=4,       # attention head
        hidden_dim=256,    # attention head's MLP (0 = the vision width)
    ))
    # The relation from the image: the head reads "the red circle and the blue square" and attends over the patches.
    c.tasks.spatial = ml_collections.ConfigDict(dict(weight=1.0, num_relations=6, query="objects", head="attention",
                                                     num_heads=4, hidden_dim=256, locate=5.0))

    # Tile size, <IMG_CONTEXT> tokens per tile and the tokenizer come from the model (pipeline.ModelInputs).
    c.data = ml_collections.ConfigDict()
    c.data.name = "spatial_shapes"  # "spatial_shapes" | "coco_captions" | "refcoco"
    c.data.builder_config = ""  # tfds config name ("" = the builder's default)
    # spatial_shapes only, instead of builder_config: overrides of its default config (spatial_shapes.make_config).
    # 64 px, 4000 / 500 / 500 images with 2 captions each (the builder's "tiny" config has only 256 train images).
    # aspect_ratios: () = square images; e.g. (2.0, 0.5, 1.0) draws each image's width / height from them.
    c.data.builder_params = ml_collections.ConfigDict(dict(image_size=64, num_train=4000, num_validation=500,
                                                           num_test=500, aspect_ratios=()))
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default, ~/tensorflow_datasets)
    c.data.manual_dir = ""  # real datasets: the folder with the user's files
    c.data.prepare = True  # build the dataset when it is not in data_dir yet
    c.data.skip_bad_records = False  # real datasets: skip (and count) missing/corrupt images instead of failing
    c.data.train_split = "train"
    c.data.num_epochs = -1  # training passes over the data; -1 = repeat forever
    c.data.num_workers = 0  # grain worker processes (0 = in the main process)
    c.data.worker_buffer_size = 2
    c.data.template = "plain"  # chat template the model was trained with: "plain" | "internvl2_5"
    c.data.max_text_length = 24
    c.data.max_prompt_length = -1  # -1 = num_image_tokens * max tiles + max_text_length + 16
    # InternVL dynamic resolution, in training and evaluation: 1 = the whole image as one tile; > 1 = min_tiles to
    # max_tiles tiles chosen by aspect ratio (+ a thumbnail).
    c.data.min_tiles = 1
    c.data.max_tiles = 1
    c.data.use_thumbnail = True
    c.data.tile_budget = 0.0  # tiles per image a batch may hold on average (0 = max_tiles + thumbnail: no re-tiling)
    c.data.tile_buckets = 4  # tile-array sizes (and prompt lengths) a batch is padded to: compiled step shapes
    # Generative targets for the lm task (vlm_jax.data.generative): question kinds made per example; () = none.
    c.data.lm_kinds = ()
    c.data.max_lm_length = -1  # -1 = room for the image block, the longest question, an answer and a box

    c.optim = ml_collections.ConfigDict()
    # Ordered (regex over '/'-joined parameter paths, group); first full match wins; 'frozen' = not trained.
    c.optim.rules = ((".*", "all"),)
    c.optim.groups = ml_collections.ConfigDict(dict(
        all=dict(lr=1e-3, weight_decay=0.01, schedule="cosine", warmup_frac=0.1, end_lr_frac=0.0)))
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.grad_clip_norm = 1.0
    c.optim.accum_steps = 1
    c.optim.decay_vectors = False

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.logical_rules = ()  # () = sharding.LOGICAL_RULES

    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_train_steps = 3000  # micro-steps; <= 0: num_epochs passes over the training images
    c.num_epochs = 1.0
    c.log_every = 250
    c.eval_every = 1500  # 0 = only at the end
    c.eval_splits = ("validation",)
    c.max_consecutive_nonfinite = 5

    # Kept: the newest checkpoint + the `keep` newest, or with best_metric "split/metric" (e.g. "validation/t2i_r1")
    # the `keep` best among those written at evaluations. A checkpoint is also written at every evaluation.
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, best_metric="", best_mode="max",
                                                  async_save=True))
    # With a frozen backbone and late fusion: the backbone's outputs are written once per split (the first pass) and
    # every later epoch and evaluation reads them (vlm_jax.feature_cache). "" = <workdir>/feature_cache.
    c.feature_cache = ml_collections.ConfigDict(dict(enabled=False, dir=""))
    return c
