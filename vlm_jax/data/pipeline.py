"""The input pipeline: tfds data source -> grain -> host batches (`sharding.global_batch` makes global arrays).

The model decides the tile size, the `<IMG_CONTEXT>` tokens per tile and the tokenizer; the pipeline takes them
from it as `ModelInputs.from_model(model_config, tokenizer)`. `config.data` holds only what the data decides.

    source (tfds.data_source, images left encoded)
      -> [train] shard by process, shuffle (reshuffled every epoch), pick one caption per image per epoch
         [eval]  every (image, caption) pair once, in order, sharded by image over processes and padded to equal
                 batch counts
      -> decode + tile (InternVL dynamic tiles: 1..max_tiles tiles chosen by aspect ratio + a thumbnail; one
         whole-image tile when max_tiles = 1) + tokenise the caption
      -> batch (this process's share of the global batch): the distinct images' tiles packed into one tile array,
         prompts built with each image's tile count -> optional worker processes -> `PipelineIterator`

Training visits images, not captions: each epoch shows every image of this process's shard once, with one of its
captions drawn at random (a fresh draw every epoch, deterministic in the seed), so a batch rarely holds the same
image twice and datasets with a variable number of captions per image need no index scan. In-batch negatives for
ITC/ITM are formed in the model; `image_id` lets the losses mask captions of the same image.

Tiles and static shapes: images have 1..T tiles (T = max_tiles + 1 thumbnail, or 1). A batch's tiles go into one
array whose length N is the smallest of a few bucket sizes (`config.data.tile_buckets` sizes up to the batch's tile
budget, multiples of the devices the batch is split over) that holds them; prompts are padded to the smallest of
as many lengths. So the step compiles a handful of shapes. A batch whose tiles exceed the budget
(`config.data.tile_budget` tiles per image on average) re-tiles its largest image with fewer tiles until it fits
(counted: `retiled_images`) -- never truncated. In evaluation, rows of the same image share its tiles, so the vision
tower sees each image once per batch however many captions it has.

Batch fields (numpy; row fields have this process's B rows first, tile fields its N tiles; see the contract):
    tiles        float32[N, S, S, 3]  normalised tiles of the batch's distinct images, image by image (each image's
                 grid row-major, its thumbnail last), zero padding tiles at the end
    tile_regions float32[N, 4]  the part of the whole image each tile shows (normalised xyxy; padding: zeros)
    row_tiles    int32[B, T]   indices into `tiles` of each row's image tiles, in order; -1 after num_tiles
    num_tiles    int32[B]
    image_id     int32[B]
    image_aspect float32[B]    the image's width / height
    text_ids, text_mask      int32[B, max_text_length]    caption tokens + EOS, right-padded
    prompt_ids, prompt_mask  int32[B, Lp]  template with <img><IMG_CONTEXT>*(Q*num_tiles)</img> + caption (Lp: the
                 batch's prompt bucket)
    box          float32[B, 4], has_box bool[B], relation int32[B], has_relation bool[B]
    reference_box  float32[B, 4]  the relation's reference object (zeros without a relation)
    caption_key, subject_key, reference_key   int32[B]  `caption_truth.text_key` of the caption and of the objects
                 it relates (-1 when the dataset does not name them)
    scene_keys   int32[B, N], scene_boxes float32[B, N, 4]: the image's objects (name keys, -1 padding; boxes), for
                 datasets that know every object (`spatial_shapes`: N = max_objects; else N = 0). With the caption
                 keys they decide which pairs are true negatives (`vlm_jax.caption_truth`).
    query_ids, query_mask    int32[B, max_text_length]  "the <subject> and the <reference>" (the spatial task's
                 query without the relation), for datasets that name both objects
    valid        bool[B]  (eval only) False on the padding rows that even out the processes' batch counts
    lm_ids, lm_labels, lm_spans, lm_mask  int32[B, Lg]  (with `lm_kinds`) a generative target: the prompt with the
                 image block and a question, then the answer and EOS (`vlm_jax.data.generative`); labels -100 except on
                 the answer; span ids name the answer's parts; Lg: the batch's LM length bucket
    lm_kind      int32[B]  the question's kind (index in `generative.KINDS`): drawn per example in training, a fixed
                 cycle in evaluation

With a feature cache (`make_iterator(..., cache=shard)`, `vlm_jax.feature_cache`) images are neither decoded nor
tiled: `tiles`, `tile_regions`, `row_tiles` and the prompts are replaced by the backbone's cached outputs of each
row (`cached_image`, `cached_patches`, `cached_regions`, `cached_text`, `cached_text_hidden`, `cached_query`: those
the tasks read; see `MultitaskModel.backbone_outputs`), `num_tiles` and `image_aspect` come from the cache, and the
order, caption draws and iterator state are those of the uncached iterator.

Determinism and resume: the order depends only on (seed, shard, config); `PipelineIterator` is a grain
`DatasetIterator`, so `get_state()`/`set_state()` resume exactly and `checkpoint_args(it)` /
`checkpoint_restore_args(it)` are the items to put into an orbax `ocp.args.Composite` checkpoint.

Counters (`PipelineIterator.stats`, restored with the state): captions and prompts truncated at token level
(captions keep their EOS; prompts lose caption tokens only, never part of an image block), images re-tiled to fit
the tile budget, real and padding tiles and prompt tokens (the padding fractions the train log reports), and the
bad records the builder skipped at build time (`skip_bad_records`). Builders check every image when they build, so a decode error
while reading means the files changed since: it raises a ValueError naming the dataset and image_id.

Processes and workers: shard k of n reads records k, k+n, ... of the split (train) or pairs k, k+n, ... (eval).
Every process prepares the dataset if it is missing; when several build into a shared data_dir at once, the ones
that lose the final rename read the finished copy. `num_workers > 0` starts grain worker processes (spawned: the
launching script needs an `if __name__ == "__main__":` guard, which absl's `app.run` entry points have). On the
2-core CPU here workers cost more than they give (measured: 448 px tiles, internvl2_5 template, batch 32: 194
examples/s in-process, 59 with 2 workers); on a host with spare cores they take decoding off the training thread.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath

from vlm_jax import caption_truth
from vlm_jax import tokenizer as tokenizer_lib
from vlm_jax.data import generative, preprocess
from vlm_jax.data.batching import make_batcher, tiles_per_image
from vlm_jax.data import prompt as prompt_lib
from vlm_jax.data.datasets import relations

if TYPE_CHECKING:
    from vlm_jax.models.config import InternVLConfig

COUNTERS = ("truncated_captions", "truncated_prompts", "truncated_answers", "retiled_images", "tiles", "padding_tiles", "prompt_tokens",
            "padding_tokens")


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What the pipeline takes from the model: its tokenizer, tile size and `<IMG_CONTEXT>` tokens per tile."""

    tokenizer: Any  # a transformers tokenizer with the InternVL special tokens
    image_size: int  # tile side in pixels
    num_image_tokens: int  # LM tokens per tile

    @classmethod
    def from_model(cls, model_config: InternVLConfig, tokenizer) -> ModelInputs:
        """The inputs `model_config` expects, checked against `tokenizer` (image token id, vocabulary size)."""
        context_id = tokenizer.convert_tokens_to_ids(tokenizer_lib.IMG_CONTEXT)
        if context_id != model_config.image_token_id:
            raise ValueError(f"the tokenizer's {tokenizer_lib.IMG_CONTEXT} is id {context_id} but the model "
                             f"expects image_token_id={model_config.image_token_id}")
        if len(tokenizer) > model_config.text.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                             f"{model_config.text.vocab_size}")
        return cls(tokenizer, int(model_config.image_size), int(model_config.num_image_tokens))


