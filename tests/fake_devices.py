"""Runs a test file's own `--sharded-check` entry point in a fresh process that sees 8 fake CPU devices (XLA reads
the device count only at start-up, so the pytest process cannot switch to 8 itself)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sharded_check(test_file: str) -> dict:
    """`python test_file --sharded-check` on 8 fake devices; returns the JSON of its last stdout line."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, os.path.abspath(test_file), "--sharded-check"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)  # a guard against a hang only
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
