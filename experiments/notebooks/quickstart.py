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
# # vlm_jax quickstart: convert, tile, embed, score, generate
#
# 1. Convert a Hugging Face InternVL checkpoint to a vlm_jax (orbax) checkpoint. Without a checkpoint path, a small
#    random one is generated, so every step below runs anywhere in seconds (its answers are random text, and its
#    similarities carry no meaning).
# 2. Split an image into InternVL dynamic tiles.
# 3. Embed images and captions with the language model and show their cosine similarities.
# 4. Generate a short answer about an image.
#
# **On Colab**: open this notebook from your fork (File > Open notebook > GitHub, or
# `https://colab.research.google.com/github/<owner>/<repo>/blob/main/experiments/quickstart.ipynb`)
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

TINY = os.environ.get("VLM_JAX_NOTEBOOK_TINY", "0") == "1"  # the tests' settings
# A Hugging Face InternVL3 checkpoint directory (e.g. a local snapshot of OpenGVLab/InternVL3-1B-hf);
# "" = generate a small random checkpoint.
CHECKPOINT = os.environ.get("VLM_JAX_CHECKPOINT", "")
OUTPUT_DIR = os.environ.get("VLM_JAX_NOTEBOOK_DIR", "/tmp/vlm_jax_quickstart")
MAX_TILES = 4 if TINY else 6
MAX_NEW_TOKENS = 8 if TINY else 32
NUM_IMAGES = 4

# %%
# %matplotlib inline
import numpy as np

import vlm_jax
from vlm_jax import generation, inference, viz
from vlm_jax.checkpoints.random_hf import write_random_checkpoint
from vlm_jax.convert import convert
from vlm_jax.data import preprocess
from vlm_jax.data.datasets import spatial_shapes
from vlm_jax.models.config import InternVLConfig
from vlm_jax.tokenizer import load_tokenizer, make_tokenizer

# %% [markdown]
# ## 1. Convert a checkpoint
#
# Same as `python -m vlm_jax.convert --checkpoint HF_DIR --output OUT_DIR`. The random checkpoint is written in the
# transformers layout with a small tokenizer that knows the caption words of the `spatial_shapes` dataset.

# %%
hf_dir = CHECKPOINT
if not hf_dir:
    hf_dir = os.path.join(OUTPUT_DIR, "hf")
    tokenizer = make_tokenizer("demo")  # every caption word of spatial_shapes is one token
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
      f"vocabulary {model.config.text.vocab_size}")

# %% [markdown]
# ## 2. Dynamic tiles
#
# InternVL splits an image into up to `max_tiles` square tiles on the grid whose aspect ratio is closest to the
# image's, plus a thumbnail of the whole image. Here: two `spatial_shapes` scenes side by side (a 2:1 image).

# %%
scene = spatial_shapes.make_config(image_size=2 * model.config.image_size, num_test=NUM_IMAGES)
examples = [spatial_shapes.generate_example(scene, "test", i) for i in range(NUM_IMAGES)]
wide = np.concatenate([examples[0]["image"], examples[1]["image"]], axis=1)  # uint8[S, 2S, 3]
tiles = preprocess.dynamic_tiles(wide, image_size=model.config.image_size, max_tiles=MAX_TILES)
print("tiles:", tiles.shape)
viz.show_tiles(tiles);

# %% [markdown]
# ## 3. Image and caption embeddings
#
# `encode_images` runs each image (one tile) through the language model and takes the last hidden state;
# `encode_texts` does the same for the captions. Both are unit vectors in the language model's space, so their dot
# products are the cosine similarities `inference.score` returns.

# %%
images = [ex["image"] for ex in examples]
captions = [ex["captions"][0] for ex in examples]
image_emb = inference.encode_images(model.module, images, tokenizer=tokenizer)
text_emb = inference.encode_texts(model.module, captions, tokenizer=tokenizer)
sim = image_emb @ text_emb.T  # float32[images, captions]
print("image embeddings", image_emb.shape, "caption embeddings", text_emb.shape)
viz.similarity_heatmap(sim, [f"image {i}" for i in range(len(images))], captions);

# %% [markdown]
# ## 4. Generate
#
# The prompt goes through the InternVL chat template with the image's tiles; decoding is greedy with the KV cache
# and stops at `<|im_end|>`.

# %%
result = generation.generate(model.module, tokenizer, images=wide, prompt="Which shapes are in the picture?",
                             max_new_tokens=MAX_NEW_TOKENS, max_tiles=MAX_TILES)
print(f"{len(result.prompt_ids)} prompt tokens -> {len(result.token_ids)} new tokens")
print(repr(result.text))
