"""What text->image retrieval can reach on `spatial_shapes`: the strict protocol's ceilings and two partial oracles.

For each split of the default config and of the demo's 64 px config, one JSON line with
  ceiling_t2i_r1, ceiling_i2t_r1   `metrics.retrieval_ceilings` over `caption_truth.split_truth` (what the ITC
                                   evaluation reports as ceiling/...);
  true_of_several                  fraction of captions true of more than one image of the split;
  objects_oracle_t2i_r1            expected R@1 of a ranker that knows which two objects a caption names but not
                                   their relation (ties among the images holding both, at random);
  colours_oracle_t2i_r1            the same knowing only the two colours.

    python experiments/retrieval_oracles.py          # about 10 s on 2 cores
"""

import json

import numpy as np

from vlm_jax import caption_truth as ct
from vlm_jax import metrics
from vlm_jax.data.datasets import spatial_shapes as ss

CONFIGS = {"default": ss.make_config(),
           "demo_64px": ss.make_config(image_size=64, num_train=4000, num_validation=500, num_test=500)}


def split_rows(config, split: str) -> tuple[dict, list[dict]]:
    """(the collected-rows fields the ITC evaluation sees, one per caption; the split's records)."""
    records = [ss.generate_example(config, split, i) for i in range(config.split_sizes()[split])]
    rows = {k: [] for k in ("image_id", *ct.CAPTION_FIELDS, *ct.SCENE_FIELDS)}
    for r in records:
        keys = np.full(config.max_objects, ct.NO_KEY, np.int32)
        boxes = np.zeros((config.max_objects, 4), np.float32)
        keys[: len(r["object_names"])] = [ct.text_key(n) for n in r["object_names"]]
        boxes[: len(r["object_names"])] = r["object_boxes"]
        for k, caption in enumerate(r["captions"]):
            rows["image_id"].append(r["image_id"])
            rows["caption_key"].append(ct.text_key(caption))
            rows["subject_key"].append(ct.text_key(r["subjects"][k]))
            rows["reference_key"].append(ct.text_key(r["references"][k]))
            rows["relation"].append(r["relations"][k])
            rows["has_relation"].append(True)
            rows["scene_keys"].append(keys)
            rows["scene_boxes"].append(boxes)
    return {k: np.asarray(v) for k, v in rows.items()}, records


def partial_oracle(records, names_of) -> float:
    """Mean over captions of 1 / #images holding what `names_of(object name)` keeps of both named objects."""
    held = [{names_of(n) for n in r["object_names"]} for r in records]
    scores = []
    for r in records:
        for s, o in zip(r["subjects"], r["references"]):
            wanted = {names_of(s), names_of(o)}
            scores.append(1.0 / sum(wanted <= h for h in held))
    return float(np.mean(scores))


def main():
    for name, config in CONFIGS.items():
        for split in ("validation", "test"):
            rows, records = split_rows(config, split)
            truth, _, text_to_image = ct.split_truth(rows)
            true_pairs = truth == ct.TRUE
            ceilings = metrics.retrieval_ceilings(true_pairs, text_to_image)
            print(json.dumps({
                "config": name, "split": split, "images": len(records), "captions": len(text_to_image),
                "ceiling_t2i_r1": round(ceilings["t2i@1"], 4), "ceiling_i2t_r1": round(ceilings["i2t@1"], 4),
                "true_of_several": round(float(np.mean(true_pairs.sum(axis=0) > 1)), 3),
                "objects_oracle_t2i_r1": round(partial_oracle(records, lambda n: n), 4),
                "colours_oracle_t2i_r1": round(partial_oracle(records, lambda n: n.split()[0]), 4),
            }), flush=True)


if __name__ == "__main__":
    main()
