"""Entry point: ``python -m vlm_jax.main --config configs/X.py --workdir DIR [--config.a.b=v ...] [--mode eval]``.

Multi-host: ``--coordinator_address host:port --num_processes N --process_id i`` start JAX's distributed runtime;
without them a real cluster launcher (SLURM, Open MPI, TPU pod, ...) is detected, and a single machine runs alone.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration (a configs/*.py file).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics.jsonl go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from the workdir) or eval a checkpoint.")
flags.DEFINE_integer("eval_step", None, "--mode eval: the checkpoint step (default: the latest).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax:
    """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings and errors still show."""

    def filter(self, record) -> bool:
        return record.levelno > 20 or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from vlm_jax import runs, sharding, train  # after flag parsing: jax must not start before distributed init

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("Config:\n%s", FLAGS.config)
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
        runs.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.eval_step)


if __name__ == "__main__":
    app.run(main)
