"""The README figure: predicted vs true subject boxes and spatial relations of the tiny demo on test images.

    python experiments/make_readme_figure.py --workdir /tmp/tiny_synthetic \
        [--output docs/figures/spatial_shapes_predictions.png] [--num_train_steps 2000] [--data_dir DIR]

When WORKDIR holds no checkpoint, trains `configs/tiny_synthetic.py` there first (the same run as
`python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir WORKDIR`); otherwise reads the latest checkpoint
with the config saved in it (a run of the training notebook works too). Then runs the eval step over the test split
and draws one caption of each of the first NUM_EXAMPLES images: true subject box (solid green), predicted box
(dashed magenta), true and predicted relation, with the split's metrics and chance levels in the title.

Measured (shared 2-core CPU, 2000 steps of batch 32 on the 4000/500/500-image config, 6 minutes in all): test
spatial accuracy 0.40 (majority class 0.18), text->image R@1 0.073 (chance 0.002), box IoU 0.085 (the mean box
scores 0.089): the box head predicts about the same box for every caption (its loss is flat from step 300 on).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "figures" / "spatial_shapes_predictions.png"


def restore_trained(workdir: str, num_train_steps: int, data_dir: str):
    """The run in `workdir` at its latest checkpoint, after training the tiny config there if it has none."""
    from vlm_jax import config_files, runs, train
    from vlm_jax.checkpoints import run as run_checkpoints

    subdir = os.path.join(workdir, run_checkpoints.CHECKPOINT_SUBDIR)
    if not run_checkpoints.is_run_dir(workdir) or not os.listdir(subdir):
        config = config_files.load_config_file(REPO / "configs" / "tiny_synthetic.py")
        config.num_train_steps = num_train_steps
        config.data.data_dir = data_dir
        config.checkpoint.every_steps = num_train_steps
        train.train_and_evaluate(config, workdir)
    return runs.restore_run(workdir)


def caption_pairs(config, split: str, image_ids: np.ndarray) -> list:
    """(record, caption index) of every row of `split` as collected: record i, caption k, in order."""
    from vlm_jax.data import pipeline

    source = pipeline.make_builder(config.data).as_data_source(split=split)
    pairs = [(source[i], k) for i in range(len(source)) for k in range(len(source[i]["captions"]))]
    if [int(r["image_id"]) for r, _ in pairs] != image_ids.tolist():
        raise ValueError(f"eval rows of split {split!r} are not in record order")
    return pairs


def draw(collected, pairs, m: dict, step: int, num_examples: int, ncols: int):
    """The figure of `collected` (outputs per row of the split) with the split's metrics `m` in the title."""
    import matplotlib

    matplotlib.use("Agg")
    from vlm_jax import viz
    from vlm_jax.data.datasets.relations import RELATIONS

    predicted = collected["spatial_logits"].argmax(-1)
    # One caption of each of the first images, alternating between their captions (more scenes than 2 per image).
    show = [r for r in range(len(pairs)) if pairs[r][1] == (r // 2) % len(pairs[r][0]["captions"])][:num_examples]

    def text(x):
        return x.decode() if isinstance(x, bytes) else str(x)

    labels = [f"relation: {RELATIONS[collected['relation'][i]]} / predicted {RELATIONS[predicted[i]]}" for i in show]
    fig = viz.examples_grid([pairs[i][0]["image"] for i in show], [text(pairs[i][0]["captions"][pairs[i][1]])
                                                                     for i in show],
                            boxes=collected["box"][show], pred_boxes=collected["box_pred"][show],
                            ncols=ncols, size=2.3, box_labels=labels)
    fig.suptitle(f"tiny demo, step {step}, test split: box IoU {m['box_iou']:.2f}, spatial acc {m['spatial_acc']:.2f} "
                 f"(chance {m['chance/spatial_acc']:.2f}), text->image R@1 {m['t2i_r1']:.3f} "
                 f"(chance {m['chance/t2i_r1']:.3f})\ngreen: true subject box, dashed magenta: predicted",
                 fontsize=9)
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (trained here when it has no checkpoint)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--num_train_steps", type=int, default=2000)
    parser.add_argument("--data_dir", default="", help="tfds data_dir ('' = ~/tensorflow_datasets)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_examples", type=int, default=8)
    parser.add_argument("--ncols", type=int, default=4)
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)

    from vlm_jax import runs

    run = restore_trained(args.workdir, args.num_train_steps, args.data_dir)
    m = runs.evaluate_split(run, args.split)
    collected = runs.collect_split(run, args.split)
    pairs = caption_pairs(run.config, args.split, collected["image_id"])
    fig = draw(collected, pairs, m, run.step, args.num_examples, args.ncols)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KB); step {run.step} {args.split}: "
          + ", ".join(f"{k} {m[k]:.3f}" for k in ("box_iou", "spatial_acc", "t2i_r1", "i2t_r1")))


if __name__ == "__main__":
    main()
