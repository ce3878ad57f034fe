"""The seed recipe on a converted InternVL3-1B: frozen backbone, adapters + projectors + heads trained on COCO.

Frozen backbone (stored in bfloat16), float32 adapters 1024->256 / 896->256 (ReLU, dropout 0.1), projectors
256->256 + L2 norm, learnable temperature 0.07, late fusion for ITM / box / spatial heads; loss ITC + ITM +
0.1 L1(box) + 0.1 CE(spatial); AdamW lr 1e-4, weight decay 0.01, linear warmup over 10 % then linear decay;
batch 4, 5 epochs over the 113,287 Karpathy training images (141,609 steps).

Run:
    python -m vlm_jax.convert --checkpoint /path/to/InternVL3-1B-hf --output /data/internvl3_1b
    python -m vlm_jax.main --config configs/internvl3_1b_retrieval.py --workdir /runs/internvl3_1b_retrieval \\
        --config.model.converted_dir=/data/internvl3_1b --config.data.manual_dir=/data/coco

The backbone is frozen and fusion is late, so `--config.feature_cache.enabled=True` computes it once per split (a
first pass over the images and all their captions) and trains epochs 2..5 from the cached outputs: the same model,
epochs about 190x faster and the whole run about 3.6x faster at these widths with 2 layers per tower on a 2-core CPU
(experiments/benchmark_cache.py; the README's figures). The cache takes 22 KB per image with its 5 captions (pooled
float32 features): about 2.5 GB for the 113,287 Karpathy training images.

Result: not measured here (needs the real checkpoint, COCO and an accelerator; a CPU step at this size takes
seconds). experiments/benchmark_train_step.py reports its step cost relative to the forward pass.
Seed recipe's text pooling was the first token; pass --config.model.embedding.text_pool=first to reproduce it.
"""

from vlm_jax.config_files import load_sibling


def get_config():
    c = load_sibling(__file__, "tiny_synthetic")  # same fields; every value that matters is set below
    c.seed = 0
    c.init_from = ""
    c.init_from_keys = ("backbone",)

    c.model.backbone = "converted"  # config, weights and tokenizer from model.converted_dir
    c.model.converted_dir = ""  # required: the converted InternVL3-1B directory (python -m vlm_jax.convert)
    c.model.tokenizer = ""  # the converted directory's own tokenizer files
    c.model.dtype = "bfloat16"  # towers' compute; adapters, heads, norm statistics, softmax and losses stay float32
    c.model.frozen_param_dtype = "bfloat16"  # the frozen backbone; trained parameters are float32 master copies
    c.model.attention = "auto"  # cuDNN flash attention on an NVIDIA GPU, 'map' on CPU
    c.model.remat = "none"  # nothing of the frozen towers is differentiated: remat would save nothing
    c.model.embedding.adapter_dim = 256
    c.model.embedding.embed_dim = 256
    c.model.embedding.dropout = 0.1
    c.model.embedding.vision_pool = "cls"
    c.model.embedding.text_pool = "last"
    c.model.embedding.fusion = "late"
    c.model.embedding.logit_scale_init = 1 / 0.07
    # The seed recipe's heads: linear heads on the concatenated embeddings (the improved defaults are
    # interaction features, MLP heads and an attention box head; see the README's ablation).
    c.model.embedding.fusion_features = "concat"
    c.tasks.itc.weight, c.tasks.itc.matryoshka = 1.0, 0.0
    c.tasks.itc.matryoshka_dims = (32, 64, 128, 256)
    c.tasks.itm.weight, c.tasks.itm.hidden_dim = 1.0, 0
    c.tasks.box.weight, c.tasks.box.l1, c.tasks.box.giou = 0.1, 1.0, 0.0  # the seed recipe's box loss is L1 only
    c.tasks.box.head = "linear"
    c.tasks.spatial.weight, c.tasks.spatial.hidden_dim = 0.1, 0
    c.tasks.spatial.query, c.tasks.spatial.head = "caption", "mlp"  # the seed recipe reads the caption

    c.data.name = "coco_captions"
    c.data.builder_config = "karpathy"
    c.data.builder_params = {}  # spatial_shapes only
    c.data.manual_dir = ""  # the folder with the COCO images and dataset_coco.json
    c.data.template = "internvl2_5"
    c.data.max_text_length = 40
    c.data.num_workers = 4

    c.optim.rules = (("backbone/.*", "frozen"), (".*", "heads"))
    c.optim.groups = {"heads": dict(lr=1e-4, weight_decay=0.01, schedule="linear", warmup_frac=0.1,
                                    end_lr_frac=0.0)}
    c.optim.grad_clip_norm = 0.0
    c.optim.accum_steps = 1
    c.optim.decay_vectors = True  # torch AdamW decays every parameter

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.batch_size = 4
    c.eval_batch_size = 64
    c.num_train_steps = -1  # from num_epochs
    c.num_epochs = 5.0
    c.log_every = 100
    c.eval_every = 28322  # once per epoch
    c.eval_splits = ("validation", "test")
    c.max_consecutive_nonfinite = 10
    c.checkpoint.every_steps = 5000
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "validation/t2i_r1"
    c.checkpoint.best_mode = "max"
    return c
