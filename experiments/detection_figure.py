"""The README's detection figure and metrics: a trained configs/tiny_detection.py run on a split.

    python -m vlm_jax.main --config configs/tiny_detection.py --workdir /tmp/vlm_jax_detection
    python experiments/detection_figure.py --workdir /tmp/vlm_jax_detection \
        [--split test] [--output docs/figures/detection_predictions.png]

Restores the latest checkpoint with its saved config, runs the eval step over the split, prints one JSON line with
the detection metrics (class-agnostic and per class) next to the constant-box baseline, and draws the first
NUM_SHOWN images as the task's TensorBoard pictures: true boxes green, detections with objectness >= 0.5
magenta, the predicted class names below.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "figures" / "detection_predictions.png"
NUM_SHOWN = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained configs/tiny_detection.py run")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()

    from vlm_jax import eval_pictures, runs

    run = runs.restore_run(args.workdir)
    config = run.config
    config.eval_splits = (args.split,)
    collected = runs.collect_state(run.trainer, run.state, config, run.inputs, args.split)
    task = run.trainer.tasks["detection"]
    metrics = task.metrics(collected)
    print(json.dumps({"workdir": args.workdir, "step": run.step, "split": args.split, "num_images":
                      int(len(np.unique(collected["image_id"]))), **{k: round(v, 4) for k, v in metrics.items()}}))

    examples = eval_pictures.EvalExamples.load(config.data, args.split, collected["image_id"], num_rows=2 * NUM_SHOWN)
    grid = task.eval_pictures(collected, examples)["detections"][:NUM_SHOWN]  # [N, H, W, 3], the TensorBoard pictures
    rows = [np.concatenate(list(grid[k:k + 4]), axis=1) for k in range(0, len(grid), 4)]
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
