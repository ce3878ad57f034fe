"""Cost of one train step against the plain forward pass, and the memory that freezing saves.

    python experiments/benchmark_train_step.py --config configs/tiny_synthetic_stage2.py [--config.a=b ...]
        [--steps 10] [--full_reference]

Prints one JSON line: step time, samples/s, compiled FLOPs of the train step and of the forward
(``jit(...).lower(...).compile().cost_analysis()``), their ratio, and bytes of parameters and of optimizer +
accumulator state, split into trainable and frozen. With a frozen backbone and late fusion the step should cost
about one forward (the backward and the optimizer touch only adapters and heads) and hold no state for frozen
parameters, also with ``--config.optim.accum_steps=2`` (optax.MultiSteps) and the per-group gradient norms the step
always logs. ``--full_reference`` adds the FLOPs of the same step with every parameter trainable. ``--abstract``
compiles from shapes only (no allocation, no timing), e.g. for the InternVL3-1B config on a laptop:

    python experiments/benchmark_train_step.py --config configs/internvl3_1b_retrieval.py --abstract \
        --config.model.converted_dir=/data/internvl3_1b --config.optim.accum_steps=2

Inputs are random arrays with the batch layout of the data pipeline (no dataset is read).

``--random_1b`` uses a random backbone of InternVL3-1B's sizes (no converted checkpoint needed); ``--lora_rank R``
adds LoRA of rank R to every attention and MLP linear of both towers (factors in their own group, the backbone
frozen) and ``--train_all`` trains every parameter, e.g. the rows of the README's LoRA table:

    python experiments/benchmark_train_step.py --config configs/internvl3_1b_retrieval.py --abstract --random_1b \
        [--lora_rank 8 | --lora_rank 64 | --train_all]

Dynamic tiles: ``--max_tiles=1,4,12`` prints one JSON line per value instead: how the step's cost grows with tiles.
Each value packs ``--tile_batches`` synthetic batches of COCO-like photo sizes (`COCO_LIKE_SIZES`) with the input
pipeline's own batcher and buckets (`batching.tile_budget`, `batching.bucket_sizes`, tile counts from
`preprocess.num_tiles`): mean tiles per image, the padding fractions of tiles and prompt tokens, images re-tiled to
fit the budget, and every (N tiles, Lp prompt tokens) shape seen with its share of batches -- one compilation each.
The train step is compiled from shapes for every shape seen (a few; one abstract compile of the 1B model takes
tens of seconds on a 2-core CPU): per shape its XLA FLOPs and its jaxpr matmul FLOPs, and their means weighted by the shapes'
shares, the cost of a typical batch. The towers' layers run under ``lax.scan`` and XLA counts a loop body once, so
the XLA figure mostly reflects one layer; the jaxpr count covers every layer and is the one that scales. With late
fusion (the retrieval config's) only the vision tower sees tiles and the LM reads captions alone, so the cost grows
with N only; with ``--config.model.embedding.fusion=lm`` the LM also reads every pair's prompt, whose image block
holds Q tokens per tile, so the cost grows with Lp as well:

    python experiments/benchmark_train_step.py --config configs/internvl3_1b_retrieval.py --abstract --random_1b \
        --max_tiles=1,4,12 [--config.model.embedding.fusion=lm]

Measured so (batch 4, 50 batches; about 2.5 min per command on a 2-core CPU), jaxpr TFLOPs of a typical step:

    max_tiles  tiles/image  tile padding  prompt padding  shapes (N, Lp)  late fusion  lm fusion
    1          1.00         0.00          0.11            1               3.0          5.8
    4          1.69         0.25          0.48            2               6.6          15.0
    12         9.68         0.15          0.26            3               33.2         74.2

At max_tiles=4 most COCO photos keep one tile: no grid of at most 4 tiles is 4:3, and the 1x1 / 2x2 tie goes to
1x1 for a photo smaller than half the 2x2 canvas. At 12 nearly every batch of 4 holds a 13-tile photo, so Lp is
always the longest bucket and lm fusion's LM cost is the same for every batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlm_jax import optim, sharding
from vlm_jax import build
from vlm_jax import tokenizer as tokenizer_lib
from vlm_jax.data import batching, preprocess
from vlm_jax.trainer import Trainer, TrainState, make_trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
flags.DEFINE_bool("full_reference", False, "Also compile the step with every parameter trainable.")
flags.DEFINE_bool("abstract", False, "FLOPs and bytes only, from shapes: nothing is allocated or run (any size).")
flags.DEFINE_bool("random_1b", False, "A random backbone of InternVL3-1B's sizes instead of the config's.")
flags.DEFINE_integer("lora_rank", 0, "LoRA of this rank on every attention and MLP linear of both towers.")
flags.DEFINE_bool("train_all", False, "Train every parameter (no frozen group).")
flags.DEFINE_list("max_tiles", [], "Dynamic tiles: one record per value (e.g. 1,4,12) of tile padding and FLOPs.")
flags.DEFINE_integer("tile_batches", 50, "With --max_tiles: synthetic batches the padding is averaged over.")

# Every attention and MLP linear of both towers (vlm_jax.lora targets).
LORA_TARGETS = ("backbone/vision_tower/layers/(attn/(qkv|proj)|mlp/(fc1|fc2))",
                "backbone/language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)")


def variant(config, lora_rank: int = 0, train_all: bool = False):
    """`config` with LoRA of `lora_rank` (factors in group 'lora', lr as the config's first group) or every
    parameter trained."""
    config = config.copy_and_resolve_references()
    group = dict(config.optim.groups[optim.ParamGroups.from_config(config.optim.rules).trainable_groups[0]])
    if train_all:
        config.optim.rules, config.optim.groups = ((".*", "all"),), {"all": group}
    if lora_rank:
        config.lora.rank, config.lora.targets = lora_rank, LORA_TARGETS
        config.optim.rules = ((".*/lora_(a|b)", "lora"),) + tuple(tuple(r) for r in config.optim.rules)
        config.optim.groups = dict(config.optim.groups, lora=group)
    return config


# Photo sizes (width, height) of the tiled synthetic batches and the share of images drawn at each: they mimic COCO's
# common sizes (landscape 4:3 and 3:2 most often, then portrait, wide and square); the shares are rounded, not counted.
COCO_LIKE_SIZES = ((640, 480), (640, 427), (480, 640), (427, 640), (500, 375), (612, 612), (640, 360))
COCO_LIKE_WEIGHTS = (0.30, 0.25, 0.12, 0.10, 0.08, 0.05, 0.10)
CAPTION_WORDS = (9, 14)  # words per synthetic caption (inclusive): COCO captions are about 11 tokens long


def synthetic_batch(config, model_config, batch_size: int, seed: int = 0, max_tiles: int | None = None,
                    tile_multiple: int = 1) -> dict[str, np.ndarray]:
    """Random host batch with the pipeline's fields and shapes.

    ``max_tiles=None``: one whole-image tile per row (``image`` float32[B, S, S, 3]) and prompts with one tile's
    image block. ``max_tiles=m``: the pipeline's tiled layout for B photos of COCO-like sizes, each with its dynamic
    tiles for at most m tiles (+ thumbnail), packed as the pipeline packs them (`packed_tiles`): ``tiles``
    float32[N, S, S, 3] (random pixels, zero padding tiles), ``tile_regions`` [N, 4], ``row_tiles`` int32[B, T],
    ``num_tiles``, ``image_aspect`` [B] and prompts [B, Lp] with Q * num_tiles image tokens per row.
    ``tile_multiple``: N is a multiple of it (the devices the batch is split over)."""
    rng = np.random.default_rng(seed)
    s, q = model_config.image_size, model_config.num_image_tokens
    vocab, img = model_config.text.vocab_size, model_config.image_token_id
    lt = int(config.data.max_text_length)
    lp = int(config.data.max_prompt_length) if config.data.max_prompt_length > 0 else q + lt + 16
    text = rng.integers(0, vocab, (batch_size, lt)).astype(np.int32)
    text[text == img] = 0
    # Drawn for tiled batches too, so that a seed gives the same captions and boxes in both layouts.
    prompt = rng.integers(0, vocab, (batch_size, lp)).astype(np.int32)
    prompt[prompt == img] = 0
    prompt[:, 1:1 + q] = img
    box = np.sort(rng.uniform(0, 1, (batch_size, 2, 2)), axis=1).reshape(batch_size, 4)[:, [0, 2, 1, 3]]
    # Drawn before the relations: a seed gives the one-tile batch it always gave.
    image = rng.normal(size=(batch_size, s, s, 3)).astype(np.float32) if max_tiles is None else None
    batch = {
        "image_id": np.arange(batch_size, dtype=np.int32),
        "text_ids": text, "text_mask": np.ones_like(text),
        "prompt_ids": prompt, "prompt_mask": np.ones_like(prompt),
        "box": box.astype(np.float32), "has_box": np.ones(batch_size, bool),
        "relation": rng.integers(0, 6, batch_size).astype(np.int32), "has_relation": np.ones(batch_size, bool),
        "reference_box": box[::-1].astype(np.float32),
        "query_ids": text[::-1].copy(), "query_mask": np.ones_like(text),
        # Every caption different, no scene knowledge (as for COCO): all other rows are true negatives.
        "caption_key": np.arange(batch_size, dtype=np.int32),
        "subject_key": np.full(batch_size, -1, np.int32), "reference_key": np.full(batch_size, -1, np.int32),
        "scene_keys": np.zeros((batch_size, 0), np.int32), "scene_boxes": np.zeros((batch_size, 0, 4), np.float32),
    }
    if image is not None:
        return dict(batch, image=image)
    packed = packed_tiles(tiled_data_config(config, max_tiles), model_config, batch_size, seed, tile_multiple)
    batch.update(_model_inputs(packed, model_config, rng))
    return batch


def tiled_data_config(config, max_tiles: int):
    """``config.data`` with ``max_tiles`` (the rest -- thumbnail, budget, buckets -- as configured)."""
    data = config.data.copy_and_resolve_references()
    data.max_tiles = int(max_tiles)
    return data


@dataclasses.dataclass
class _SizeOnlyImages:
    """Stands in for the pipeline's per-example encoder inside `batching.Batcher`: an image is its (width, height)
    and its tiles are 1-pixel zeros, as many as `preprocess.num_tiles` gives, so that packing, re-tiling to the
    budget and prompt lengths follow the pipeline without decoding pixels (drawn afterwards at the tile size)."""

    prompts: object  # pipeline.make_prompt_builder(...) with the pipeline's prompt length limit
    tile_size: int  # the model's tile side: the grid choice depends on it
    min_tiles: int
    use_thumbnail: bool
    prompt_length: int  # the pipeline's longest prompt
    image_size: int = 1  # side of the packed tile array

    def tiles(self, size: tuple[int, int], image_id: int, max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32[n, 1, 1, 3] zeros, float32[n, 4] whole-image regions) for at most ``max_tiles`` tiles."""
        del image_id
        n = preprocess.num_tiles(*size, self.tile_size, min(self.min_tiles, max_tiles), max_tiles,
                                 self.use_thumbnail)
        # Costs do not depend on which part of the image a tile shows.
        return np.zeros((n, 1, 1, 3), np.float32), np.tile(np.float32([[0, 0, 1, 1]]), (n, 1))


@functools.lru_cache(maxsize=None)
def _prompt_tokenizer():
    # The template's words and the caption words one token each, as InternVL's tokenizer splits them, so prompt
    # lengths match the real ones to a few tokens. Only lengths and image token positions are used.
    return tokenizer_lib.build_demo_tokenizer(tokenizer_lib.DEMO_WORDS + ("user", "assistant"))


def tile_batcher(data_config, model_config, batch_size: int, tile_multiple: int = 1) -> batching.Batcher:
    """The pipeline's training batcher for ``batch_size`` rows (its tile budget and buckets)."""
    from vlm_jax.data import pipeline  # grain: only the tiled batches need it (the device benchmark has none)

    inputs = pipeline.ModelInputs(_prompt_tokenizer(), int(model_config.image_size),
                                  int(model_config.num_image_tokens))
    prompts = pipeline.make_prompt_builder(data_config, inputs)
    prompts.max_length = pipeline.prompt_length(data_config, inputs)
    encode = _SizeOnlyImages(prompts, inputs.image_size, int(data_config.min_tiles), bool(data_config.use_thumbnail),
                             prompts.max_length)
    return batching.make_batcher(data_config, encode, batch_size, tile_multiple=tile_multiple, share_images=False)


def packed_tiles(data_config, model_config, batch_size: int, seed: int, tile_multiple: int = 1) -> dict:
    """One training batch of ``batch_size`` COCO-like photos packed by the pipeline's batcher, without pixels:
    tiles float32[N, 1, 1, 3], tile_regions [N, 4], row_tiles int32[B, T], num_tiles int32[B], image_id,
    image_aspect [B], prompt_ids / prompt_mask int32[B, Lp] (the stand-in tokenizer's ids) and the pipeline's
    counters (``_tiles``, ``_padding_tiles``, ``_prompt_tokens``, ``_padding_tokens``, ``_retiled_images``, ...)."""
    rng = np.random.default_rng((seed, 1))  # its own stream: the same layout with or without pixels
    batcher = tile_batcher(data_config, model_config, batch_size, tile_multiple)
    examples = []
    for i, k in enumerate(rng.choice(len(COCO_LIKE_SIZES), batch_size, p=COCO_LIKE_WEIGHTS)):
        w, h = COCO_LIKE_SIZES[k]
        tiles, regions = batcher.encode.tiles((w, h), i, int(data_config.max_tiles))
        words = rng.choice(tokenizer_lib.DEMO_WORDS, rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1))
        examples.append({"image_id": np.int32(i), "image_aspect": np.float32(w / h), "_image_tiles": tiles,
                         "_image_regions": regions, "_encoded": (w, h), "_caption": " ".join(words)})
    return batcher(examples)


