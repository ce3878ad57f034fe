# ---
# jupyter:
#   jupytext:
#     formats: ipynb,notebooks//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train the multitask heads on `spatial_shapes`
#
# A tiny InternVL with the multitask heads (image-text contrastive, image-text matching, subject box, spatial
# relation), trained from scratch on procedurally drawn shapes, with the same code as
#
#     python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir WORKDIR
#
# The workdir gets orbax checkpoints, TensorBoard events and `metrics.jsonl` (one line per evaluation);
# `restore_and_evaluate.ipynb` reads it back.
#
# **On Colab**: open this notebook from your fork (File > Open notebook > GitHub, or
# `https://colab.research.google.com/github/<owner>/<repo>/blob/main/experiments/train_spatial_shapes.ipynb`)
# or upload it (File > Upload notebook). Then set `REPO_URL` in the first code cell to your fork's git URL, or
# upload a wheel built in a checkout with `pip wheel --no-deps .` to `/content`.

# %%
# @title Install vlm_jax
# Skipped where vlm_jax is importable. Otherwise installs, in this order: the checkout this notebook was opened in,
# an uploaded wheel (vlm_jax-*.whl in the working folder or /content), a clone of REPO_URL.
# Your fork's git URL, e.g. https://github.com/<owner>/<repo>.git (leave empty to use a checkout or a wheel):
REPO_URL = ""  # @param {type:"string"}

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

# Not named vlm_jax: the working folder is on sys.path, where a folder of that name would pass for the package.
CHECKOUT = os.path.abspath("vlm_jax-src")


def install_vlm_jax(repo_url: str, checkout: str, run=subprocess.run) -> str:
    """Installs vlm_jax (with the `notebooks` extra) unless it is importable; returns what it did.

    repo_url: git URL cloned into `checkout` when there is neither a surrounding checkout nor an uploaded wheel.
    run: runs one command (subprocess.run's signature).
    """
    if importlib.util.find_spec("vlm_jax") is not None:
        return "vlm_jax is importable: skipping the install"
    # experiments/*.ipynb and experiments/notebooks/*.py opened inside a checkout
    local = [os.path.abspath(p) for p in ("..", os.path.join("..", ".."))
             if os.path.isfile(os.path.join(p, "setup.py")) and os.path.isdir(os.path.join(p, "vlm_jax"))]
    wheels = sorted(glob.glob("vlm_jax-*.whl") + glob.glob("/content/vlm_jax-*.whl"), key=os.path.getmtime)
    editable = None
    if local:
        editable = source = local[0]
    elif wheels:
        source = os.path.abspath(wheels[-1])  # the latest upload
    elif repo_url:
        if not os.path.isdir(checkout):
            run(["git", "clone", "--depth", "1", repo_url, checkout], check=True)
        editable, source = checkout, repo_url
    else:
        raise RuntimeError("vlm_jax is not installed and this notebook is not in a checkout: set REPO_URL at the top "
                           "of this cell to your fork's git URL, or upload a wheel built in a checkout with "
                           "`pip wheel --no-deps .` (vlm_jax-*.whl) to /content, then run this cell again")
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if shutil.which("nvidia-smi"):  # Colab GPU runtime: the CUDA build of the pinned jax
        run(pip + ["jax[cuda12]==0.10.2"], check=True)
    elif os.environ.get("COLAB_TPU_ADDR") or os.path.exists("/dev/accel0"):  # Colab TPU runtime
        run(pip + ["jax[tpu]==0.10.2"], check=True)
    run(pip + (["-e", f"{editable}[notebooks]"] if editable else [f"{source}[notebooks]"]), check=True)
    if editable:
        sys.path.insert(0, editable)  # an editable install reaches sys.path only in new interpreters
    importlib.invalidate_caches()
    return (f"installed vlm_jax from {source}; if pip replaced a package this runtime had already imported, restart "
            "the runtime and run again (this cell is then skipped)")


print(install_vlm_jax(REPO_URL, CHECKOUT))

# %% tags=["parameters"]
import os

TINY = os.environ.get("VLM_JAX_NOTEBOOK_TINY", "0") == "1"  # the tests' settings: few images, few steps
WORKDIR = os.environ.get("VLM_JAX_NOTEBOOK_WORKDIR", "/tmp/vlm_jax_spatial_shapes")
DATA_DIR = os.environ.get("VLM_JAX_NOTEBOOK_DATA_DIR", "")  # tfds data_dir; "" = ~/tensorflow_datasets
NUM_STEPS = 20 if TINY else 300
BATCH_SIZE = 8 if TINY else 32
EVAL_EVERY = 10 if TINY else 50
NUM_EXAMPLES = 8

