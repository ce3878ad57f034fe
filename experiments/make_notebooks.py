"""Writes the notebooks in experiments/ (without outputs) from the cell sources below.

    python experiments/make_notebooks.py

The .ipynb files are committed; edit the cells here and rerun, so that every notebook shares the same install and
parameter conventions:
- cell 1 installs vlm_jax on Colab (clone REPO_URL, `pip install -e`) and is skipped when `vlm_jax` is importable;
- cell 2 (tagged "parameters", papermill style) holds every setting; `VLM_JAX_NOTEBOOK_TINY=1` selects the tiny
  settings the tests run (tests/test_notebooks.py), other `VLM_JAX_NOTEBOOK_*` variables move the output folders.
"""

from __future__ import annotations

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = '''\
# Install: on Colab (or any machine without vlm_jax) clone the repository and install it; skipped when vlm_jax is
# already importable. Set REPO_URL to the repository you use.
REPO_URL = "https://github.com/YOUR_ORG/vlm_jax.git"
CHECKOUT = "/content/vlm_jax"

import importlib.util
import os
import shutil
import subprocess
import sys

if importlib.util.find_spec("vlm_jax") is None:
    parent = os.path.abspath("..")  # the notebook opened from experiments/ of a checkout
    if os.path.isfile(os.path.join(parent, "setup.py")) and os.path.isdir(os.path.join(parent, "vlm_jax")):
        CHECKOUT = parent
    elif not os.path.isdir(CHECKOUT):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, CHECKOUT], check=True)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if shutil.which("nvidia-smi"):  # Colab GPU runtime: the CUDA build of the pinned jax
        subprocess.run(pip + ["jax[cuda12]==0.10.2"], check=True)
    elif os.environ.get("COLAB_TPU_ADDR") or os.path.exists("/dev/accel0"):  # Colab TPU runtime
        subprocess.run(pip + ["jax[tpu]==0.10.2"], check=True)
    subprocess.run(pip + ["-e", f"{CHECKOUT}[notebooks]"], check=True)
    sys.path.insert(0, CHECKOUT)  # an editable install reaches sys.path only in new interpreters
    importlib.invalidate_caches()
    print("installed vlm_jax; if pip replaced a package this runtime had already imported, restart the runtime "
          "and run again (this cell is then skipped)")
else:
    print("vlm_jax is importable: skipping the install")
'''

# ---------------------------------------------------------------------------------------------------------------
# quickstart.ipynb