def _model_inputs(packed: dict, model_config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A packed batch's model fields: tiles float32[N, S, S, 3] with random pixels (padding tiles zero, as the
    pipeline's), prompts int32[B, Lp] with random text ids and the model's image token at the image positions."""
    out = {k: v for k, v in packed.items() if not k.startswith("_")}  # the counters are no model input
    s, img = model_config.image_size, model_config.image_token_id
    tiles = np.zeros((len(out["tiles"]), s, s, 3), np.float32)
    tiles[: int(packed["_tiles"])] = rng.standard_normal((int(packed["_tiles"]), s, s, 3), np.float32)
    image = out["prompt_ids"] == _prompt_tokenizer().convert_tokens_to_ids(tokenizer_lib.IMG_CONTEXT)
    ids = rng.integers(0, model_config.text.vocab_size, image.shape).astype(np.int32)
    ids[ids == img] = 0
    ids[image] = img
    out.update(tiles=tiles, prompt_ids=np.where(out["prompt_mask"] > 0, ids, 0).astype(np.int32))
    return out


def tile_statistics(config, model_config, max_tiles: int, num_batches: int = 50, tile_multiple: int = 1) -> dict:
    """Packing of ``num_batches`` synthetic batches (seeds 0..num_batches-1) with ``max_tiles``: mean tiles per
    image, padding fractions of tiles and prompt tokens, re-tiled images per batch, the buckets, and each (N, Lp)
    shape seen as {"tiles", "prompt_length", "share", "seed" (its first batch)}, most common first."""
    data, b = tiled_data_config(config, max_tiles), int(config.batch_size)
    batcher = tile_batcher(data, model_config, b, tile_multiple)
    sums, seen = collections.Counter(), {}
    for seed in range(num_batches):
        packed = packed_tiles(data, model_config, b, seed, tile_multiple)
        for name in ("tiles", "padding_tiles", "prompt_tokens", "padding_tokens", "retiled_images",
                     "truncated_prompts"):
            sums[name] += int(packed["_" + name])
        shape = (len(packed["tiles"]), packed["prompt_ids"].shape[1])
        seen.setdefault(shape, {"tiles": shape[0], "prompt_length": shape[1], "batches": 0, "seed": seed})
        seen[shape]["batches"] += 1
    for shape in seen.values():
        shape["share"] = shape.pop("batches") / num_batches
    return {
        "max_tiles": int(max_tiles), "tiles_per_image": batching.tiles_per_image(data), "batch_size": b,
        "tile_budget": batcher.budget, "tile_buckets": list(batcher.tile_sizes),
        "prompt_buckets": list(batcher.prompt_sizes), "batches": num_batches,
        "mean_tiles_per_image": sums["tiles"] / (num_batches * b),
        "tile_padding_fraction": sums["padding_tiles"] / (sums["tiles"] + sums["padding_tiles"]),
        "prompt_padding_fraction": sums["padding_tokens"] / (sums["prompt_tokens"] + sums["padding_tokens"]),
        "retiled_images_per_batch": sums["retiled_images"] / num_batches,
        "truncated_prompts": sums["truncated_prompts"],
        "shapes": sorted(seen.values(), key=lambda x: (-x["share"], -x["tiles"], -x["prompt_length"])),
    }


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def jaxpr_matmul_flops(fn, *args) -> float:
    """Matmul + convolution FLOPs of ``fn``'s jaxpr, with scan bodies counted ``length`` times.

    XLA's cost analysis counts a while-loop body once, so for models whose layers run under ``lax.scan`` its
    totals (and ratios) mostly reflect one layer; this count covers every layer. Element-wise work is ignored.
    """
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contract = np.prod([lhs[i] for i in lc])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * contract
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # per output element: kernel spatial size x input features
            out = eqn.outvars[0].aval.shape
            total += 2.0 * np.prod(out) * np.prod(rhs) / max(out[eqn.params["dimension_numbers"].out_spec[1]], 1)
        sub = [v for v in eqn.params.values() if hasattr(v, "jaxpr") or hasattr(v, "eqns")]
        branches = eqn.params.get("branches")
        if branches:
            total += max(_count(b.jaxpr) for b in branches)
            continue
        inner = sum(_count(getattr(v, "jaxpr", v)) for v in sub)
        total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _bytes_by_group(tree, frozen_paths: set[str], trainable_paths: set[str]) -> dict[str, int]:
    """Bytes of a state's leaves, attributed to frozen / trainable parameters by path suffix (else 'other')."""
    out = {"trainable": 0, "frozen": 0, "other": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "dtype"):
            continue
        parts = optim.path_to_str(path).split("/")
        suffixes = {"/".join(parts[i:]) for i in range(len(parts))}
        kind = "frozen" if suffixes & frozen_paths else "trainable" if suffixes & trainable_paths else "other"
        out[kind] += int(leaf.size * jnp.dtype(leaf.dtype).itemsize)
    return out


def forward_fn(trainer: Trainer):
    """jit(model(batch, train=False)) over the train state: the FLOP baseline."""
    return jax.jit(lambda state, batch: trainer.model(state)(batch, train=False),
                   in_shardings=(trainer.state_shardings, sharding.batch_sharding(trainer.mesh)))


def _abstract_state(trainer: Trainer) -> TrainState:
    params, frozen, rest = trainer.split_model_state(trainer.abstract_model)
    items = trainer.abstract_train_items()
    return TrainState(step=items["step"], params=params, frozen=frozen, rest=rest,
                            opt_state=items["opt_state"], nonfinite=items["nonfinite"], skipped=items["skipped"])


def _abstract_batch(batch: dict, mesh) -> dict:
    sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in batch.items()}


