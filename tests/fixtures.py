"""Shared test fixtures: the demo config's sections on small settings, and task modules built from them."""

import pathlib

import ml_collections
from flax import nnx

from vlm_jax import config_files
from vlm_jax import tasks as tasks_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config() -> ml_collections.ConfigDict:
    """`configs/tiny_synthetic.py`'s whole config (a fresh copy)."""
    return config_files.load_config_file(REPO / "configs" / "tiny_synthetic.py")


def data_config(**changes) -> ml_collections.ConfigDict:
    """The demo config's `config.data` on spatial_shapes' small "tiny" build (256 train images of 64 px), with
    `changes` applied."""
    c = demo_config().data
    c.builder_config = "tiny"
    c.builder_params = {}
    c.update(changes)
    return c


def make_tasks(settings: dict, widths: tasks_lib.Widths | None = None, seed: int = 0) -> dict:
    """Task modules {name: Task} for the tasks named in ``settings`` ({task: {field: value}}), each starting from
    the demo config's section of that task; default widths: vision 8, text 8, embeddings 16, fused 32."""
    widths = widths or tasks_lib.Widths(vision=8, text=8, embed=16, fused=32)
    sections = demo_config().tasks
    out = {}
    for name, changes in settings.items():
        cfg = sections[name]
        cfg.update(changes)
        out[name] = tasks_lib.TASKS[name](cfg, widths, rngs=nnx.Rngs(seed))
    return out
