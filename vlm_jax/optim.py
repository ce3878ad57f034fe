"""Parameter groups, freezing and the optimizer.

Parameters are named by their '/'-joined NNX path (``backbone/vision_tower/layers/0/attn/qkv/kernel``). The config
lists ordered ``(regex, group)`` rules; the first rule whose regex matches the whole path names the parameter's
group. Every parameter must match a rule: construction fails listing every unmatched path.

The group ``frozen`` is special. It maps to ``optax.set_to_zero()`` inside ``optax.multi_transform`` (so Adam keeps
no moments for it), and, more importantly, the train step never differentiates it: ``trainable_filter`` splits the
model state so that ``jax.grad`` only sees trainable leaves. Gradient accumulation (``optax.MultiSteps``) and the
per-group gradient norms are built over that trainable tree only, so freezing saves the backward pass and the
accumulator memory, not just the update.

Config section (``config.optim``)::

    rules = (("backbone/.*", "frozen"), (".*", "heads"))
    groups = {"heads": {"lr": 1e-4, "weight_decay": 0.01, "schedule": "linear", "warmup_frac": 0.1,
                        "end_lr_frac": 0.0}}
    b1, b2, eps          AdamW moments
    grad_clip_norm       global-norm clip over the trainable gradients (0 = off)
    accum_steps          micro-steps per optimizer update (optax.MultiSteps; 1 = off)
    decay_vectors        also weight-decay 1-D parameters (biases, norm scales, logit scale)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

FROZEN = "frozen"
SCHEDULES = ("constant", "linear", "cosine")


def path_to_str(path: Sequence[Any]) -> str:
    """'/'-joined parameter path from a jax key path or an NNX path; drops the Variable's trailing ``.value``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Ordered ``(regex, group)`` rules; the first full match wins."""

    rules: tuple[tuple[str, str], ...]

    def __post_init__(self):
        for rule in self.rules:
            if len(rule) != 2:
                raise ValueError(f"Parameter-group rule {rule!r}: expected a (regex, group) pair.")
            try:
                re.compile(rule[0])
            except re.error as e:
                raise ValueError(f"Parameter-group rule {rule!r}: bad regex ({e}).") from e

    @classmethod
    def from_config(cls, rules) -> "ParamGroups":
        return cls(tuple((str(r), str(g)) for r, g in rules))

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g for _, g in self.rules))

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        return tuple(g for g in self.group_names if g != FROZEN)

    def label(self, path: str) -> str | None:
        for regex, group in self.rules:
            if re.fullmatch(regex, path):
                return group
        return None

    def labels(self, tree) -> Any:
        """Tree of group names with the structure of ``tree`` (an nnx.State or any pytree of arrays)."""
        unmatched = []

        def one(path, _):
            name = path_to_str(path)
            group = self.label(name)
            if group is None:
                unmatched.append(name)
            return group

        out = jax.tree_util.tree_map_with_path(one, tree)
        if unmatched:
            raise ValueError(
                f"{len(unmatched)} parameter(s) match no rule in config.optim.rules {list(self.rules)}; "
                "add a rule for:\n  "
                + "\n  ".join(unmatched))
        return out

    def check_state(self, params: nnx.State) -> dict[str, int]:
        """Raises listing every unmatched parameter; returns the number of parameter values per group."""
        counts: dict[str, int] = {}
        for group, leaf in zip(jax.tree.leaves(self.labels(params)), jax.tree.leaves(params)):
            counts[group] = counts.get(group, 0) + int(leaf.size)
        return counts

    def trainable_filter(self) -> Callable[[tuple, Any], bool]:
        """NNX filter: a ``Param`` whose group is not ``frozen`` (unmatched paths raise)."""

        def is_trainable(path, value) -> bool:
            if not isinstance(value, nnx.Param):
                return False
            name = "/".join(str(p) for p in path)
            group = self.label(name)
            if group is None:
                raise ValueError(f"Parameter {name!r} matches no rule in config.optim.rules {list(self.rules)}.")
            return group != FROZEN

        return is_trainable


def make_schedule(group_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_frac`` of the steps, then constant, linear or cosine decay to ``end_lr_frac``.

    group_cfg: lr, weight_decay, schedule ('constant' | 'linear' | 'cosine'), warmup_frac, end_lr_frac (all required).
    """
    lr = float(group_cfg["lr"])
    kind = group_cfg["schedule"]
    if kind not in SCHEDULES:
        raise ValueError(f"Unknown schedule {kind!r}; expected one of {SCHEDULES}.")
    total_steps = max(int(total_steps), 1)
    warmup = int(round(float(group_cfg["warmup_frac"]) * total_steps))
    end = lr * float(group_cfg["end_lr_frac"])
    decay_steps = max(total_steps - warmup, 1)
    if kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What the trainer needs: the transformation over the *trainable* tree, its groups and schedules."""

    tx: optax.GradientTransformation
    groups: ParamGroups
    schedules: dict[str, optax.Schedule]
    accum_steps: int


def make_optimizer(optim_cfg, total_steps: int) -> Optimizer:
    """Builds ``chain(clip, multi_transform({group: adamw, frozen: set_to_zero}))``, wrapped in MultiSteps.

    ``total_steps`` counts optimizer updates (micro-steps / accum_steps). The labels are computed from the paths of
    whatever tree the transformation is initialised on, so the same ``tx`` works on the full parameter state (frozen
    leaves get ``set_to_zero`` and no moments) and on the trainable-only state the trainer uses.
    """
    groups = ParamGroups.from_config(optim_cfg.rules)
    group_cfgs = dict(optim_cfg.groups)
    missing = [g for g in groups.trainable_groups if g not in group_cfgs]
    if missing:
        raise ValueError(f"config.optim.rules name group(s) {missing} that config.optim.groups does not define "
                         f"(defined: {sorted(group_cfgs)}).")
    decay_vectors = bool(optim_cfg.decay_vectors)

    def decay_mask(params):
        return jax.tree.map(lambda x: decay_vectors or x.ndim > 1, params)

    schedules, transforms = {}, {FROZEN: optax.set_to_zero()}
    for name in groups.trainable_groups:
        cfg = group_cfgs[name]
        schedules[name] = make_schedule(cfg, total_steps)
        transforms[name] = optax.adamw(schedules[name], b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                       weight_decay=float(cfg["weight_decay"]), mask=decay_mask)
    parts = []
    if optim_cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)))
    # Labels as a callable: a label tree built ahead of time would not match the State structure optax sees.
    parts.append(optax.multi_transform(transforms, groups.labels))
    tx = optax.chain(*parts)
    accum = int(optim_cfg.accum_steps)
    if accum < 1:
        raise ValueError(f"config.optim.accum_steps must be >= 1, got {accum}.")
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return Optimizer(tx=tx, groups=groups, schedules=schedules, accum_steps=accum)


def group_grad_norms(grads, groups: ParamGroups) -> dict[str, jax.Array]:
    """Global L2 norm of the gradient per group, over the given (trainable) gradient tree only."""
    labels = jax.tree.leaves(groups.labels(grads))
    leaves = jax.tree.leaves(grads)
    sums: dict[str, jax.Array] = {}
    for group, g in zip(labels, leaves):
        sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
        sums[group] = sums[group] + sq if group in sums else sq
    return {f"grad_norm/{k}": jnp.sqrt(v) for k, v in sums.items()}


def tree_bytes(tree) -> int:
    """Bytes held by the array leaves of a pytree (abstract or concrete); optax MaskedNodes count zero."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))
