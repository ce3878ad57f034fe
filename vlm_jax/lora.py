"""LoRA on the backbone's linear layers: y = x W + b + (alpha / r) x A B.

A float32[in, r] (uniform in ±1/sqrt(in), as PEFT's kaiming-uniform with a=sqrt(5)) and B float32[r, out] (zeros,
so training starts from the base model) are parameters of the `layers.Linear` they adapt, named `lora_a` /
`lora_b` next to its `kernel`. In the scanned towers they are stacked on the layers axis like the kernel
(float32[L, in, r]); a layer outside the configured range has both factors zero, which keeps them zero in training
(zero gradients for both, and AdamW moves a zero parameter with zero gradient nowhere). They are float32
master copies whatever the compute dtype, and carry the kernel's logical axes (`in` for A, `out` for B, the rank
unsharded), so they shard with the same rules.

LoRA dropout (as PEFT's ``lora_dropout``) is an `nnx.Dropout` of the linear, built inactive: evaluation, export and
generation never drop. `training_view` activates it for a training forward. In a scanned tower its RNG stream is
stacked like the factors (a key per layer: every layer draws its own mask); the trainer reseeds every stream from
the step, so a resumed run draws the same masks.

Config section (``config.lora``)::

    rank            r; 0 = no LoRA
    alpha           the update is scaled by alpha / r
    dropout         rate of dropout on the update's input (x A B becomes dropout(x) A B) in training; 0 = none
    targets         regexes, each matching the whole path of at least one linear (its kernel's path without
                    '/kernel'), e.g. 'backbone/language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)'
    vision_layers   (start, stop): the vision tower's layers that get LoRA; () = all
    text_layers     (start, stop): the language model's layers; () = all

The factors are trained like any parameter: give them a group before the backbone's frozen rule, e.g.
``config.optim.rules = ((".*/lora_(a|b)", "lora"), ("backbone/.*", "frozen"), (".*", "heads"))`` with its own
learning rate and weight decay in ``config.optim.groups["lora"]``. `merge` folds them into the kernels (export,
faster inference); `num_parameters` is what they add.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlm_jax.models import layers

def linears(model: nnx.Module) -> dict[str, layers.Linear]:
    """{path: Linear} of every `layers.Linear` in `model` (path = its kernel's path without '/kernel')."""
    return {"/".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, layers.Linear)}


def _layer_mask(path: str, num_layers: int, lora_cfg) -> np.ndarray:
    """float32[L]: 1 on the configured layer range of the tower `path` belongs to, 0 elsewhere."""
    if "vision_tower/" in path:
        field = "vision_layers"
    elif "language_model/" in path:
        field = "text_layers"
    else:
        return np.ones((num_layers,), np.float32)
    span = tuple(lora_cfg[field])
    if span and (len(span) != 2 or not 0 <= span[0] < span[1] <= num_layers):
        raise ValueError(f"config.lora.{field}={span}: expected () or (start, stop) with 0 <= start < stop <= "
                         f"{num_layers} (the tower's layers)")
    start, stop = span or (0, num_layers)
    out = np.zeros((num_layers,), np.float32)
    out[start:stop] = 1.0
    return out


def attach(model: nnx.Module, lora_cfg, rngs: nnx.Rngs) -> list[str]:
    """Adds LoRA factors to every linear of `model` a target matches; returns their paths (sorted).

    Raises ValueError naming a target that matches no linear (with the linears there are)."""
    rank = int(lora_cfg.rank)
    if rank <= 0:
        return []
    found = linears(model)
    chosen: set[str] = set()
    for target in lora_cfg.targets:
        hits = {p for p in found if re.fullmatch(target, p)}
        if not hits:
            backbone = sorted(p for p in found if p.startswith("backbone/"))
            raise ValueError(f"config.lora.targets: {target!r} matches no linear layer (a target must match a "
                             f"linear's whole path); the backbone's linears are {backbone}")
        chosen |= hits
    scale = float(lora_cfg.alpha) / rank
    for path in sorted(chosen):
        linear = found[path]
        kernel = linear.kernel
        names = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        stacked = kernel.ndim == 3
        lead = kernel.shape[:1] if stacked else ()
        fan_in, fan_out = kernel.shape[-2], kernel.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        a = nnx.initializers.uniform(2 * bound)(rngs.params(), (*lead, fan_in, rank), jnp.float32) - bound
        if stacked:  # layers outside the range: A = 0 (and B = 0) stay zero
            a = a * jnp.asarray(_layer_mask(path, kernel.shape[0], lora_cfg))[:, None, None]
        linear.lora_a = nnx.Param(a, **layers.axes((*names[:-1], None)))
        linear.lora_b = nnx.Param(jnp.zeros((*lead, rank, fan_out), jnp.float32),
                                  **layers.axes((*names[:-2], None, names[-1])))
        linear.lora_scale = scale
        if float(lora_cfg.dropout) > 0:
            linear.lora_dropout = _dropout(float(lora_cfg.dropout), rngs.dropout(), lead)
    return sorted(chosen)


def _dropout(rate: float, key: jax.Array, lead: tuple[int, ...]) -> nnx.Dropout:
    """An inactive `nnx.Dropout` whose RNG stream holds one key per stacked layer (key shape `lead`)."""
    dropout = nnx.Dropout(rate, deterministic=True)
    # nnx.Dropout(rngs=...) forks a single key; a stacked stream is set directly.
    dropout.rngs = nnx.RngStream(jax.random.split(key, lead) if lead else key, tag="dropout")
    return dropout


def training_view(module: nnx.Module, train: bool) -> nnx.Module:
    """`module` with its LoRA dropout active when `train` (the same module when not, or without LoRA dropout)."""
    if not train or all(lin.lora_dropout is None for lin in linears(module).values()):
        return module
    return nnx.view(module, only=nnx.Dropout, deterministic=False)


def num_parameters(model: nnx.Module) -> int:
    """Parameter values the LoRA factors add: r (in + out) per adapted linear (and per stacked layer)."""
    return sum(int(lin.lora_a.size + lin.lora_b.size) for lin in linears(model).values() if lin.lora_a is not None)


def merge(model: nnx.Module) -> int:
    """Folds every linear's LoRA update into its kernel (kernel += scale A B, in float32, stored in the kernel's
    dtype) and removes the factors; returns the number of merged linears. The forward is then the same function."""
    merged = 0
    for linear in linears(model).values():
        if linear.lora_a is None:
            continue
        delta = jnp.einsum("...ir,...ro->...io", linear.lora_a[...], linear.lora_b[...]) * linear.lora_scale
        kernel = linear.kernel[...]
        linear.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        linear.lora_a = linear.lora_b = linear.lora_dropout = None
        linear.lora_scale = 0.0
        merged += 1
    return merged
