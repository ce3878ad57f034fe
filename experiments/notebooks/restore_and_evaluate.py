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
# # Restore a training checkpoint and evaluate it
#
# Reads the latest (or a chosen) orbax checkpoint of a training workdir, from `train_spatial_shapes.ipynb` or from
#
#     python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir WORKDIR
#
# with the config saved in the checkpoint, evaluates it (retrieval R@K both ways, box IoU, spatial accuracy) and shows
# the top-5 captions the model retrieves for a few images.
#
# **On Colab**: open this notebook from your fork (File > Open notebook > GitHub, or
# `https://colab.research.google.com/github/<owner>/<repo>/blob/main/experiments/restore_and_evaluate.ipynb`)
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

TINY = os.environ.get("VLM_JAX_NOTEBOOK_TINY", "0") == "1"
WORKDIR = os.environ.get("VLM_JAX_NOTEBOOK_WORKDIR", "/tmp/vlm_jax_spatial_shapes")  # the training notebook's
STEP = None  # None = the latest checkpoint
SPLIT = "validation"  # the split the training run evaluates, so the numbers can be compared with its log
NUM_IMAGES = 3 if TINY else 6
TOP_K = 5

# %%
# %matplotlib inline
import numpy as np

from vlm_jax import runs, viz
from vlm_jax.data import pipeline

# %% [markdown]
# ## Restore
#
# The checkpoint holds the run's config (`run.config`), so nothing else is needed.

# %%
run = runs.restore_run(WORKDIR, step=STEP)
print(f"restored step {run.step} of {WORKDIR} (weights from: {run.meta['source']})")

# %% [markdown]
# ## Evaluate
#
# `runs.evaluate_split` runs the eval step over every (image, caption) pair of the split and returns the metrics
# that `train_and_evaluate` and `main.py --mode eval` report (the names in `metrics.jsonl`).

# %%
results = runs.evaluate_split(run, SPLIT)
for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "box_iou", "spatial_acc", "loss/total"):
    chance = results.get(f"chance/{key}")
    print(f"{key:12s} {results[key]:.3f}" + (f"   (chance {chance:.3f})" if chance is not None else ""))
logged = [r for r in viz.read_metrics(WORKDIR) if r["step"] == run.step and r.get("split") == SPLIT]
if logged:
    print(f"logged during training at step {run.step}: t2i_r1 {logged[-1]['t2i_r1']:.3f}, "
          f"spatial_acc {logged[-1]['spatial_acc']:.3f}")

# %% [markdown]
# ## Retrieval examples
#
# `runs.collect_split` keeps every example's outputs (here the image and caption embeddings). Every caption of the
# split is a candidate; an image's own captions are green, other images' captions red.

# %%
collected = runs.collect_split(run, SPLIT)
source = pipeline.make_builder(run.config.data).as_data_source(split=SPLIT)
# Collected rows are the (image, caption) pairs of the split in order: record i, caption k.
pairs = [(source[i], k) for i in range(len(source)) for k in range(len(source[i]["captions"]))]
assert [int(r["image_id"]) for r, _ in pairs] == collected["image_id"].tolist()


def text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


captions = [text(r["captions"][k]) for r, k in pairs]
ids, first = np.unique(collected["image_id"], return_index=True)
image_emb = collected["image_emb"][first] / np.linalg.norm(collected["image_emb"][first], axis=-1, keepdims=True)
text_emb = collected["text_emb"] / np.linalg.norm(collected["text_emb"], axis=-1, keepdims=True)
sim = image_emb @ text_emb.T  # float32[images, captions]
top = viz.top_k_captions(sim, TOP_K)
show = range(NUM_IMAGES)
own = [[c for c, i in zip(captions, collected["image_id"]) if i == ids[k]] for k in show]
viz.retrieval_examples([pairs[first[i]][0]["image"] for i in show], [[captions[j] for j in top[i]] for i in show],
                       [[collected["image_id"][j] == ids[i] for j in top[i]] for i in show],
                       [[sim[i, j] for j in top[i]] for i in show], titles=["; ".join(c) for c in own]);