QUICKSTART = [
    ("markdown", '''\
# vlm_jax quickstart: convert, tile, embed, score, generate

1. Convert a Hugging Face InternVL checkpoint to a vlm_jax (orbax) checkpoint. Without a checkpoint path, a small
   random one is generated, so every step below runs anywhere in seconds (its answers are random text, and its
   similarities carry no meaning).
2. Split an image into InternVL dynamic tiles.
3. Embed images and captions with the language model and show their cosine similarities.
4. Generate a short answer about an image.'''),
    ("code", INSTALL),
    ("parameters", '''\
import os

TINY = os.environ.get("VLM_JAX_NOTEBOOK_TINY", "0") == "1"  # the tests' settings
# A Hugging Face InternVL3 checkpoint directory (e.g. a local snapshot of OpenGVLab/InternVL3-1B-hf);
# "" = generate a small random checkpoint.
CHECKPOINT = os.environ.get("VLM_JAX_CHECKPOINT", "")
OUTPUT_DIR = os.environ.get("VLM_JAX_NOTEBOOK_DIR", "/tmp/vlm_jax_quickstart")
MAX_TILES = 4 if TINY else 6
MAX_NEW_TOKENS = 8 if TINY else 32
NUM_IMAGES = 4'''),
    ("code", '''\
%matplotlib inline
import numpy as np

import vlm_jax
from vlm_jax import generation, inference, viz
from vlm_jax.checkpoints.random_hf import write_random_checkpoint
from vlm_jax.convert import convert
from vlm_jax.data import preprocess
from vlm_jax.data.datasets import spatial_shapes
from vlm_jax.data.tokenizer import build_demo_tokenizer, load_tokenizer
from vlm_jax.models.config import InternVLConfig'''),
    ("markdown", '''\
## 1. Convert a checkpoint

Same as `python -m vlm_jax.convert --checkpoint HF_DIR --output OUT_DIR`. The random checkpoint is written in the
transformers layout with a small tokenizer that knows the caption words of the `spatial_shapes` dataset.'''),
    ("code", '''\
hf_dir = CHECKPOINT
if not hf_dir:
    hf_dir = os.path.join(OUTPUT_DIR, "hf")
    tokenizer = build_demo_tokenizer(spatial_shapes.VOCABULARY)
    config = InternVLConfig.tiny(
        image_size=64, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        vision=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
        text=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128))
    write_random_checkpoint(hf_dir, config, layout="transformers", seed=0)
    tokenizer.save_pretrained(hf_dir)

converted_dir = os.path.join(OUTPUT_DIR, "converted")
info = convert(hf_dir, converted_dir)
print(f"{info['layout']} layout -> {converted_dir} in {info['load_s'] + info['save_s']:.1f} s")

model = vlm_jax.load_pretrained(converted_dir)
tokenizer = load_tokenizer(converted_dir)
print(f"tile size {model.config.image_size} px, {model.config.num_image_tokens} image tokens per tile, "
      f"vocabulary {model.config.text.vocab_size}")'''),
    ("markdown", '''\
## 2. Dynamic tiles

InternVL splits an image into up to `max_tiles` square tiles on the grid whose aspect ratio is closest to the
image's, plus a thumbnail of the whole image. Here: two `spatial_shapes` scenes side by side (a 2:1 image).'''),
    ("code", '''\
scene = spatial_shapes.make_config(image_size=2 * model.config.image_size, num_test=NUM_IMAGES)
examples = [spatial_shapes.generate_example(scene, "test", i) for i in range(NUM_IMAGES)]
wide = np.concatenate([examples[0]["image"], examples[1]["image"]], axis=1)  # uint8[S, 2S, 3]
tiles = preprocess.dynamic_tiles(wide, image_size=model.config.image_size, max_tiles=MAX_TILES)
print("tiles:", tiles.shape)
viz.show_tiles(tiles);'''),
    ("markdown", '''\
## 3. Image and caption embeddings

`encode_images` runs each image (one tile) through the language model and takes the last hidden state;
`encode_texts` does the same for the captions. Both are unit vectors in the language model's space, so their dot
products are the cosine similarities `inference.score` returns.'''),
    ("code", '''\
images = [ex["image"] for ex in examples]
captions = [ex["captions"][0] for ex in examples]
image_emb = inference.encode_images(model.module, images, tokenizer=tokenizer)
text_emb = inference.encode_texts(model.module, captions, tokenizer=tokenizer)
sim = image_emb @ text_emb.T  # float32[images, captions]
print("image embeddings", image_emb.shape, "caption embeddings", text_emb.shape)
viz.similarity_heatmap(sim, [f"image {i}" for i in range(len(images))], captions);'''),
    ("markdown", '''\
## 4. Generate

The prompt goes through the InternVL chat template with the image's tiles; decoding is greedy with the KV cache
and stops at `<|im_end|>`.'''),
    ("code", '''\
result = generation.generate(model.module, tokenizer, images=wide, prompt="Which shapes are in the picture?",
                             max_new_tokens=MAX_NEW_TOKENS, max_tiles=MAX_TILES)
print(f"{len(result.prompt_ids)} prompt tokens -> {len(result.token_ids)} new tokens")
print(repr(result.text))'''),
]

# ---------------------------------------------------------------------------------------------------------------
# train_spatial_shapes.ipynb

