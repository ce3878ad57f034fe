"""The feature cache: with a frozen backbone and late fusion, the backbone's outputs for an image and a caption never
change, so a first pass over each split writes them to disk and every epoch and evaluation after it runs only the
adapters and heads (`config.feature_cache.enabled`).

    prepare(trainer, state, config, inputs, workdir) -> {split: CacheShard}   (in the train loop, after restore)
      check_cacheable: a trainable backbone parameter (named), fusion 'lm' or the lm task -> CacheError
      per split (training + evaluation), per process (its own shard of the images):
        key = sha256(backbone weights, model and pooling settings, cached fields, preprocessing and tokenizer,
                     dataset version and split, shard, device kind)           (`key`)
        <feature_cache.dir or workdir/feature_cache>/<split>/<key[:16]>/process_<i>_of_<n>/
        complete -> read; partial (killed pass) -> resumed after its last flushed batch; damaged -> rebuilt;
        caches of other keys beside it are logged with their size (never read, never deleted)
        write pass: every (image, caption) of the shard in evaluation order, the backbone step
                    (`MultitaskModel.backbone_outputs`), size logged and free disk checked before the first write
    pipeline.make_iterator(..., cache=shard): images are not decoded; batches carry the cached outputs
      (`cached_image`, `cached_patches`, `cached_regions`, `cached_text`, `cached_text_hidden`, `cached_query`:
      only those the configured tasks read), and the model's `features` skips the backbone.

Cached rows are what the backbone step returned (same dtype, the same bits; other batches than the train step's, so
its own values may differ in the last bits), the data order and the dropout and sampling streams are those of the
uncached run, so a run with the cache trains the same model (tests/test_feature_cache.py: within 1e-6). Every
image is cached at its own tiling: the tile budget, a bound on the vision tower's work per batch, does not apply.
"""

from vlm_jax.feature_cache.prepare import cache_root, check_cacheable, open_shard, other_caches, prepare, write_shard
from vlm_jax.feature_cache.store import CacheError, CacheShard, ShardLayout

__all__ = ["CacheError", "CacheShard", "ShardLayout", "cache_root", "check_cacheable", "open_shard", "other_caches",
           "prepare", "write_shard"]
