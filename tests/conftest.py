"""Test-wide setup: 8 fake CPU devices so sharding tests run on any machine."""

import os

# Must happen before jax is imported anywhere.
# A generous collective timeout: on a loaded 2-core machine an 8-device rendezvous can be slow. The lowest backend
# optimisation level compiles a tiny train step in about 25 s instead of 40 s; tests check results, not speed.
# Subprocesses of the tests take these flags with their own device count (fixtures.subprocess_xla_flags).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=900 "
                 "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
