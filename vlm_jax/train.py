"""Training: sharded train / eval steps over pure nnx.State pytrees, and the train_and_evaluate loop.

The model is split once into ``graphdef`` and four states: trainable parameters, frozen parameters, RNG streams
and other variables. ``jax.grad`` sees only the trainable state, so a frozen backbone costs a forward pass and no
gradient or optimizer memory (see experiments/benchmark_train_step.py for the measured FLOPs and bytes). RNG
streams are not part of the train state: every step reseeds them from ``fold_in(seed, step)``, so a resumed run
draws the same dropout masks as an uninterrupted one.

Failure policy: a step with a non-finite loss or gradient leaves parameters and optimizer state unchanged; the
skips are counted in the state and logged. After ``config.max_consecutive_nonfinite`` skips in a row the run saves
a checkpoint (of the last good parameters) and stops with an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vlm_jax import checkpointing, evaluate, losses, optim, sharding


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; donated to the step)."""

    step: jax.Array  # int32[]: micro-steps taken
    params: nnx.State  # trainable parameters
    frozen: nnx.State  # frozen parameters (never differentiated)
    rest: nnx.State  # non-parameter variables other than RNG streams
    opt_state: Any  # over `params` only
    nonfinite: jax.Array  # int32[]: consecutive skipped updates
    skipped: jax.Array  # int32[]: all skipped updates

    def model_state(self) -> nnx.State:
        return nnx.merge_state(self.params, self.frozen, self.rest)

    def train_items(self) -> dict:
        return dict(step=self.step, opt_state=self.opt_state, nonfinite=self.nonfinite, skipped=self.skipped)


# ------------------------------------------------------------------------------------------------------------------
# Model construction