TRAIN = [
    ("markdown", '''\
# Train the multitask heads on `spatial_shapes`

A tiny InternVL with the multitask heads (image-text contrastive, image-text matching, subject box, spatial
relation), trained from scratch on procedurally drawn shapes, with the same code as

    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir WORKDIR

The workdir gets orbax checkpoints, TensorBoard events and `metrics.jsonl` (one line per evaluation);
`restore_and_evaluate.ipynb` reads it back.'''),
    ("code", INSTALL),
    ("parameters", '''\
import os

TINY = os.environ.get("VLM_JAX_NOTEBOOK_TINY", "0") == "1"  # the tests' settings: few images, few steps
WORKDIR = os.environ.get("VLM_JAX_NOTEBOOK_WORKDIR", "/tmp/vlm_jax_spatial_shapes")
DATA_DIR = os.environ.get("VLM_JAX_NOTEBOOK_DATA_DIR", "")  # tfds data_dir; "" = ~/tensorflow_datasets
NUM_STEPS = 20 if TINY else 300
BATCH_SIZE = 8 if TINY else 32
EVAL_EVERY = 10 if TINY else 50
NUM_EXAMPLES = 8'''),
    ("code", '''\
%matplotlib inline
import importlib.util
import pathlib

import jax
import numpy as np

import vlm_jax
from vlm_jax import checkpointing, evaluate, metrics, sharding, train, viz
from vlm_jax.data import pipeline
from vlm_jax.data.datasets.relations import RELATIONS


def load_config(name):
    """configs/<name>.py of the repository (the configs are Python files next to the package)."""
    path = pathlib.Path(vlm_jax.__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()'''),
    ("markdown", '''\
## Config

`configs/tiny_synthetic.py` with a few overrides (the notebook's `--config.x=y`). The tiny settings shrink the
dataset to 64/32/32 images and the schedule to a few steps.'''),
    ("code", '''\
config = load_config("tiny_synthetic")
config.data.data_dir = DATA_DIR
config.num_train_steps = NUM_STEPS
config.batch_size = BATCH_SIZE
config.log_every = 5
config.eval_every = EVAL_EVERY
config.checkpoint.every_steps = NUM_STEPS
if TINY:
    config.data.builder_params = dict(image_size=64, num_train=64, num_validation=32, num_test=32)
print(f"{NUM_STEPS} steps of batch {config.batch_size}, images {config.data.image_size} px, "
      f"heads: {config.model.heads.to_dict()}")'''),
    ("markdown", "## The dataset\n\nEach image has two captions; the subject's box is solid green, the reference "
                 "object's box dotted blue."),
    ("code", '''\
builder = pipeline.make_builder(config.data)  # builds the tfds dataset on first use
print({split: info.num_examples for split, info in builder.info.splits.items()})
train_source = builder.as_data_source(split="train")
records = [train_source[i] for i in range(NUM_EXAMPLES)]


def text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


viz.examples_grid([r["image"] for r in records], [text(r["captions"][0]) for r in records],
                  boxes=np.stack([r["boxes"][0] for r in records]),
                  reference_boxes=np.stack([r["reference_boxes"][0] for r in records]));'''),
    ("markdown", '''\
## Train

`train_and_evaluate` resumes from the latest checkpoint in `WORKDIR` (rerunning this cell after a finished run
returns at once). It returns the last evaluation of each split in `config.eval_splits`.'''),
    ("code", '''\
results = train.train_and_evaluate(config, WORKDIR)
for split, values in results.items():
    print(split, {k: round(v, 3) for k, v in values.items() if not k.startswith("loss/")})'''),
    ("markdown", "## Curves from `metrics.jsonl`\n\nDashed lines: chance levels recorded with the metrics."),
    ("code", '''\
records = viz.read_metrics(WORKDIR)
viz.plot_metrics(records, ["loss/total", "loss/itc", "loss/itm", "loss/box", "loss/spatial", "t2i_r1", "i2t_r5",
                           "box_iou", "spatial_acc"]);'''),
    ("markdown", '''\
## Predictions on the test split

Restore the latest checkpoint, run the eval step over the test split and keep every example's outputs
(`evaluate.collect`): predicted box (dashed magenta) against the true subject box (green), and the spatial
relation predicted from the caption and the image.'''),
    ("code", '''\
mesh = sharding.make_mesh(config.mesh)
trainer = train.make_trainer(config, mesh)
manager = checkpointing.make_manager(WORKDIR, config.checkpoint)
model_state, train_items, _ = checkpointing.restore(manager, manager.latest_step(), trainer.abstract_model,
                                                    trainer.abstract_train_items())
state = trainer.assemble(model_state, train_items)
collected = evaluate.collect(lambda batch: trainer.eval_step(state, batch),
                             train.make_data(config, "test", train=False), config.eval_batch_size,
                             lambda batch: sharding.global_batch(batch, mesh))

# Eval rows are the (image, caption) pairs of the split in order: record i, caption k.
test_source = builder.as_data_source(split="test")
pairs = [(test_source[i], k) for i in range(len(test_source)) for k in range(len(test_source[i]["captions"]))]
assert [int(r["image_id"]) for r, _ in pairs] == collected["image_id"].tolist()
predicted = collected["spatial_logits"].argmax(-1)
print(f"test: {len(pairs)} captions, spatial accuracy {np.mean(predicted == collected['relation']):.3f}")'''),
    ("code", '''\
show = range(NUM_EXAMPLES)
viz.examples_grid([pairs[i][0]["image"] for i in show], [text(pairs[i][0]["captions"][pairs[i][1]]) for i in show],
                  boxes=collected["box"][:NUM_EXAMPLES], pred_boxes=collected["box_pred"][:NUM_EXAMPLES],
                  box_labels=[f"true {RELATIONS[collected['relation'][i]]}, predicted {RELATIONS[predicted[i]]}"
                              for i in show]);'''),
    ("code", '''\
confusion = metrics.confusion_matrix(predicted, collected["relation"], len(RELATIONS))
viz.plot_confusion_matrix(confusion, RELATIONS, title="spatial relation (test)");'''),
]

# ---------------------------------------------------------------------------------------------------------------
# restore_and_evaluate.ipynb