# ------------------------------------------------------------------------------------------------------------------
# Sources and tokenisation.


def _builder_class(name: str):
    # Imported here so that importing the pipeline does not register every builder with tfds.
    if name == "spatial_shapes":
        from vlm_jax.data.datasets import spatial_shapes
        return spatial_shapes.SpatialShapes
    if name == "coco_captions":
        from vlm_jax.data.datasets import coco_captions
        return coco_captions.CocoCaptions
    if name == "refcoco":
        from vlm_jax.data.datasets import refcoco
        return refcoco.RefCoco
    if name == "coco_detection":
        from vlm_jax.data.datasets import coco_detection
        return coco_detection.CocoDetection
    raise ValueError(f"config.data.name must be 'spatial_shapes', 'coco_captions', 'refcoco' or 'coco_detection', "
                     f"got {name!r}")


def make_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The tfds builder named by `data_config` (prepared on disk when `prepare` is set)."""
    cls = _builder_class(data_config.name)
    kwargs: dict[str, Any] = {"data_dir": data_config.data_dir or None}
    params = data_config.builder_params.to_dict()
    if params and (data_config.name != "spatial_shapes" or data_config.builder_config):
        raise ValueError(f"config.data.builder_params={params} is for spatial_shapes without a builder_config; "
                         f"got name={data_config.name!r}, builder_config={data_config.builder_config!r}")
    if params:
        from vlm_jax.data.datasets import spatial_shapes
        kwargs["config"] = spatial_shapes.make_config(**params)
    elif data_config.builder_config:
        kwargs["config"] = data_config.builder_config
    if data_config.name != "spatial_shapes":
        kwargs["skip_bad_records"] = bool(data_config.skip_bad_records)
    builder = cls(**kwargs)
    if data_config.prepare:
        download_config = tfds.download.DownloadConfig(manual_dir=data_config.manual_dir or None)
        try:
            builder.download_and_prepare(download_config=download_config)
        except Exception:  # pylint: disable=broad-except
            # Several processes sharing data_dir may build at once; tfds renames a finished build into place, so
            # the slower ones fail on that rename (the error type depends on the file backend). If the dataset is
            # there now, read it; otherwise the error was a real one.
            builder = cls(**kwargs)
            if not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
                raise
    return builder


def load_source(data_config: ml_collections.ConfigDict, split: str):
    """(builder, random-access source of `split` with images left encoded)."""
    builder = make_builder(data_config)
    if split not in builder.info.splits:
        raise ValueError(f"{builder.name}: no split {split!r}; available: {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return builder, source


def prompt_length(data_config: ml_collections.ConfigDict, inputs: ModelInputs) -> int:
    """The longest `prompt_ids`: `max_prompt_length`, or room for T tiles' image block + caption + template."""
    if data_config.max_prompt_length > 0:
        return int(data_config.max_prompt_length)
    image_tokens = inputs.num_image_tokens * tiles_per_image(data_config)
    return image_tokens + int(data_config.max_text_length) + 16  # 16: template tokens and image delimiters


