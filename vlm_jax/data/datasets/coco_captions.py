"""`coco_captions`: COCO captions in the Karpathy splits, built from files on the user's disk.

Expected files in `manual_dir` (nothing is downloaded):
    dataset_coco.json      Karpathy's split file: {"images": [{"filepath": "val2014",
                           "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895, "split": "test",
                           "sentences": [{"raw": "A man ...", ...}, ...]}, ...]}
    <filepath>/<filename>  the images, e.g. train2014/ and val2014/ as unpacked from COCO 2014
                           (an `images/` sub-folder holding both is also accepted)

Splits: train = Karpathy "train" + "restval" (113,287 images), validation = "val" (5,000), test = "test" (5,000).
Each record has the first `captions_per_image` (default 5) raw captions of an image; images with fewer are bad
records. No boxes or relations: `has_box` and `has_relation` are False. `image_id` is the COCO id (`cocoid`).

Bad records (missing, unreadable or truncated image, too few captions): the build fails with a ValueError naming
the cocoid and the image path, unless the builder is made with `skip_bad_records=True`, which skips and counts
them (`builder.num_skipped_records`, `builder.info.metadata["skipped_records"]` per split).

    builder = CocoCaptions(data_dir=..., skip_bad_records=False)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/coco"))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from vlm_jax.data.datasets import builder

KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "test": ("test",)}


@dataclasses.dataclass(eq=False)
class CocoCaptionsConfig(tfds.core.BuilderConfig):
    """`captions_per_image`: how many captions each record keeps (the first ones of the split file)."""

    captions_per_image: int = 5

    def __post_init__(self):
        if self.captions_per_image < 1:
            raise ValueError(f"coco_captions: captions_per_image must be >= 1, got {self.captions_per_image}")


class CocoCaptions(builder.ManualBuilder):
    """COCO captions, Karpathy splits, 5 captions per image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [CocoCaptionsConfig(name="karpathy", description="Karpathy splits, 5 captions per image")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self) -> tfds.core.DatasetInfo:
        k = self.builder_config.captions_per_image
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                **builder.record_features(k),
                "file_name": tfds.features.Text(),
            }),
            homepage="https://cocodataset.org/",
            metadata=self._metadata(),
            disable_shuffling=True,  # records in split-file order; the pipeline shuffles
        )

    def _split_generators(self, dl_manager):
        split_file = self._manual_file(dl_manager, ("dataset_coco.json",), "Karpathy's split file")
        entries = json.loads(split_file.read_text())
        if not isinstance(entries, dict) or "images" not in entries:
            raise ValueError(f"coco_captions: {split_file} is not a Karpathy split file (no 'images' list)")
        root = epath.Path(dl_manager.manual_dir)
        return {split: self._generate_examples(split, [e for e in entries["images"] if e.get("split") in names],
                                               root)
                for split, names in KARPATHY_SPLITS.items()}

    def _generate_examples(self, split: str, entries: list[dict], root: epath.Path) -> Iterator[tuple[int, dict]]:
        k = self.builder_config.captions_per_image
        for entry in entries:
            try:
                cocoid = int(entry["cocoid"])
                file_name = f"{entry.get('filepath', '')}/{entry['filename']}".lstrip("/")
                captions = [s["raw"].strip() for s in entry["sentences"]][:k]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"coco_captions: malformed entry in dataset_coco.json: {entry!r:.200} ({e})") from e
            what = f"coco_captions record cocoid={cocoid} ({file_name})"
            path = root / file_name
            if not path.exists() and (root / "images" / entry["filename"]).exists():
                path = root / "images" / entry["filename"]
            try:
                if len(captions) < k:
                    raise ValueError(f"{what}: expected at least {k} captions, found {len(captions)}")
                image = builder.read_image(path, what)
            except ValueError as e:
                self._bad.handle(split, e)
                continue
            yield cocoid, {
                "image": image,
                "image_id": cocoid,
                "file_name": file_name,
                "captions": captions,
                **builder.no_box_fields(k),
            }
        self._record_skips()