# %%
# %matplotlib inline
import pathlib

import numpy as np

import vlm_jax
from vlm_jax import config_files, metrics, runs, train, viz
from vlm_jax.data import pipeline
from vlm_jax.data.datasets.relations import RELATIONS
from vlm_jax import build

CONFIGS = pathlib.Path(vlm_jax.__file__).resolve().parents[1] / "configs"  # the repository's configs/

# %% [markdown]
# ## Config
#
# `configs/tiny_synthetic.py` with a few overrides (the notebook's `--config.x=y`). The tiny settings shrink the
# dataset to 64/32/32 images and the schedule to a few steps.

# %%
config = config_files.load_config_file(CONFIGS / "tiny_synthetic.py")
config.data.data_dir = DATA_DIR
config.num_train_steps = NUM_STEPS
config.batch_size = BATCH_SIZE
config.log_every = 5
config.eval_every = EVAL_EVERY
config.checkpoint.every_steps = NUM_STEPS
if TINY:
    config.data.builder_params.update(num_train=64, num_validation=32, num_test=32)
image_size = build.resolve_backbone(config.model).config.image_size  # the model decides the tile size
weights = {name: task.weight for name, task in config.tasks.items()}
print(f"{NUM_STEPS} steps of batch {config.batch_size}, images {image_size} px, task weights {weights}")

# %% [markdown]
# ## The dataset
#
# Each image has two captions; the subject's box is solid green, the reference object's box dotted blue.

# %%
builder = pipeline.make_builder(config.data)  # builds the tfds dataset on first use
print({split: info.num_examples for split, info in builder.info.splits.items()})
train_source = builder.as_data_source(split="train")
records = [train_source[i] for i in range(NUM_EXAMPLES)]


def text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


viz.examples_grid([r["image"] for r in records], [text(r["captions"][0]) for r in records],
                  boxes=np.stack([r["boxes"][0] for r in records]),
                  reference_boxes=np.stack([r["reference_boxes"][0] for r in records]));

# %% [markdown]
# ## Train
#
# `train_and_evaluate` resumes from the latest checkpoint in `WORKDIR` (rerunning this cell after a finished run
# returns at once). It returns the last evaluation of each split in `config.eval_splits`.

# %%
results = train.train_and_evaluate(config, WORKDIR)
for split, values in results.items():
    print(split, {k: round(v, 3) for k, v in values.items() if not k.startswith("loss/")})

# %% [markdown]
# ## Curves from `metrics.jsonl`
#
# Dashed lines: chance levels recorded with the metrics.

# %%
records = viz.read_metrics(WORKDIR)
viz.plot_metrics(records, ["loss/total", "loss/itc", "loss/itm", "loss/box", "loss/spatial", "t2i_r1", "i2t_r5",
                           "box_iou", "spatial_acc"]);

# %% [markdown]
# ## Predictions on the test split
#
# Restore the latest checkpoint (`runs.restore_run`), run the eval step over the test split and keep every
# example's outputs (`runs.collect_split`): predicted box (dashed magenta) against the true subject box (green), and
# the spatial relation predicted from the caption and the image.

# %%
run = runs.restore_run(WORKDIR)
collected = runs.collect_split(run, "test")

# Collected rows are the (image, caption) pairs of the split in order: record i, caption k.
test_source = builder.as_data_source(split="test")
pairs = [(test_source[i], k) for i in range(len(test_source)) for k in range(len(test_source[i]["captions"]))]
assert [int(r["image_id"]) for r, _ in pairs] == collected["image_id"].tolist()
predicted = collected["spatial_logits"].argmax(-1)
accuracy = np.mean(predicted == collected["relation"])
print(f"step {run.step}, test: {len(pairs)} captions, spatial accuracy {accuracy:.3f}")

# %%
show = range(NUM_EXAMPLES)
viz.examples_grid([pairs[i][0]["image"] for i in show], [text(pairs[i][0]["captions"][pairs[i][1]]) for i in show],
                  boxes=collected["box"][:NUM_EXAMPLES], pred_boxes=collected["box_pred"][:NUM_EXAMPLES],
                  box_labels=[f"true {RELATIONS[collected['relation'][i]]}, predicted {RELATIONS[predicted[i]]}"
                              for i in show]);

# %%
confusion = metrics.confusion_matrix(predicted, collected["relation"], len(RELATIONS))
viz.plot_confusion_matrix(confusion, RELATIONS, title="spatial relation (test)");
