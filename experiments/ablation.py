"""Ablation of the tiny demo: text pooling, fusion, and the seed recipe's heads vs the default heads.

Each run is `python -m vlm_jax.main --config configs/tiny_synthetic.py --workdir DIR --config.x=y ...` (the same
code path as the demo) in a fresh process; its final evaluation is read back from DIR/metrics.jsonl. One JSON line
per run goes to stdout and to --output (appended), with the final metrics of every evaluated split and the wall time.

    python experiments/ablation.py --steps 600 --output experiments/results/ablation.jsonl
    python experiments/ablation.py --steps 600 --runs seed_heads,default   # a subset
    python experiments/ablation.py --runs default --extra="--config.tasks.box.weight=1.0"   # overrides for every run

Runs (name: overrides of configs/tiny_synthetic.py):
    seed_heads      the seed recipe's heads: [u, v] into linear ITM / box / spatial heads (late fusion, text last)
    default         the default heads: [u, v, u*v, |u-v|] into MLP heads, attention box head (late, text last)
    text_first      default heads, text pooling first token
    text_mean       default heads, text pooling mean
    lm              default heads, lm fusion (image tokens and caption through the LM together)
    seed_heads_lm   the seed recipe's heads on lm fusion
    seed_recipe     seed heads + text first (the seed recipe's pooling and heads)
    default_box01   default heads with box loss weight 0.1 (the seed recipe's) instead of the demo's 1.0
    caption_spatial default heads, the spatial head reading the caption (which names the relation)
The default spatial task reads "the A and the B" and attends over the image; runs with the seed heads or `lm`
fusion read the caption instead (CAPTION_SPATIAL).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# The seed recipe's heads: its spatial head is a linear head on the caption's fused feature (the caption names
# the relation); `lm` fusion runs read the caption too (the 'objects' query needs late fusion).
CAPTION_SPATIAL = ["--config.tasks.spatial.query=caption", "--config.tasks.spatial.head=mlp"]
SEED_HEADS = ["--config.model.embedding.fusion_features=concat", "--config.tasks.itm.hidden_dim=0",
              "--config.tasks.spatial.hidden_dim=0", "--config.tasks.box.head=linear", *CAPTION_SPATIAL]

RUNS = {
    "seed_heads": SEED_HEADS,
    "default": [],
    "text_first": ["--config.model.embedding.text_pool=first"],
    "text_mean": ["--config.model.embedding.text_pool=mean"],
    "lm": ["--config.model.embedding.fusion=lm", *CAPTION_SPATIAL],
    "seed_heads_lm": SEED_HEADS + ["--config.model.embedding.fusion=lm"],
    "caption_spatial": CAPTION_SPATIAL,
    "default_box01": ["--config.tasks.box.weight=0.1"],
    "seed_recipe": SEED_HEADS + ["--config.model.embedding.text_pool=first"],
}

KEYS = ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "t2i_r1_true", "i2t_r1_true", "loss/itm", "itm_acc", "itm_auc",
        "itm_acc_hard", "itm_auc_hard", "box_iou", "box_giou", "box_l1", "box_acc50", "spatial_acc", "spatial_f1")


def final_metrics(path: str) -> dict:
    """{split: {metric: value}} from the last evaluation of each split in a metrics.jsonl."""
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "split" in rec:
                out[rec["split"]] = rec
    return {split: {k: rec[k] for k in sorted(rec) if k in KEYS or k.startswith(("box_", "chance/", "ceiling/"))}
            for split, rec in out.items()}


def run_one(name: str, overrides: list[str], steps: int, config: str, workroot: str, extra: list[str]) -> dict:
    workdir = os.path.join(workroot, name)
    cmd = [sys.executable, "-m", "vlm_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.num_train_steps={steps}", f"--config.eval_every={steps}", f"--config.log_every={steps}",
           f"--config.checkpoint.every_steps={steps}", "--config.eval_splits=('validation','test')",
           *overrides, *extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return {"run": name, "steps": steps, "overrides": overrides + extra, "error": proc.returncode,
                "wall_s": round(wall, 1)}
    return {"run": name, "steps": steps, "overrides": overrides + extra, "wall_s": round(wall, 1),
            **final_metrics(os.path.join(workdir, "metrics.jsonl"))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--config", default="configs/tiny_synthetic.py")
    parser.add_argument("--workdir", default="", help="root of the runs' workdirs (default: a temporary folder)")
    parser.add_argument("--output", default="", help="JSONL file to append one line per run to")
    parser.add_argument("--extra", default="", help="space-separated overrides added to every run")
    args = parser.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise ValueError(f"--runs: unknown {unknown}; expected names from {list(RUNS)}")
    workroot = args.workdir or tempfile.mkdtemp(prefix="ablation_")
    for name in names:
        record = run_one(name, RUNS[name], args.steps, args.config, workroot, args.extra.split())
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