RESTORE = [
    ("markdown", '''\
# Restore a training checkpoint and evaluate it

Reads the latest (or a chosen) orbax checkpoint of a training workdir, from `train_spatial_shapes.ipynb` or from

    python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir WORKDIR

with the config saved in the checkpoint, evaluates it (retrieval R@K both ways, box IoU, spatial accuracy) and shows
the top-5 captions the model retrieves for a few images.'''),
    ("code", INSTALL),
    ("parameters", '''\
import os

TINY = os.environ.get("VLM_JAX_NOTEBOOK_TINY", "0") == "1"
WORKDIR = os.environ.get("VLM_JAX_NOTEBOOK_WORKDIR", "/tmp/vlm_jax_spatial_shapes")  # the training notebook's
STEP = None  # None = the latest checkpoint
SPLIT = "validation"  # the split the training run evaluates, so the numbers can be compared with its log
NUM_IMAGES = 3 if TINY else 6
TOP_K = 5'''),
    ("code", '''\
%matplotlib inline
import json

import ml_collections
import numpy as np

from vlm_jax import checkpointing, evaluate, sharding, train, viz
from vlm_jax.data import pipeline'''),
    ("markdown", "## Restore\n\nThe checkpoint's `meta` item holds the run's config, so nothing else is needed."),
    ("code", '''\
meta = checkpointing.read_meta(WORKDIR, STEP)
config = ml_collections.ConfigDict(json.loads(meta["config"]))
mesh = sharding.make_mesh(config.mesh)
trainer = train.make_trainer(config, mesh)
manager = checkpointing.make_manager(WORKDIR, config.checkpoint)
step = manager.latest_step() if STEP is None else STEP
model_state, train_items, _ = checkpointing.restore(manager, step, trainer.abstract_model,
                                                    trainer.abstract_train_items())
state = trainer.assemble(model_state, train_items)
print(f"restored step {step} of {WORKDIR} (weights from: {meta['source']})")'''),
    ("markdown", '''\
## Evaluate

`evaluate.collect` runs the eval step over every (image, caption) pair of the split; `evaluate.compute_metrics` is
what `train_and_evaluate` and `main.py --mode eval` report.'''),
    ("code", '''\
collected = evaluate.collect(lambda batch: trainer.eval_step(state, batch),
                             train.make_data(config, SPLIT, train=False), config.eval_batch_size,
                             lambda batch: sharding.global_batch(batch, mesh))
results = evaluate.compute_metrics(collected)
for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "box_iou", "spatial_acc", "loss/total"):
    chance = results.get(f"chance/{key}")
    print(f"{key:12s} {results[key]:.3f}" + (f"   (chance {chance:.3f})" if chance is not None else ""))
logged = [r for r in viz.read_metrics(WORKDIR) if r["step"] == step and r.get("split") == SPLIT]
if logged:
    print(f"logged during training at step {step}: t2i_r1 {logged[-1]['t2i_r1']:.3f}, "
          f"spatial_acc {logged[-1]['spatial_acc']:.3f}")'''),
    ("markdown", '''\
## Retrieval examples

Every caption of the split is a candidate; an image's own captions are green, other images' captions red.'''),
    ("code", '''\
source = pipeline.make_builder(config.data).as_data_source(split=SPLIT)
pairs = [(source[i], k) for i in range(len(source)) for k in range(len(source[i]["captions"]))]
assert [int(r["image_id"]) for r, _ in pairs] == collected["image_id"].tolist()


def text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


captions = [text(r["captions"][k]) for r, k in pairs]
ids, first = np.unique(collected["image_id"], return_index=True)
image_emb = collected["image_emb"][first] / np.linalg.norm(collected["image_emb"][first], axis=-1, keepdims=True)
text_emb = collected["text_emb"] / np.linalg.norm(collected["text_emb"], axis=-1, keepdims=True)
sim = image_emb @ text_emb.T  # [images, captions]
top = viz.top_k_captions(sim, TOP_K)
show = range(NUM_IMAGES)
own = [[c for c, i in zip(captions, collected["image_id"]) if i == ids[k]] for k in show]
viz.retrieval_examples([pairs[first[i]][0]["image"] for i in show], [[captions[j] for j in top[i]] for i in show],
                       [[collected["image_id"][j] == ids[i] for j in top[i]] for i in show],
                       [[sim[i, j] for j in top[i]] for i in show], titles=["; ".join(c) for c in own]);'''),
]


COLAB = "https://colab.research.google.com/github/YOUR_ORG/vlm_jax/blob/main/experiments/{}.ipynb"


def build(name: str, cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for index, (kind, source) in enumerate(cells):
        if index == 0:  # the title cell: a link that opens the notebook on Colab
            source += f"\n\n[Open in Colab]({COLAB.format(name)}) (set `REPO_URL` in the first code cell)"
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    # Stable cell ids: regenerating an unchanged notebook gives the same file.
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    nbformat.validate(nb)
    return nb


NOTEBOOKS = {"quickstart": QUICKSTART, "train_spatial_shapes": TRAIN, "restore_and_evaluate": RESTORE}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        path = os.path.join(HERE, f"{name}.ipynb")
        nbformat.write(build(name, cells), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
