"""Convert a GGUF checkpoint into an HF model directory (rpo.models.gguf_import says what is supported).

  python -m rpo.models.convert --gguf FILE --out DIR [--dtype float32|bfloat16] [--no-tokenizer] [--overwrite]

The directory (config.json, model.safetensors, tokenizer with its chat template, gguf_source.json)
loads in rpo.models.load_pretrained and in transformers.
"""

from __future__ import annotations

import argparse
import sys
import time

from rpo.models.gguf_import import GGUFError, convert_gguf, read_source


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rpo.models.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the .gguf file")
    ap.add_argument("--out", required=True, help="the HF model directory to write")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="of the written weights")
    ap.add_argument("--no-tokenizer", action="store_true", help="write the weights and config only")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        out = convert_gguf(args.gguf, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer,
                           overwrite=args.overwrite)
    except GGUFError as e:
        print(f"rpo.models.convert: {e}", file=sys.stderr)
        return 1
    src = read_source(out)
    print(f"rpo.models.convert: {args.gguf} ({src['general.name']}, {src['architecture']}, tensors "
          f"{src['tensor_types']}) -> {out} ({args.dtype}) in {time.time() - t0:.1f}s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