def internvl3_1b_config():
    from benchmark_forward import internvl3_1b_hf_config
    from vlm_jax.models.config import InternVLConfig

    return InternVLConfig.from_hf_dict(internvl3_1b_hf_config(24, 151674).to_dict())


def measure(config, steps: int = 10, full_reference: bool = False, abstract: bool = False, devices=None,
            model_config=None, full_reference_xla: bool = True) -> dict:
    """The benchmark's JSON record. ``abstract``: compile from shapes only (no step time, no allocation);
    ``full_reference_xla=False`` counts the every-parameter-trained step's FLOPs from its jaxpr only.

    FLOPs are per device: with data parallelism the (replicated) optimizer update weighs more against a forward
    that is split over the devices."""
    mesh = sharding.make_mesh(config.mesh, devices)
    num_steps = 1000  # only the schedules' length; irrelevant to cost
    if model_config is None:
        model_config = build.resolve_backbone(config.model).config
    trainer = make_trainer(config, mesh, num_steps, model_config)
    host_batch = synthetic_batch(config, model_config, int(config.batch_size))
    if abstract:
        state, batch = _abstract_state(trainer), _abstract_batch(host_batch, mesh)
    else:
        model_state = trainer.init_model_state()
        state = trainer.assemble(model_state, trainer.init_train_items(model_state))
        batch = sharding.global_batch(host_batch, mesh)
    rng = jax.random.key(0)

    step_flops = _flops(trainer.train_step.lower(state, batch, rng).compile())
    forward_flops = _flops(forward_fn(trainer).lower(state, batch).compile())
    step_mm = jaxpr_matmul_flops(trainer._train_step, state, batch, rng)
    forward_mm = jaxpr_matmul_flops(forward_fn(trainer), state, batch)

    trainable_paths = {optim.path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
    frozen_paths = {optim.path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.frozen)}
    result = {
        "config_fusion": config.model.embedding.fusion,
        "tasks": sorted(config.tasks.keys()),
        "devices": jax.device_count(),
        "batch_size": int(config.batch_size),
        "accum_steps": trainer.opt.accum_steps,
        "train_step_flops": step_flops,
        "forward_flops": forward_flops,
        "flop_ratio": step_flops / forward_flops if forward_flops else float("nan"),
        "jaxpr_train_step_matmul_flops": step_mm,
        "jaxpr_forward_matmul_flops": forward_mm,
        "jaxpr_flop_ratio": step_mm / forward_mm if forward_mm else float("nan"),
        "params_bytes": {"trainable": optim.tree_bytes(state.params), "frozen": optim.tree_bytes(state.frozen)},
        "opt_state_bytes": _bytes_by_group(state.opt_state, frozen_paths, trainable_paths),
        "lora_rank": int(config.lora.rank),
        "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }
    if not abstract:
        state, metrics = trainer.train_step(state, batch, rng)  # warm-up (compiles)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        step_time = (time.perf_counter() - start) / max(steps, 1)
        result.update(step_time_s=step_time, samples_per_s=int(config.batch_size) / step_time,
                      loss=float(metrics["total"]))
    if full_reference:
        full = config.copy_and_resolve_references()
        full.optim.rules = ((".*", "all"),)
        group = optim.ParamGroups.from_config(config.optim.rules).trainable_groups[0]
        full.optim.groups = {"all": dict(config.optim.groups[group])}
        ref = make_trainer(full, mesh, num_steps, model_config)
        ref_state = _abstract_state(ref)
        if full_reference_xla:  # XLA's count needs a whole compile of the trainable step
            result["full_train_step_flops"] = _flops(ref.train_step.lower(ref_state, batch, rng).compile())
        result["jaxpr_full_train_step_matmul_flops"] = jaxpr_matmul_flops(ref._train_step, ref_state, batch, rng)
    return result


def tile_sweep(config, max_tiles_values, model_config=None, num_batches: int = 50, devices=None,
               xla: bool = True):
    """Yields one record per ``max_tiles`` value: `tile_statistics` and, for every shape seen, the train step's FLOPs
    compiled from shapes (``train_step_flops``, XLA's; ``jaxpr_train_step_matmul_flops``, every scanned layer)
    with their share-weighted means (``mean_*``: a typical batch). ``xla=False`` skips the compiles (jaxpr only)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    if model_config is None:
        model_config = build.resolve_backbone(config.model).config
    trainer = make_trainer(config, mesh, 1000, model_config)  # the model does not depend on the tile settings
    state, rng = _abstract_state(trainer), jax.random.key(0)
    multiple = sharding.local_batch_shards(mesh)
    for max_tiles in max_tiles_values:
        record = tile_statistics(config, model_config, max_tiles, num_batches, multiple)
        record.update(fusion=config.model.embedding.fusion, devices=jax.device_count(),
                      image_tokens_per_tile=int(model_config.num_image_tokens), compilations=len(record["shapes"]))
        for shape in record["shapes"]:
            host = synthetic_batch(config, model_config, record["batch_size"], shape["seed"], max_tiles, multiple)
            batch = _abstract_batch(host, mesh)
            shape["jaxpr_train_step_matmul_flops"] = jaxpr_matmul_flops(trainer._train_step, state, batch, rng)
            if xla:
                shape["train_step_flops"] = _flops(trainer.train_step.lower(state, batch, rng).compile())
        for key in ("jaxpr_train_step_matmul_flops", "train_step_flops"):
            if key in record["shapes"][0]:
                record["mean_" + key] = sum(x["share"] * x[key] for x in record["shapes"])
        yield record


def main(argv):
    del argv
    config = variant(FLAGS.config, FLAGS.lora_rank, FLAGS.train_all)
    model_config = None
    if FLAGS.random_1b:
        config.model.backbone = "tiny"  # random init; the sizes come from model_config
        model_config = internvl3_1b_config()
    if FLAGS.max_tiles:  # from shapes only, whatever --abstract says: FLOPs and padding need no values
        for record in tile_sweep(config, [int(m) for m in FLAGS.max_tiles], model_config, FLAGS.tile_batches):
            print(json.dumps(record, sort_keys=True), flush=True)
        return
    print(json.dumps(measure(config, FLAGS.steps, FLAGS.full_reference, FLAGS.abstract, model_config=model_config),
                     sort_keys=True))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