def backbone_config(config):
    """InternVLConfig for ``config.model``: a tiny random model sized to the data's tokenizer, or the config stored
    with a converted checkpoint. Checks that the data pipeline's tokens-per-tile agree with the model."""
    from vlm_jax.models.config import InternVLConfig

    kind = config.model.backbone
    if kind == "tiny":
        from vlm_jax.data import pipeline

        tok = pipeline.make_tokenizer(data_config(config))
        cfg = InternVLConfig.tiny(**config.model.tiny.to_dict(), vocab_size=len(tok),
                                  image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    elif kind == "converted":
        from vlm_jax.checkpoints import converted

        path = converted_dir(config)
        if not path or not converted.is_converted(path):
            raise ValueError(f"config.model.backbone='converted' needs a converted checkpoint directory in "
                             f"config.model.converted_dir or config.init_from, got {path!r}.")
        cfg = checkpointing.converted_config(path)
    else:
        raise ValueError(f"config.model.backbone={kind!r}: expected 'tiny' or 'converted'.")
    if config.data.num_image_tokens != cfg.num_image_tokens:
        raise ValueError(f"config.data.num_image_tokens={config.data.num_image_tokens} but the model makes "
                         f"{cfg.num_image_tokens} image tokens per tile (image_size {cfg.image_size}).")
    if config.data.image_size != cfg.image_size:
        raise ValueError(f"config.data.image_size={config.data.image_size} but the model's tile size is "
                         f"{cfg.image_size}.")
    return cfg


def converted_dir(config) -> str:
    """Where a 'converted' backbone's config and tokenizer live: model.converted_dir, else init_from."""
    return config.model.get("converted_dir", "") or config.get("init_from", "")


def data_config(config):
    """config.data with an empty tokenizer resolved to the converted checkpoint's tokenizer files."""
    data = config.data
    if not data.tokenizer and config.model.backbone == "converted":
        data = data.copy_and_resolve_references()
        data.tokenizer = converted_dir(config)
    return data


def build_model(config, rngs: nnx.Rngs) -> nnx.Module:
    """Backbone + adapters + heads, as configured."""
    from vlm_jax.models.internvl import InternVL
    from vlm_jax.models.multitask import MultitaskModel

    dtype = jnp.dtype(config.model.get("dtype", "float32"))
    backbone = InternVL(backbone_config(config), dtype=dtype,
                        param_dtype=jnp.dtype(config.model.get("backbone_param_dtype", "float32")), rngs=rngs)
    return MultitaskModel(backbone, config.model.heads, rngs=rngs)


def _fresh_rngs(abstract_rngs: nnx.State, key: jax.Array) -> nnx.State:
    """RNG stream state with the abstract structure: keys derived from ``key`` and the stream path, counts 0."""

    def one(path, x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            k = jax.random.fold_in(key, zlib.crc32(optim.path_to_str(path).encode()) & 0x7FFFFFFF)
            return jax.random.split(k, x.shape) if x.shape else k
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_rngs)


# ------------------------------------------------------------------------------------------------------------------
# The steps


@dataclasses.dataclass
class Trainer:
    """Graph, optimizer, shardings and jitted steps for one config on one mesh."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: Any
    opt: optim.Optimizer
    abstract_rngs: nnx.State
    abstract_model: nnx.State  # ShapeDtypeStructs carrying shardings (restore target)
    model_shardings: nnx.State
    state_shardings: TrainState
    filters: tuple

    # -- state ---------------------------------------------------------------------------------------------------

    def split_model_state(self, model_state: nnx.State):
        """(trainable, frozen, rest) from a whole-model state (RNG streams excluded)."""
        return nnx.split_state(model_state, self.filters[0], nnx.Param, ...)

    def init_model_state(self) -> nnx.State:
        """Random init, directly into the shardings; RNG streams dropped."""
        config = self.config
        state = jax.jit(lambda: nnx.state(build_model(config, nnx.Rngs(config.seed)), nnx.Not(nnx.RngState)),
                        out_shardings=self.model_shardings)
        with nnx.use_eager_sharding(False):
            return state()

    def init_train_items(self, model_state: nnx.State) -> dict:
        params, _, _ = self.split_model_state(model_state)
        sh = self.state_shardings
        opt_state = jax.jit(self.opt.tx.init, out_shardings=sh.opt_state)(params)
        # Three separate buffers: the state is donated, and a buffer cannot be donated twice.
        zeros = [jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(self.mesh)) for _ in range(3)]
        return dict(step=zeros[0], opt_state=opt_state, nonfinite=zeros[1], skipped=zeros[2])

    def assemble(self, model_state: nnx.State, items: Mapping[str, Any]) -> TrainState:
        params, frozen, rest = self.split_model_state(model_state)
        return TrainState(step=items["step"], params=params, frozen=frozen, rest=rest, opt_state=items["opt_state"],
                          nonfinite=items["nonfinite"], skipped=items["skipped"])

    def abstract_train_items(self) -> dict:
        sh = self.state_shardings
        params = sharding.abstract_with_shardings(self._abstract_split[0], sh.params)
        opt_state = jax.eval_shape(self.opt.tx.init, params)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh))
        return dict(step=scalar, opt_state=sharding.abstract_with_shardings(opt_state, sh.opt_state),
                    nonfinite=scalar, skipped=scalar)

    @functools.cached_property
    def _abstract_split(self):
        return self.split_model_state(self.abstract_model)

    # -- steps ---------------------------------------------------------------------------------------------------

    def _merge(self, params, frozen, rest, rng_key):
        return nnx.merge(self.graphdef, params, frozen, _fresh_rngs(self.abstract_rngs, rng_key), rest)

    def _train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        config = self.config
        step_key = jax.random.fold_in(rng, state.step)
        rest_filter = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))

        def loss_fn(params):
            model = self._merge(params, state.frozen, state.rest, step_key)
            outputs = model(batch, train=True)
            loss, terms = losses.total_loss(outputs, batch, config.loss)
            return loss, (terms, nnx.state(model, rest_filter))

        (loss, (terms, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = self.opt.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        nonfinite = jnp.where(finite, 0, state.nonfinite + 1)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state), rest=keep(rest, state.rest),
                                  nonfinite=nonfinite, skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads), nonfinite=nonfinite,
                       skipped=new_state.skipped, **optim.group_grad_norms(grads, self.opt.groups))
        return new_state, metrics

    def _eval_step(self, state: TrainState, batch: dict):
        model = self._merge(state.params, state.frozen, state.rest, jax.random.key(0))
        outputs = model(batch, train=False)
        _, terms = losses.total_loss(outputs, batch, self.config.loss)
        out = {k: outputs[k] for k in evaluate.OUTPUT_KEYS}
        out["batch"] = {k: batch[k] for k in (*evaluate.BATCH_KEYS, "valid")}
        out["terms"] = terms
        return out

    @functools.cached_property
    def train_step(self) -> Callable:
        """jit(train_step)(state, batch, rng) -> (state, metrics); the state is donated."""
        batch_sh = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        return jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh, rep),
                       out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

    @functools.cached_property
    def eval_step(self) -> Callable:
        batch_sh = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        out_sh = {k: batch_sh for k in evaluate.OUTPUT_KEYS}
        out_sh["batch"] = {k: batch_sh for k in (*evaluate.BATCH_KEYS, "valid")}
        out_sh["terms"] = rep
        return jax.jit(self._eval_step, in_shardings=(self.state_shardings, batch_sh), out_shardings=out_sh)

    def forward_fn(self) -> Callable:
        """jit(model(batch, train=False)) over the same state: the FLOP baseline of the benchmark."""
        batch_sh = sharding.batch_sharding(self.mesh)

        def forward(state, batch):
            model = self._merge(state.params, state.frozen, state.rest, jax.random.key(0))
            return model(batch, train=False)

        return jax.jit(forward, in_shardings=(self.state_shardings, batch_sh))


def resolve_num_train_steps(config) -> int:
    """``config.num_train_steps`` micro-steps, or (when it is <= 0) ``config.num_epochs`` passes over the training
    images (the pipeline shows each image once per epoch, with one of its captions)."""
    if int(config.num_train_steps) > 0:
        return int(config.num_train_steps)
    from vlm_jax.data import pipeline

    builder = pipeline.make_builder(data_config(config))
    num_images = builder.info.splits[config.data.get("train_split", "train")].num_examples
    return max(1, math.ceil(float(config.num_epochs) * num_images / int(config.batch_size)))


def make_trainer(config, mesh: jax.sharding.Mesh, num_train_steps: int | None = None) -> Trainer:
    """Traces the model abstractly (no parameters are materialised) and derives every sharding from it.

    ``num_train_steps`` (micro-steps; default ``resolve_num_train_steps(config)``) sets the schedules' length."""
    create = lambda: build_model(config, nnx.Rngs(config.seed))  # noqa: E731
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(create)
    groups = optim.ParamGroups.from_config(config.optim.rules)
    groups.check_state(nnx.state(abstract, nnx.Param))  # lists every unmatched parameter
    trainable = groups.trainable_filter()
    graphdef, _, _, abstract_rngs, _ = nnx.split(abstract, trainable, nnx.Param, nnx.RngState, ...)
    model_abstract_state = nnx.state(abstract, nnx.Not(nnx.RngState))
    model_sh = sharding.state_shardings(model_abstract_state, mesh, _rules(config))
    num_train_steps = resolve_num_train_steps(config) if num_train_steps is None else num_train_steps
    accum = int(config.optim.get("accum_steps", 1))
    opt = optim.make_optimizer(config.optim, max(num_train_steps // accum, 1))
    params_sh, frozen_sh, rest_sh = nnx.split_state(model_sh, trainable, nnx.Param, ...)
    params_abs, _, _ = nnx.split_state(model_abstract_state, trainable, nnx.Param, ...)
    opt_abs = jax.eval_shape(opt.tx.init, params_abs)
    opt_sh = sharding.derived_shardings(opt_abs, params_abs, params_sh, mesh)
    rep = sharding.replicated(mesh)
    state_sh = TrainState(step=rep, params=params_sh, frozen=frozen_sh, rest=rest_sh, opt_state=opt_sh,
                          nonfinite=rep, skipped=rep)
    return Trainer(config=config, mesh=mesh, graphdef=graphdef, opt=opt, abstract_rngs=abstract_rngs,
                   abstract_model=sharding.abstract_with_shardings(model_abstract_state, model_sh),
                   model_shardings=model_sh, state_shardings=state_sh, filters=(trainable,))


def _rules(config):
    rules = config.get("logical_rules", None)
    return sharding.LOGICAL_RULES if not rules else tuple((str(a), b) for a, b in rules)


# ------------------------------------------------------------------------------------------------------------------
# Data


def make_data(config, split: str, *, train: bool):
    """This process's iterator of host batches (``config.batch_size`` / process_count rows) for ``split``."""
    from vlm_jax.data import pipeline

    return pipeline.make_iterator(data_config(config), split=split, train=train,
                                  global_batch_size=config.batch_size if train else config.eval_batch_size,
                                  seed=config.seed, shard_index=jax.process_index(),
                                  shard_count=jax.process_count())


# ------------------------------------------------------------------------------------------------------------------
# The loop


class NonFiniteError(RuntimeError):
    pass


def _append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_jsonl(path: str, max_step: int) -> None:
    """After a resume, drop records the interrupted run wrote past the restored step (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l)["step"] <= max_step]
    with open(path, "w") as f:
        f.writelines(lines)


def _writer(workdir: str, config):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if config.get("wandb", {}) and config.wandb.get("enabled", False) and jax.process_index() == 0:
        try:
            import wandb  # optional

            wandb.init(project=config.wandb.get("project", "vlm_jax"), dir=workdir, config=config.to_dict(),
                       resume="allow", id=config.wandb.get("run_id", None) or None)
            writer = metric_writers.MultiWriter([writer, _WandbWriter(wandb)])
        except ImportError:
            logging.warning("config.wandb.enabled but wandb is not installed; logging to TensorBoard only.")
    return writer


class _WandbWriter:
    """Minimal clu MetricWriter over wandb.log (scalars and hparams)."""

    def __init__(self, wandb):
        self._wandb = wandb

    def write_scalars(self, step, scalars):
        self._wandb.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def write_hparams(self, hparams):
        self._wandb.config.update(dict(hparams), allow_val_change=True)

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
        pass

    def flush(self):
        pass

    def close(self):
        self._wandb.finish()


def run_eval(trainer: Trainer, state: TrainState, config, split: str) -> dict[str, float]:
    batches = make_data(config, split, train=False)
    local = config.eval_batch_size // jax.process_count()
    to_device = lambda b: sharding.global_batch(b, trainer.mesh)  # noqa: E731
    return evaluate.evaluate(lambda b: trainer.eval_step(state, b), batches, local, to_device)


def _write_eval(writer, workdir: str, step: int, split: str, results: Mapping[str, float]) -> None:
    writer.write_scalars(step, {f"{split}/{k}": v for k, v in results.items()})
    if jax.process_index() == 0:
        _append_jsonl(os.path.join(workdir, "metrics.jsonl"), dict(results, step=int(step), split=split))


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    host = jax.device_get(pending)
    keys = host[-1].keys()
    last = {"nonfinite", "skipped", "logit_scale"}
    return {k: float(host[-1][k]) if k in last else float(np.mean([h[k] for h in host])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config.num_train_steps`` micro-steps with periodic evaluation and checkpoints; resumes from
    ``workdir`` when it holds a checkpoint. Returns the final evaluation results per split."""
    from clu import parameter_overview, periodic_actions

    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    num_steps = resolve_num_train_steps(config)
    trainer = make_trainer(config, mesh, num_steps)
    train_iter = make_data(config, config.data.get("train_split", "train"), train=True)
    manager = checkpointing.make_manager(workdir, config.checkpoint)
    model_state, items, start, source = checkpointing.restore_or_init(
        manager, init_from=config.get("init_from", ""), abstract_model=trainer.abstract_model,
        abstract_train=trainer.abstract_train_items(), init_model=trainer.init_model_state,
        init_train=trainer.init_train_items, data_iter=train_iter,
        init_from_keys=tuple(config.get("init_from_keys", ("backbone",))))
    state = trainer.assemble(model_state, items)
    del model_state, items
    meta = dict(config=config.to_json(), source=source)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0:
        _truncate_jsonl(metrics_path, start)

    writer = _writer(workdir, config)
    if start == 0:
        writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
        logging.info("Model source: %s", source)
        logging.info("Trainable parameters:\n%s",
                     parameter_overview.get_parameter_overview(state.params.to_pure_dict(), include_stats=False))
        logging.info("Frozen parameters: %d", parameter_overview.count_parameters(state.frozen.to_pure_dict()))
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    rng = jax.random.key(config.seed + 1)
    eval_splits = tuple(config.get("eval_splits", ()))
    log_every, eval_every = int(config.log_every), int(config.get("eval_every", 0) or 0)
    results: dict[str, Any] = {}
    pending: list[dict] = []
    max_bad = int(config.get("max_consecutive_nonfinite", 10))
    every = int(config.checkpoint.every_steps)

    def checkpoint(step, force):
        checkpointing.save(manager, step, state.model_state(), state.train_items(), train_iter, meta,
                           metrics=_best_metrics(config, results), force=force)

    step = start
    while step < num_steps:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = trainer.train_step(state, batch, rng)
        step += 1
        pending.append(metrics)
        report(step)
        if step % log_every == 0 or step == num_steps:
            summary = _mean_metrics(pending)
            pending = []
            for group, sched in trainer.opt.schedules.items():
                summary[f"lr/{group}"] = float(sched((step - 1) // trainer.opt.accum_steps))
            writer.write_scalars(step, summary)
            if summary["nonfinite"] >= max_bad:
                checkpoint(step, force=True)
                manager.wait_until_finished()
                raise NonFiniteError(
                    f"{int(summary['nonfinite'])} consecutive steps with a non-finite loss or gradient at step {step} "
                    f"(config.max_consecutive_nonfinite={max_bad}); the last good parameters are checkpointed in "
                    f"{manager.directory}.")
        if eval_splits and ((eval_every and step % eval_every == 0) or step == num_steps):
            with report.timed("eval"):
                for split in eval_splits:
                    results[split] = run_eval(trainer, state, config, split)
                    _write_eval(writer, workdir, step, split, results[split])
        if step % every == 0 or step == num_steps:
            checkpoint(step, force=True)
    manager.wait_until_finished()
    writer.flush()
    return results


def _best_metrics(config, results):
    name = config.checkpoint.get("best_metric", "")
    if not name:
        return None
    split, _, key = name.partition("/")
    if split in results and key in results[split]:
        return {name: results[split][key]}
    return None


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """--mode eval: restores a checkpoint (latest, or ``step``) from ``workdir`` and evaluates every split."""
    mesh = sharding.make_mesh(config.mesh)
    trainer = make_trainer(config, mesh)
    manager = checkpointing.make_manager(workdir, config.checkpoint)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"No checkpoint in {workdir}/{checkpointing.CHECKPOINT_SUBDIR}.")
    model_state, items, _ = checkpointing.restore(manager, step, trainer.abstract_model,
                                                  trainer.abstract_train_items())
    state = trainer.assemble(model_state, items)
    results = {}
    for split in config.eval_splits:
        results[split] = run_eval(trainer, state, config, split)
        logging.info("step %d %s: %s", step, split, results[split])
        if jax.process_index() == 0:
            _append_jsonl(os.path.join(workdir, "metrics.jsonl"), dict(results[split], step=int(step), split=split,
                                                                         mode="eval"))
    return results
