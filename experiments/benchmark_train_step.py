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
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlm_jax import optim, sharding
from vlm_jax import build
from vlm_jax.trainer import Trainer, TrainState, make_trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up step).")
flags.DEFINE_bool("full_reference", False, "Also compile the step with every parameter trainable.")
flags.DEFINE_bool("abstract", False, "FLOPs and bytes only, from shapes: nothing is allocated or run (any size).")
flags.DEFINE_bool("random_1b", False, "A random backbone of InternVL3-1B's sizes instead of the config's.")
flags.DEFINE_integer("lora_rank", 0, "LoRA of this rank on every attention and MLP linear of both towers.")
flags.DEFINE_bool("train_all", False, "Train every parameter (no frozen group).")

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


def synthetic_batch(config, model_config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random host batch with the pipeline's fields and shapes; prompts hold one image block."""
    rng = np.random.default_rng(seed)
    s, q = model_config.image_size, model_config.num_image_tokens
    vocab, img = model_config.text.vocab_size, model_config.image_token_id
    lt = int(config.data.max_text_length)
    lp = int(config.data.max_prompt_length) if config.data.max_prompt_length > 0 else q + lt + 16
    text = rng.integers(0, vocab, (batch_size, lt)).astype(np.int32)
    text[text == img] = 0
    prompt = rng.integers(0, vocab, (batch_size, lp)).astype(np.int32)
    prompt[prompt == img] = 0
    prompt[:, 1:1 + q] = img
    box = np.sort(rng.uniform(0, 1, (batch_size, 2, 2)), axis=1).reshape(batch_size, 4)[:, [0, 2, 1, 3]]
    return {
        "image": rng.normal(size=(batch_size, s, s, 3)).astype(np.float32),
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


def main(argv):
    del argv
    config = variant(FLAGS.config, FLAGS.lora_rank, FLAGS.train_all)
    model_config = None
    if FLAGS.random_1b:
        config.model.backbone = "tiny"  # random init; the sizes come from model_config
        model_config = internvl3_1b_config()
    print(json.dumps(measure(config, FLAGS.steps, FLAGS.full_reference, FLAGS.abstract, model_config=model_config),
                     sort_keys=True))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
