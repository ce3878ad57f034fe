"""The train state and the jitted train / eval steps over pure nnx.State pytrees, for one config on one mesh.

The model is split once into ``graphdef`` and four states: trainable parameters, frozen parameters, RNG streams
and other variables. ``jax.grad`` sees only the trainable state, so a frozen backbone costs a forward pass and no
gradient or optimizer memory (see experiments/benchmark_train_step.py for the measured FLOPs and bytes). RNG
streams are not part of the train state: every step reseeds them from ``fold_in(seed, step)``, so a resumed run
draws the same dropout masks as an uninterrupted one.

Failure policy: a step whose loss, gradients, updated parameters or updated optimizer state hold NaN or Inf leaves
parameters and optimizer state unchanged (the state is always the last finite one); the skips are counted in the
state (``nonfinite``: in a row, ``skipped``: in all) for the loop to act on.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vlm_jax import optim, sharding
from vlm_jax.checkpoints import converted
from vlm_jax import build
from vlm_jax.models.config import InternVLConfig


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


def _fresh_rngs(abstract_rngs: nnx.State, key: jax.Array) -> nnx.State:
    """RNG stream state with the abstract structure: keys derived from ``key`` and the stream path, counts 0."""

    def one(path, x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            k = jax.random.fold_in(key, zlib.crc32(optim.path_to_str(path).encode()) & 0x7FFFFFFF)
            return jax.random.split(k, x.shape) if x.shape else k
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_rngs)


def _create(config, backbone_config: InternVLConfig) -> nnx.Module:
    """The model of ``config``, randomly initialised from ``config.seed``."""
    groups = optim.ParamGroups.from_config(config.optim.rules)
    return build.build_model(backbone_config, config.model, config.tasks, groups, nnx.Rngs(config.seed),
                             config.lora)


@dataclasses.dataclass
class Trainer:
    """Graph, optimizer, shardings and jitted steps for one config on one mesh."""

    config: ml_collections.ConfigDict
    backbone_config: InternVLConfig
    mesh: jax.sharding.Mesh
    graphdef: Any
    opt: optim.Optimizer
    abstract_rngs: nnx.State
    abstract_model: nnx.State  # ShapeDtypeStructs carrying shardings (restore target)
    model_shardings: nnx.State
    state_shardings: TrainState
    trainable: Callable
    tasks: dict  # name -> task module of the abstract model (its settings; parameters are shapes only)

    # -- state ---------------------------------------------------------------------------------------------------

    def split_model_state(self, model_state: nnx.State):
        """(trainable, frozen, rest) from a whole-model state (RNG streams excluded)."""
        return nnx.split_state(model_state, self.trainable, nnx.Param, ...)

    def init_model_state(self) -> nnx.State:
        """Random init directly into the shardings (RNG streams dropped); a 'converted' backbone then takes the
        converted checkpoint's weights."""
        create = lambda: nnx.state(_create(self.config, self.backbone_config), nnx.Not(nnx.RngState))  # noqa: E731
        state = jax.jit(create, out_shardings=self.model_shardings)
        with nnx.use_eager_sharding(False):
            state = state()
        if self.config.model.backbone == "converted":
            target = nnx.split_state(self.abstract_model["backbone"], nnx.Param, ...)[0]
            restored = converted.restore_params(self.config.model.converted_dir, target)
            state["backbone"] = nnx.merge_state(state["backbone"], restored)
        return state

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
        params = sharding.abstract_with_shardings(self.split_model_state(self.abstract_model)[0], sh.params)
        opt_state = jax.eval_shape(self.opt.tx.init, params)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh))
        return dict(step=scalar, opt_state=sharding.abstract_with_shardings(opt_state, sh.opt_state),
                    nonfinite=scalar, skipped=scalar)

    def model(self, state: TrainState, rng_key: jax.Array | None = None) -> nnx.Module:
        """The nnx model over ``state``'s variables (RNG streams seeded from ``rng_key``, default key 0)."""
        key = jax.random.key(0) if rng_key is None else rng_key
        # copy=True: fresh Variables of the current trace (nnx.scan over the layers refuses Variables that were
        # created at another trace level, e.g. unflattened from the jitted step's arguments outside jax.grad).
        return nnx.merge(self.graphdef, state.params, state.frozen, _fresh_rngs(self.abstract_rngs, key), state.rest,
                         copy=True)

    # -- steps ---------------------------------------------------------------------------------------------------

    @functools.cached_property
    def eval_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(output keys, batch fields) an evaluation collects per example, over all tasks."""
        outputs = tuple(dict.fromkeys(k for t in self.tasks.values() for k in t.eval_outputs))
        fields = tuple(dict.fromkeys(k for t in self.tasks.values() for k in t.batch_fields))
        return outputs, fields

    @functools.cached_property
    def last_value_terms(self) -> frozenset:
        """Train metrics logged as their last value (not the mean over the logging window)."""
        names = {f"{t.name}_{k}" for t in self.tasks.values() for k in t.last_value_terms}
        return frozenset(names | {"nonfinite", "skipped"})

    @functools.cached_property
    def diagnostic_terms(self) -> frozenset:
        """Train metrics that are not losses (logged under ``train/``)."""
        from vlm_jax.tasks.base import diagnostic_names

        return diagnostic_names(self.tasks.values())

    @functools.cached_property
    def headline_metrics(self) -> tuple[str, ...]:
        """The metrics the console shows after each evaluation, over all tasks."""
        return tuple(m for t in self.tasks.values() for m in t.headline_metrics)

    def _train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        step_key = jax.random.fold_in(rng, state.step)
        rest_filter = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))

        def loss_fn(params):
            model = self.model(state.replace(params=params), step_key)
            loss, terms = model.loss(model(batch, train=True), batch)
            return loss, (terms, nnx.state(model, rest_filter))

        (loss, (terms, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.opt.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Committed only when the result is finite too (a NaN learning rate gives finite gradients and NaN
        # parameters). The state before the step is finite, so the new parameters are finite iff the updates are,
        # and the new moments (functions of finite gradients and finite old moments) iff the gradients' squares
        # do not overflow, which the gradient norm sees. Two norms are cheaper to compile than a check per leaf.
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))

        def keep(new, old):  # a non-finite step changes nothing but the counters
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        nonfinite = jnp.where(finite, 0, state.nonfinite + 1)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state), rest=keep(rest, state.rest),
                                  nonfinite=nonfinite, skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = dict(terms, grad_norm=grad_norm, nonfinite=nonfinite,
                       skipped=new_state.skipped, **optim.group_grad_norms(grads, self.opt.groups))
        return new_state, metrics

    def _eval_step(self, state: TrainState, batch: dict):
        model = self.model(state)
        outputs = model(batch, train=False)
        _, terms = model.loss(outputs, batch)
        output_keys, fields = self.eval_keys
        return {"outputs": {k: outputs[k] for k in output_keys},
                "batch": {k: batch[k] for k in (*fields, "valid")}, "terms": terms}

    def _backbone_step(self, state: TrainState, batch: dict):
        return self.model(state).backbone_outputs(batch)

    @functools.cached_property
    def backbone_step(self) -> Callable:
        """jit(backbone_step)(state, batch) -> the backbone's per-row outputs (`MultitaskModel.backbone_outputs`:
        what the feature cache stores)."""
        batch_sh = sharding.batch_sharding(self.mesh)
        return jax.jit(self._backbone_step, in_shardings=(self.state_shardings, batch_sh), out_shardings=batch_sh)

    @functools.cached_property
    def train_step(self) -> Callable:
        """jit(train_step)(state, batch, rng) -> (state, metrics); the state is donated."""
        batch_sh = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        return jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh, rep),
                       out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

    @functools.cached_property
    def eval_step(self) -> Callable:
        """jit(eval_step)(state, batch) -> {"outputs": per-example outputs, "batch": per-example fields + valid,
        "terms": loss terms of the batch}."""
        batch_sh = sharding.batch_sharding(self.mesh)
        rep = sharding.replicated(self.mesh)
        output_keys, fields = self.eval_keys
        out_sh = {"outputs": {k: batch_sh for k in output_keys},
                  "batch": {k: batch_sh for k in (*fields, "valid")}, "terms": rep}
        return jax.jit(self._eval_step, in_shardings=(self.state_shardings, batch_sh), out_shardings=out_sh)


def make_trainer(config, mesh: jax.sharding.Mesh, num_train_steps: int,
                 backbone_config: InternVLConfig | None = None) -> Trainer:
    """Traces the model abstractly (no parameters are materialised) and derives every sharding from it.

    ``num_train_steps`` (micro-steps) sets the schedules' length; ``backbone_config`` defaults to
    ``build.resolve_backbone(config.model).config``."""
    if backbone_config is None:
        backbone_config = build.resolve_backbone(config.model).config
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: _create(config, backbone_config))
    groups = optim.ParamGroups.from_config(config.optim.rules)
    groups.check_state(nnx.state(abstract, nnx.Param))  # lists every unmatched parameter
    trainable = groups.trainable_filter()
    graphdef, _, _, abstract_rngs, _ = nnx.split(abstract, trainable, nnx.Param, nnx.RngState, ...)
    model_abstract_state = nnx.state(abstract, nnx.Not(nnx.RngState))
    model_sh = sharding.state_shardings(model_abstract_state, mesh, sharding.rules_from_config(config.logical_rules))
    opt = optim.make_optimizer(config.optim, max(num_train_steps // int(config.optim.accum_steps), 1))
    params_sh, frozen_sh, rest_sh = nnx.split_state(model_sh, trainable, nnx.Param, ...)
    params_abs, _, _ = nnx.split_state(model_abstract_state, trainable, nnx.Param, ...)
    opt_abs = jax.eval_shape(opt.tx.init, params_abs)
    opt_sh = sharding.derived_shardings(opt_abs, params_abs, params_sh, mesh)
    rep = sharding.replicated(mesh)
    state_sh = TrainState(step=rep, params=params_sh, frozen=frozen_sh, rest=rest_sh, opt_state=opt_sh,
                          nonfinite=rep, skipped=rep)
    return Trainer(config=config, backbone_config=backbone_config, mesh=mesh, graphdef=graphdef, opt=opt,
                   abstract_rngs=abstract_rngs,
                   abstract_model=sharding.abstract_with_shardings(model_abstract_state, model_sh),
                   model_shardings=model_sh, state_shardings=state_sh, trainable=trainable,
                   tasks=dict(abstract.tasks.items()))