def lm_length(data_config: ml_collections.ConfigDict, inputs: ModelInputs) -> int:
    """The longest LM sequence (generative targets): `max_lm_length`, or a bound on any target with T tiles
    (`generative.longest_sequence`: the image block, the question, an answer of max_text_length tokens, a box)."""
    if data_config.get("max_lm_length", -1) > 0:
        return int(data_config.max_lm_length)
    return generative.longest_sequence(make_prompt_builder(data_config, inputs),
                                       inputs.num_image_tokens * tiles_per_image(data_config),
                                       int(data_config.max_text_length))


def make_prompt_builder(data_config: ml_collections.ConfigDict, inputs: ModelInputs) -> prompt_lib.PromptBuilder:
    """A PromptBuilder with the model's tokenizer and tokens per tile and the configured template."""
    return prompt_lib.PromptBuilder(inputs.tokenizer, inputs.num_image_tokens, template=data_config.template)


# ------------------------------------------------------------------------------------------------------------------
# Per-example transforms (run in the worker processes when there are workers).


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclasses.dataclass
class _Encoder:
    """Record + caption index -> one example (decode and tile the image, tokenise the caption); the batch's prompts
    are built by `batching.Batcher`, which knows every image's final tile count."""

    dataset: str
    builder: prompt_lib.PromptBuilder  # copies with the caption and prompt length limits
    image_size: int
    text_length: int
    prompt_length: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    scene_size: int  # N of scene_keys / scene_boxes
    with_queries: bool  # the records name each caption's subject and reference
    lm_kinds: tuple[str, ...] = ()  # generative targets (`generative.KINDS`) of the LM task; () = none
    lm_length: int = 0  # the longest LM sequence
    with_images: bool = True  # False: the image is neither decoded nor tiled (its features come from a cache)

    def __post_init__(self):
        self._captions = copy.copy(self.builder)
        self._captions.max_length = self.text_length
        self.prompts = copy.copy(self.builder)
        self.prompts.max_length = self.prompt_length

    def tiles(self, image, image_id: int, max_tiles: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32[n, S, S, 3] tiles, float32[n, 4] their regions of the image) with at most `max_tiles` tiles."""
        return preprocess.tiles_and_regions(image, self.image_size, min(self.min_tiles, max_tiles), max_tiles,
                                            self.use_thumbnail, name=f"{self.dataset} image_id={image_id}")

    def caption(self, record: dict, k: int) -> dict:
        """Caption k's text tower input and labels: text_ids/mask, box, has_box, relation, has_relation."""
        captions = copy.copy(self._captions)  # its own truncation counter: examples are encoded on several threads
        caption = _text(record["captions"][k])
        ids, mask = captions.batch([captions.caption_ids(caption)], length=self.text_length, padding_side="right")
        out = {
            "image_id": np.int32(record["image_id"]),
            "text_ids": ids[0],
            "text_mask": mask[0],
            "box": np.asarray(record["boxes"][k], np.float32),
            "reference_box": np.asarray(record["reference_boxes"][k], np.float32),
            "has_box": np.bool_(record["has_box"][k]),
            "relation": np.int32(record["relations"][k]),
            "has_relation": np.bool_(record["has_relation"][k]),
            "caption_key": np.int32(caption_truth.text_key(caption)),
            "subject_key": np.int32(caption_truth.NO_KEY),
            "reference_key": np.int32(caption_truth.NO_KEY),
        }
        out.update(self.scene(record))
        if self.with_queries:
            subject, reference = _text(record["subjects"][k]), _text(record["references"][k])
            out["subject_key"] = np.int32(caption_truth.text_key(subject))
            out["reference_key"] = np.int32(caption_truth.text_key(reference))
            ids, mask = captions.batch([captions.caption_ids(relations.pair_query(subject, reference))],
                                       length=self.text_length, padding_side="right")
            out.update(query_ids=ids[0], query_mask=mask[0])
        out["_truncated_captions"] = np.int32(captions.num_truncated > 0)
        return out

    def scene(self, record: dict) -> dict:
        """scene_keys int32[N] and scene_boxes float32[N, 4] of the record's objects (padding: key -1)."""
        keys = np.full(self.scene_size, caption_truth.NO_KEY, np.int32)
        boxes = np.zeros((self.scene_size, 4), np.float32)
        if self.scene_size:
            names = [_text(n) for n in record["object_names"]]
            if len(names) > self.scene_size:
                raise ValueError(f"{self.dataset} image_id={int(record['image_id'])}: {len(names)} objects, more "
                                 f"than the builder config's max_objects={self.scene_size}")
            keys[: len(names)] = [caption_truth.text_key(n) for n in names]
            boxes[: len(names)] = np.asarray(record["object_boxes"], np.float32).reshape(-1, 4)
        return {"scene_keys": keys, "scene_boxes": boxes}

    def __call__(self, record: dict, k: int, kind: str | None = None, index: int = -1) -> dict:
        """The example: caption fields, and under private keys for `batching.Batcher` the image's tiles, (`kind`) the
        generative target and the record's index in the split and caption index (the feature cache's keys)."""
        out = self.caption(record, k)
        out.update(_record_index=np.int64(index), _caption_index=np.int64(k))
        if kind is not None:
            out["_target"] = generative.make_target(record, k, kind)
        if not self.with_images:
            return out
        image_id = int(record["image_id"])
        image = preprocess.load_image(record["image"], name=f"{self.dataset} image_id={image_id}")
        tiles, regions = self.tiles(image, image_id, self.max_tiles)
        out.update(image_aspect=np.float32(image.width / image.height), _image_tiles=tiles, _image_regions=regions, _encoded=record["image"], _caption=_text(record["captions"][k]))
        return out


