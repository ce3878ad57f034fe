"""Entry point: ``python -m vlm_jax.main --config configs/X.py --workdir DIR [--config.a.b=v ...] [--mode eval]``.

``--print_config`` prints the config (with the overrides applied) and exits; an override of a field the config
does not have is refused with the nearest field names before anything starts.

Multi-host: ``--coordinator_address host:port --num_processes N --process_id i`` start JAX's distributed runtime;
without them a real cluster launcher (SLURM, Open MPI, TPU pod, ...) is detected, and a single machine runs alone.
"""

import os
import sys

from vlm_jax import console

console.quiet_third_party()  # before TensorFlow or transformers are imported anywhere

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlm_jax import config_check, config_files, config_reference  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration (a configs/*.py file).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics.jsonl go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from the workdir) or eval a checkpoint.")
flags.DEFINE_integer("eval_step", None, "--mode eval: the checkpoint step (default: the latest).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir even though the config differs from the one its "
                  "checkpoint was trained with (fields outside vlm_jax.workdir.SAFE_TO_CHANGE).")
flags.DEFINE_bool("print_config", False, "Print the config (overrides applied) and exit.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.print_config:
        print(config_reference.describe(FLAGS.config))
        return
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    console.configure(logging.get_absl_handler(), verbose=FLAGS.verbosity > 0)
    from vlm_jax import runs, sharding, train  # after flag parsing: jax must not start before distributed init

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
    else:
        runs.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.eval_step)


def refuse_unknown_overrides(argv) -> None:
    """Exits with one line per ``--config.<field>`` the config file does not have (absl's own error is a long
    traceback)."""
    given = config_check.config_file_argument(argv)
    if given is None or not os.path.isfile(given[0]):
        return  # absl reports a missing or unreadable config file
    lines = config_check.unknown_override_keys(config_files.load_config_file(*given), argv)
    if lines:
        sys.exit("\n".join(f"error: {line}" for line in lines))


if __name__ == "__main__":
    refuse_unknown_overrides(sys.argv)
    app.run(main)
