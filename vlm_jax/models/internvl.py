"""InternVL: InternViT -> pixel shuffle -> MLP projector -> Qwen2, image embeddings written into <IMG_CONTEXT>.

Legend: N image tiles, P patches per tile, Q = num_image_tokens per tile, B batch, T tokens, D LM width, V vocab.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from vlm_jax.models import layers
from vlm_jax.models.config import InternVLConfig
from vlm_jax.models.intern_vit import InternViT
from vlm_jax.models.qwen2 import Qwen2


@struct.dataclass
class InternVLOutput:
    logits: jax.Array  # float[B, T, V]
    hidden: jax.Array  # float[B, T, D], after the LM's final norm


def pixel_shuffle(patches: jax.Array, grid_h: int, factor: int) -> jax.Array:
    """Pixel shuffle v2 over a row-major patch grid: float[N, P, C] (P = grid_h * grid_w) -> float[N, Q, f*f*C].

    Each f x f block of patches becomes one token (Q = P / f^2, blocks in row-major order); its features are the
    block's patches in row-major order (row offset slowest), as InternVL's v2.
    """
    return einops.rearrange(patches, "N (h dr w dc) C -> N (h w) (dr dc C)", h=grid_h // factor, dr=factor,
                            dc=factor)


class Projector(nnx.Module):
    """mlp1: LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = layers.LayerNorm(in_dim, eps=eps, names=(None,), **kw)
        self.linear_1 = layers.Linear(in_dim, out_dim, (None, "embed"), **kw)
        self.linear_2 = layers.Linear(out_dim, out_dim, (None, "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(layers.gelu(self.linear_1(self.layer_norm(x))))


def count_image_tokens(input_ids, image_token_id: int) -> int:
    return int(np.sum(np.asarray(input_ids) == image_token_id))


class InternVL(nnx.Module):
    """The full vision-language model. Submodule names are stable (freezing regexes and checkpoints use them)."""

    def __init__(self, config: InternVLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = InternViT(config.vision, **kw)
        shuffled = config.vision.hidden_size * config.shuffle_factor ** 2
        self.multi_modal_projector = Projector(shuffled, config.text.hidden_size, config.projector_ln_eps, **kw)
        self.language_model = Qwen2(config.text, **kw)
        if config.text.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = layers.Linear(config.text.hidden_size, config.text.vocab_size, ("embed", "vocab"),
                                         use_bias=False, preferred_element_type=jnp.float32, **kw)

    def set_attention_implementation(self, implementation: str) -> None:
        """`layers.ATTENTION_IMPLEMENTATIONS` ('auto' | 'xla' | 'cudnn' | 'map' | 'einsum') for both towers."""
        layers.check_attention(implementation)
        self.vision_tower.attention_impl = implementation
        self.language_model.attention_impl = implementation

    def set_remat(self, policy: str) -> None:
        """Rematerialisation of both towers' layers in the backward pass (`layers.REMAT_POLICIES`: 'none', 'full'
        or a named `jax.checkpoint_policies` policy): less activation memory for more compute."""
        layers.check_remat(policy)
        self.vision_tower.remat = policy
        self.language_model.remat = policy

    def vision_hidden_states(self, pixel_values: jax.Array) -> jax.Array:
        """float[N, H, W, 3] -> last ViT layer output float[N, 1 + P, Dv], CLS at index 0."""
        return self.vision_tower(pixel_values)

    def image_embeddings(self, pixel_values: jax.Array) -> jax.Array:
        """float[N, H, W, 3] -> float[N, Q, D] (drop CLS, pixel shuffle, project)."""
        return self.image_embeddings_from_hidden(self.vision_hidden_states(pixel_values), pixel_values.shape[1:3])

    def image_embeddings_from_hidden(self, vision_hidden: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
        """Already computed ViT states float[N, 1 + P, Dv] of images of size `image_hw` -> float[N, Q, D]."""
        grid_h = image_hw[0] // self.config.vision.patch_size
        tokens = pixel_shuffle(vision_hidden[:, 1:], grid_h, self.config.shuffle_factor)  # CLS dropped
        return self.multi_modal_projector(tokens)

    def merge_image_embeddings(self, input_ids: jax.Array, image_embeds: jax.Array) -> jax.Array:
        """Embed int[B, T] and overwrite the <IMG_CONTEXT> positions, in row-major order, by float[N, Q, D].

        The number of <IMG_CONTEXT> tokens must equal N*Q; it is checked here when input_ids is concrete
        (the public wrapper checks it on the host before its jitted call).
        """
        image_token_id = self.config.image_token_id
        if image_token_id is None:
            raise ValueError("config.image_token_id is None: pass the id of <IMG_CONTEXT>")
        embeds = self.language_model.embed(input_ids)
        flat = einops.rearrange(image_embeds, "N Q D -> (N Q) D").astype(embeds.dtype)
        if not isinstance(input_ids, jax.core.Tracer):
            found = count_image_tokens(input_ids, image_token_id)
            if found != flat.shape[0]:
                raise ValueError(f"input_ids hold {found} <IMG_CONTEXT> tokens (id {image_token_id}) but the images "
                                 f"give {flat.shape[0]} embeddings ({image_embeds.shape[0]} x {image_embeds.shape[1]})")
        is_img = input_ids == image_token_id
        idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1  # k-th image token -> row k
        gathered = jnp.take(flat, jnp.clip(idx, 0, flat.shape[0] - 1), axis=0)
        return jnp.where(is_img[..., None], gathered, embeds)

    def merge_row_image_embeddings(self, input_ids: jax.Array, row_embeds: jax.Array) -> jax.Array:
        """Embed int[B, T] and overwrite each row's <IMG_CONTEXT> positions, in order, by that row's own
        float[B, M, D] image embeddings (M >= the row's image tokens; the rest is never read)."""
        embeds = self.language_model.embed(input_ids)
        is_img = input_ids == self.config.image_token_id
        idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, row_embeds.shape[1] - 1)  # k-th image token of the row
        gathered = jnp.take_along_axis(row_embeds.astype(embeds.dtype), idx[..., None], axis=1)
        return jnp.where(is_img[..., None], gathered, embeds)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, T, D] -> float32[B, T, V] via lm_head or the tied embedding (products accumulated and returned
        in float32 whatever the compute dtype: losses and sampling read them)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        emb = self.language_model.embed_tokens[...].astype(hidden.dtype)
        return jnp.dot(hidden, emb.T, preferred_element_type=jnp.float32)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> InternVLOutput:
        """pixel_values float[N, H, W, 3]; input_ids / attention_mask int[B, T] -> InternVLOutput."""
        embeds = self.merge_image_embeddings(input_ids, self.image_embeddings(pixel_values))
        hidden, _ = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return InternVLOutput(logits=self.logits(hidden), hidden=hidden)