@dataclasses.dataclass
class _RandomCaption:
    """Train: one caption of the record, drawn with the per-element rng grain derives from (seed, epoch, index)."""

    source: Any
    encode: _Encoder

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        record = self.source[index]
        k = int(rng.integers(len(record["captions"])))
        kinds = self.encode.lm_kinds
        return self.encode(record, k, generative.pick_kind(kinds, rng, index) if kinds else None, index)


@dataclasses.dataclass
class _Pair:
    """Eval: the example at a flat position (record, caption, valid); padding rows repeat item 0 with valid=False."""

    source: Any
    encode: _Encoder

    def __call__(self, item) -> dict:
        record_index, k, valid = (int(v) for v in item)
        kinds = self.encode.lm_kinds
        out = self.encode(self.source[record_index], k,
                          generative.pick_kind(kinds, None, record_index + k) if kinds else None, record_index)
        out["valid"] = np.bool_(valid)
        return out


# ------------------------------------------------------------------------------------------------------------------
# Iterator with counters.


class PipelineIterator(grain.DatasetIterator):
    """Host batches; strips the per-example counters into `stats`. State = grain's state + the counters."""

    def __init__(self, parent: grain.DatasetIterator, *, skipped_bad_records: int = 0):
        super().__init__(parent)
        self._skipped = int(skipped_bad_records)
        self._counts = {k: 0 for k in COUNTERS}
        self._counts["examples"] = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        for name in COUNTERS:
            self._counts[name] += int(np.sum(batch.pop("_" + name, 0)))
        self._counts["examples"] += len(batch["image_id"])
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Counts over the batches produced so far by this process (examples include eval padding rows)."""
        return dict(self._counts, skipped_bad_records=self._skipped)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._parent.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["grain"])
        self._counts = {k: int(v) for k, v in state["counts"].items()}


def checkpoint_args(iterator: PipelineIterator):
    """The orbax item that saves `iterator`'s state: `ocp.args.Composite(..., data=checkpoint_args(it))`."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: PipelineIterator):
    """The orbax item that restores into `iterator` in place: `ocp.args.Composite(data=checkpoint_restore_args(it))`."""
    return grain.checkpoint.CheckpointRestore(iterator)


