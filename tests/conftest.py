"""Suite-wide set-up: one JAX compilation cache on disk for every test process and the subprocesses they start
(rpo.main runs, 8-device checks), so a program compiled once (the quick configs' sampler and train steps) is not
compiled again by the next run of it. Speed only: a cache hit returns the same executable."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"rpo-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
