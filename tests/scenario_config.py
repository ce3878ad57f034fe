"""The demo config at the fault scenarios' tiny sizes (tests/fault_scenarios.py), as a config file for the command
line: ``python -m vlm_jax.main --config tests/scenario_config.py[:eval] --config.data.data_dir=DIR``.

8 steps of batch 8 on spatial_shapes' "tiny" build (the four tasks with plain heads), a checkpoint every 2 steps, the 3 newest kept, no evaluation;
``:eval`` evaluates the validation split every 4 steps (evaluations change no training array, so both forms train
the same weights).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # noqa: E402

STEPS = 8


def get_config(arg: str | None = None):
    cfg = fixtures.demo_config()
    cfg.data = fixtures.data_config()
    cfg.batch_size, cfg.eval_batch_size = 8, 32
    cfg.num_train_steps, cfg.log_every, cfg.eval_every, cfg.eval_splits = STEPS, 2, 0, ()
    cfg.checkpoint.update(every_steps=2, keep=3)
    # The four tasks with their plain heads (a linear box head, the spatial MLP on the caption): the faults are
    # about runs and checkpoints, and these compile in about half the time of the attention heads.
    cfg.tasks.box.head = "linear"
    cfg.tasks.spatial.update(query="caption", head="mlp", locate=0.0)
    if arg == "eval":
        cfg.eval_every, cfg.eval_splits = 4, ("validation",)
    elif arg:
        raise ValueError(f"tests/scenario_config.py takes no argument or ':eval', got {arg!r}")
    return cfg