# ------------------------------------------------------------------------------------------------------------------
# Building the iterator.


def _ensure_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app they are not parsed yet.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


_SCANNED_COUNTS: dict[tuple, list[int]] = {}


def _caption_counts(builder, source, split: str) -> list[int]:
    (k,) = builder.info.features["captions"].shape
    if k:  # a fixed number of captions per record needs no scan
        return [k] * len(source)
    # A variable one reads every record (COCO's training split: all its image bytes), once per process and build:
    # evaluations and the feature cache's write pass ask again. A rebuilt dataset rewrites its dataset_info.json.
    info = epath.Path(builder.data_dir) / "dataset_info.json"
    try:
        stat = os.stat(info)
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except (OSError, TypeError):  # not a local file
        stamp = None
    key = (str(builder.data_dir), split, len(source), stamp)
    if key not in _SCANNED_COUNTS:
        _SCANNED_COUNTS[key] = [len(source[i]["captions"]) for i in range(len(source))]
    return list(_SCANNED_COUNTS[key])


def shard_images(data_config: ml_collections.ConfigDict, split: str, shard_index: int,
                 shard_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64[I] the records of `split` shard `shard_index` of `shard_count` reads: shard_index, shard_index +
    shard_count, ...; int64[I] their caption counts), the same images in training and evaluation."""
    builder, source = load_source(data_config, split)
    counts = np.asarray(_caption_counts(builder, source, split), np.int64)
    records = np.arange(shard_index, len(counts), shard_count, dtype=np.int64)
    return records, counts[records]


def eval_batch_count(data_config: ml_collections.ConfigDict, split: str, shard_count: int,
                     local_batch_size: int) -> int:
    """The number of evaluation batches every shard of `split` yields."""
    builder, source = load_source(data_config, split)
    counts = _caption_counts(builder, source, split)
    return len(_eval_items(counts, 0, shard_count, local_batch_size)) // local_batch_size


def _eval_items(counts: Sequence[int], shard_index: int, shard_count: int, local_batch_size: int) -> np.ndarray:
    """int64[P, 3] (record, caption, valid): the pairs of this shard's images (records k, k + n, ...), padded so
    every shard has the same batch count. Sharding by image keeps an image's captions in one process, where they
    share its tiles."""
    def pairs(shard):
        return [(i, k) for i in range(shard, len(counts), shard_count) for k in range(counts[i])]

    per_shard = max(sum(counts[shard::shard_count]) for shard in range(shard_count))
    num_batches = max(1, math.ceil(per_shard / local_batch_size))
    mine = np.asarray(pairs(shard_index), np.int64).reshape(-1, 2)
    out = np.zeros((num_batches * local_batch_size, 3), np.int64)
    out[: len(mine), :2] = mine
    out[: len(mine), 2] = 1
    return out


def _most_images_per_batch(items: np.ndarray, local_batch_size: int) -> int:
    """The most distinct records in one batch of `_eval_items` (padding rows read record 0's image)."""
    records = np.sort(items[:, 0].reshape(-1, local_batch_size), axis=1)
    return int((np.diff(records, axis=1) != 0).sum(axis=1).max()) + 1


def scene_size(builder) -> int:
    """N of the scene fields: the builder config's `max_objects` when records list every object, else 0."""
    if "object_names" not in builder.info.features:
        return 0
    size = getattr(builder.builder_config, "max_objects", None)
    if not size:
        raise ValueError(f"{builder.name}: records list their objects but the builder config has no max_objects")
    return int(size)


def make_iterator(data_config: ml_collections.ConfigDict, inputs: ModelInputs, *, split: str, train: bool,
                  global_batch_size: int, seed: int, shard_index: int, shard_count: int,
                  tile_multiple: int = 1, cache=None, with_keys: bool = False,
                  first_batch: int = 0) -> PipelineIterator:
    """This process's iterator of host batches of `global_batch_size / shard_count` rows.

    train=True: shuffled (by `seed`), one random caption per image, `num_epochs` passes (-1 = forever), full batches
    only. train=False: every (image, caption) pair of the split once in a fixed order, with a `valid` field; all
    shards yield the same number of batches.
    Shard `shard_index` of `shard_count` (jax.process_index() / jax.process_count() in a multi-process run) reads a
    disjoint 1/shard_count of the images. `tile_multiple`: tile counts are multiples of it (the devices this
    process's share of the batch is split over).
    `cache` (a `vlm_jax.feature_cache.CacheShard` of this split and shard): images are not decoded; the batches carry
    the backbone's cached outputs instead of tiles and prompts. `with_keys`: batches carry `record_index` and
    `caption_index` int64[B] (the cache's keys). `first_batch` (eval only): start at that batch.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if global_batch_size % shard_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {shard_count} processes")
    local_batch_size = global_batch_size // shard_count
    builder, source = load_source(data_config, split)
    features = builder.info.features
    encode = _Encoder(dataset=builder.name, builder=make_prompt_builder(data_config, inputs),
                      image_size=inputs.image_size, text_length=int(data_config.max_text_length),
                      prompt_length=prompt_length(data_config, inputs), min_tiles=int(data_config.min_tiles),
                      max_tiles=int(data_config.max_tiles), use_thumbnail=bool(data_config.use_thumbnail),
                      scene_size=scene_size(builder), with_queries="subjects" in features and "references" in features,
                      lm_kinds=tuple(data_config.get("lm_kinds", ())), lm_length=lm_length(data_config, inputs),
                      with_images=cache is None)
    if not train:
        items = _eval_items(_caption_counts(builder, source, split), shard_index, shard_count, local_batch_size)
    if cache is not None:
        batcher = cache.batcher(data_config)
    else:
        batcher = make_batcher(data_config, encode, local_batch_size, tile_multiple=tile_multiple,
                               share_images=not train, with_keys=with_keys,
                               images_per_batch=None if train else _most_images_per_batch(items, local_batch_size))
    if train:
        indices = grain.MapDataset.range(len(source))[shard_index::shard_count]
        if len(indices) < local_batch_size:
            raise ValueError(f"split {split!r} shard {shard_index}/{shard_count} has {len(indices)} images, fewer "
                             f"than one batch of {local_batch_size}")
        epochs = None if data_config.num_epochs < 0 else int(data_config.num_epochs)
        ds = indices.shuffle(seed=seed).random_map(_RandomCaption(source, encode), seed=seed).repeat(epochs)
        ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=batcher)
    else:
        items = items[first_batch * local_batch_size:]
        ds = grain.MapDataset.source(items).map(_Pair(source, encode)).batch(local_batch_size, batch_fn=batcher)
    # grain's default reads ahead 500 elements on 16 threads from the moment the iterator exists; on a few cores
    # those threads take the interpreter from the training loop (and a resumed iterator throws that read-ahead
    # away). Two batches ahead on two threads keep a step fed.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local_batch_size))
    if data_config.num_workers > 0:
        _ensure_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data_config.num_workers), per_worker_buffer_size=int(data_config.worker_buffer_size)))
    skipped = int(builder.info.metadata.get("num_skipped_records", 0)) if builder.info.metadata else 0
    return PipelineIterator(iter(iter_ds), skipped_bad_records=skipped)
