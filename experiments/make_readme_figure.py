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
import json
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "figures" / "spatial_shapes_predictions.png"


def load_config(name: str):
    from vlm_jax import config_files

    return config_files.load_config_file(REPO / "configs" / f"{name}.py")


def ensure_trained(workdir: str, num_train_steps: int, data_dir: str):
    """The run's config: from the latest checkpoint's meta, after training the tiny config if there is none."""
    import ml_collections
    from vlm_jax import checkpointing, train

    if not checkpointing.is_run_dir(workdir) or not os.listdir(os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR)):
        config = load_config("tiny_synthetic")
        config.num_train_steps = num_train_steps
        config.data.data_dir = data_dir
        config.checkpoint.every_steps = num_train_steps
        train.train_and_evaluate(config, workdir)
    return ml_collections.ConfigDict(json.loads(checkpointing.read_meta(workdir)["config"]))


def predict_split(config, workdir: str, split: str):
    """(eval outputs of every (image, caption) pair of `split` from the latest checkpoint, their records, step)."""
    from vlm_jax import checkpointing, evaluate, sharding, train
    from vlm_jax.data import pipeline

    mesh = sharding.make_mesh(config.mesh)
    trainer = train.make_trainer(config, mesh)
    manager = checkpointing.make_manager(workdir, config.checkpoint)
    step = manager.latest_step()
    model_state, items, _ = checkpointing.restore(manager, step, trainer.abstract_model, trainer.abstract_train_items())
    state = trainer.assemble(model_state, items)
    collected = evaluate.collect(lambda b: trainer.eval_step(state, b), train.make_data(config, split, train=False),
                                 config.eval_batch_size, lambda b: sharding.global_batch(b, mesh))
    source = pipeline.make_builder(config.data).as_data_source(split=split)
    # Eval rows are the (image, caption) pairs of the split in order: record i, caption k.
    pairs = [(source[i], k) for i in range(len(source)) for k in range(len(source[i]["captions"]))]
    if [int(r["image_id"]) for r, _ in pairs] != collected["image_id"].tolist():
        raise ValueError(f"eval rows of split {split!r} are not in record order")
    return collected, pairs, step


def draw(collected, pairs, step: int, num_examples: int, ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    from vlm_jax import evaluate, viz
    from vlm_jax.data.datasets.relations import RELATIONS

    m = evaluate.compute_metrics(collected)
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
    return fig, m


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

    config = ensure_trained(args.workdir, args.num_train_steps, args.data_dir)
    collected, pairs, step = predict_split(config, args.workdir, args.split)
    fig, m = draw(collected, pairs, step, args.num_examples, args.ncols)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KB); step {step} {args.split}: "
          + ", ".join(f"{k} {m[k]:.3f}" for k in ("box_iou", "spatial_acc", "t2i_r1", "i2t_r1")))


if __name__ == "__main__":
    main()
