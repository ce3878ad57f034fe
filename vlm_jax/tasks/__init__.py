"""The tasks a multitask model can train: `config.tasks` names the ones to build (its keys) and their settings.

Adding a task: write a `Task` subclass in a new module here (see `base.py` for the contract), add it to `TASKS`,
and give it a section `config.tasks.<name>` (with `weight`) in the config file.
"""

from vlm_jax.tasks.base import Features, Task, Widths, batch_valid, total_loss
from vlm_jax.tasks.box import BoxTask
from vlm_jax.tasks.detection import DetectionTask
from vlm_jax.tasks.itc import ContrastiveTask
from vlm_jax.tasks.itm import MatchingTask
from vlm_jax.tasks.lm import LanguageModelTask
from vlm_jax.tasks.spatial import SpatialTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ContrastiveTask, MatchingTask, BoxTask, SpatialTask,
                                                           DetectionTask, LanguageModelTask)}

__all__ = ["TASKS", "Features", "Task", "Widths", "batch_valid", "total_loss"]
