"""The multitask model over InternVL dynamic tiles: shared tiles, masked padding, pooling over an image's tiles,
attention heads over every tile's patches in whole-image coordinates, and lm fusion of pairs whose images have
different tile counts -- each against a direct computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_multitask import IMG_CONTEXT, IMG_END, IMG_START, embedding_config, make_batch, task_configs, tiny_backbone
from vlm_jax.models import pooling
from vlm_jax.multitask import MultitaskModel, patch_positions, splice_prompts
from vlm_jax.tasks.heads import AttentionBoxHead, patch_grid

B = 4
# Rows 0 and 3 show image 0 (3 tiles: a 2x1 grid + thumbnail), row 1 image 1 (1 tile), row 2 image 2 (2x2 + thumb).
COUNTS = {0: 3, 1: 1, 2: 5}
IMAGE_OF_ROW = [0, 1, 2, 0]
T = 5
GRIDS = {0: (2, 1), 1: (1, 1), 2: (2, 2)}


def regions_of(image):
    cols, rows = GRIDS[image]
    cells = [[c / cols, r / rows, (c + 1) / cols, (r + 1) / rows] for r in range(rows) for c in range(cols)]
    return cells + ([[0.0, 0.0, 1.0, 1.0]] if cols * rows > 1 else [])


def tiled_batch(q, *, share: bool, padding_tiles: int = 2, seed: int = 0):
    """make_batch's captions with the images above as tiles: shared by rows 0 and 3 (`share`) or stored per row;
    random (not zero) padding tiles, which nothing may read."""
    rng = np.random.default_rng(seed)
    pixels = {i: rng.normal(size=(n, 32, 32, 3)).astype(np.float32) for i, n in COUNTS.items()}
    order = list(dict.fromkeys(IMAGE_OF_ROW)) if share else IMAGE_OF_ROW
    tiles, regions, start = [], [], {}
    for k, image in enumerate(order):
        start[(image, k)] = sum(len(t) for t in tiles)
        tiles.append(pixels[image])
        regions.append(np.asarray(regions_of(image), np.float32))
    row_tiles = np.full((B, T), -1, np.int32)
    for r, image in enumerate(IMAGE_OF_ROW):
        key = (image, order.index(image)) if share else (image, r)
        row_tiles[r, :COUNTS[image]] = start[key] + np.arange(COUNTS[image])
    tiles.append(rng.normal(size=(padding_tiles, 32, 32, 3)).astype(np.float32))
    regions.append(rng.uniform(size=(padding_tiles, 4)).astype(np.float32))
    batch = make_batch(q, seed)
    del batch["image"]
    # Prompts with each row's image block of q * tiles tokens, then its caption; right-padded to one length.
    text_ids, text_mask = np.asarray(batch["text_ids"]), np.asarray(batch["text_mask"])
    rows = [[IMG_START] + [IMG_CONTEXT] * (q * COUNTS[i]) + [IMG_END] + text_ids[r][text_mask[r] == 1].tolist()
            for r, i in enumerate(IMAGE_OF_ROW)]
    length = max(2 + q * T + text_ids.shape[1], max(map(len, rows)))
    prompt_ids = np.zeros((B, length), np.int32)
    prompt_mask = np.zeros((B, length), np.int32)
    for r, seq in enumerate(rows):
        prompt_ids[r, :len(seq)], prompt_mask[r, :len(seq)] = seq, 1
    batch.update(tiles=jnp.asarray(np.concatenate(tiles)), tile_regions=jnp.asarray(np.concatenate(regions)),
                 row_tiles=jnp.asarray(row_tiles), image_id=jnp.asarray(IMAGE_OF_ROW, jnp.int32),
                 prompt_ids=jnp.asarray(prompt_ids), prompt_mask=jnp.asarray(prompt_mask))
    return batch, pixels, rows


@pytest.fixture(scope="module")
def backbone():
    return nnx.jit(tiny_backbone)()


def _model(backbone, fusion="late", **embedding):
    tasks = task_configs(box={"head": "attention", "num_heads": 2},
                         spatial={"head": "attention", "num_heads": 2, "locate": 0.0})
    return MultitaskModel(backbone, embedding_config(fusion=fusion, **embedding), tasks,
                          rngs=nnx.Rngs(params=1, dropout=2, itm=3))


@nnx.jit
def _eval(model, batch):
    return model(batch, train=False)


@pytest.mark.parametrize("pool", [("map", "all"), ("cls", "thumbnail")])
def test_shared_tiles_equal_tiles_stored_per_row(backbone, pool):
    """The ViT output of a shared tile serves every row that shows its image; padding tiles change nothing."""
    model = _model(backbone, vision_pool=pool[0], tile_pool=pool[1])
    q = backbone.config.num_image_tokens
    shared, _, _ = tiled_batch(q, share=True, padding_tiles=5)  # 9 tiles + 5 padding
    per_row, _, _ = tiled_batch(q, share=False, padding_tiles=2)  # 12 tiles + 2 padding: the same compiled shapes
    assert shared["tiles"].shape == per_row["tiles"].shape
    a, b = _eval(model, shared), _eval(model, per_row)
    for k in ("image_emb", "box_pred", "spatial_logits", "itm_logits"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    np.testing.assert_allclose(a["image_emb"][0], a["image_emb"][3], atol=1e-6)


def test_one_tile_per_row_equals_the_image_batch(backbone):
    model = _model(backbone)
    batch = make_batch(backbone.config.num_image_tokens)
    tiled = dict(batch, tiles=batch["image"], row_tiles=jnp.arange(B, dtype=jnp.int32)[:, None],
                 tile_regions=jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]]), (B, 1)))
    del tiled["image"]
    a, b = _eval(model, batch), _eval(model, tiled)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pooling_over_tiles_is_the_direct_formula():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 4, 1 + 6, 8)).astype(np.float32)  # [B, T, 1+P, Dv]
    present = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    got_cls = pooling.pool_tiles(hidden, present, "cls", "all")
    got_mean = pooling.pool_tiles(hidden, present, "mean", "all")
    got_thumb = pooling.pool_tiles(hidden, present, "cls", "thumbnail")
    head = pooling.MAPHead(8, 2, rngs=nnx.Rngs(0))
    got_map = pooling.pool_tiles(hidden, present, "map", "all", head)
    for b in range(3):
        n = present[b].sum()
        np.testing.assert_allclose(got_cls[b], hidden[b, :n, 0].mean(0), rtol=1e-6)
        np.testing.assert_allclose(got_mean[b], hidden[b, :n, 1:].reshape(-1, 8).mean(0), rtol=1e-5)
        np.testing.assert_allclose(got_thumb[b], hidden[b, n - 1, 0], rtol=1e-6)
        alone = head(jnp.asarray(hidden[b, :n, 1:].reshape(1, -1, 8)))[0]  # only the present patches, no mask
        np.testing.assert_allclose(got_map[b], alone, rtol=1e-5, atol=1e-6)


def test_patch_positions_map_tiles_into_the_whole_image():
    regions = jnp.asarray(regions_of(2), jnp.float32)  # 2x2 grid + thumbnail
    got = np.asarray(patch_positions(regions, 2, 2))  # [5, 4, 2]
    centres = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])  # of a 2x2 patch grid
    for k, (x0, y0, x1, y1) in enumerate(regions_of(2)):
        np.testing.assert_allclose(got[k], [[x0 + (x1 - x0) * x, y0 + (y1 - y0) * y] for x, y in centres],
                                   atol=1e-7)
    np.testing.assert_allclose(got[1, 0], [0.625, 0.125])  # tile (col 1, row 0): its first patch


def test_attention_head_over_masked_patches_equals_the_present_patches():
    rng = np.random.default_rng(2)
    head = AttentionBoxHead(6, 8, 3, 16, rngs=nnx.Rngs(0))
    query = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    patches = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    grid = jnp.asarray(rng.uniform(size=(2, 12, 2)), jnp.float32)
    mask = jnp.asarray(np.arange(12)[None] < np.array([[8], [4]]))
    got = head(query, patches, grid, mask)
    for b, n in enumerate((8, 4)):
        alone = head(query[b:b + 1], patches[b:b + 1, :n], grid[b:b + 1, :n])
        np.testing.assert_allclose(got[b], alone[0], rtol=1e-5, atol=1e-6)
    # With one tile per row the grid may be shared: [P, 2] equals it broadcast to [B, P, 2].
    np.testing.assert_allclose(head(query, patches, patch_grid(3, 4)),
                               head(query, patches, jnp.broadcast_to(patch_grid(3, 4), (2, 12, 2))), atol=1e-6)


def test_lm_fusion_pairs_splice_the_image_block_of_one_row_and_the_caption_of_another(backbone):
    """fuse(image i, caption j) = the LM over <img> + image i's q*n_i tokens + </img> + caption j, built directly."""
    model = _model(backbone, fusion="lm")
    q = backbone.config.num_image_tokens
    batch, pixels, rows = tiled_batch(q, share=True)
    pairs = jnp.array([[0, 1], [1, 2], [2, 0], [3, 3], [1, 1]], jnp.int32)

    @nnx.jit
    def fused(model, batch):
        return model.features(batch, train=False).fuse(pairs[:, 0], pairs[:, 1])

    got = np.asarray(fused(model, batch))

    @nnx.jit
    def direct(model, ids, pixels):
        bb = model.backbone
        embeds = bb.merge_image_embeddings(ids, bb.image_embeddings(pixels))
        hidden, _ = bb.language_model(inputs_embeds=embeds, attention_mask=jnp.ones_like(ids))
        return hidden[0, -1]

    for k, (i, j) in enumerate(np.asarray(pairs)):
        image = IMAGE_OF_ROW[i]
        caption = rows[j][rows[j].index(IMG_END) + 1:]
        ids = [IMG_START] + [IMG_CONTEXT] * (q * COUNTS[image]) + [IMG_END] + caption
        want = direct(model, jnp.asarray([ids], jnp.int32), jnp.asarray(pixels[image]))
        np.testing.assert_allclose(got[k], want, rtol=2e-5, atol=2e-5, err_msg=f"pair {i, j}")


def test_splice_prompts_keeps_padding_out():
    ids = jnp.asarray([[1, 9, 9, 2, 5, 6, 0, 0], [1, 9, 2, 7, 7, 7, 7, 0]], jnp.int32)  # 9 = image token
    mask = (ids != 0).astype(jnp.int32)
    out_ids, out_mask = splice_prompts(ids, mask, 9, jnp.array([0, 1]), jnp.array([1, 0]))
    np.testing.assert_array_equal(out_ids[0][np.asarray(out_mask[0]) == 1], [1, 9, 9, 2, 7, 7, 7, 7])
    np.testing.assert_array_equal(out_ids[1][np.asarray(out_mask[1]) == 1], [1, 9, 2, 5, 6])
    assert jax.device_get(out_mask).sum() == 13
