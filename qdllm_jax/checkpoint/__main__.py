"""`python -m qdllm_jax.checkpoint verify DIR [DIR ...]`: check quantized checkpoints without building a model.

Every file is checked against checksums.json and every stored array against its sha256 in the sidecar
(`qdllm_jax.checkpoint.verify`). Exit status 0 when all match, 2 when one does not (the message names the file
or array and the fix).
"""
from __future__ import annotations

import argparse
import sys

from qdllm_jax.checkpoint import quantized
from qdllm_jax.errors import QdllmError


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m qdllm_jax.checkpoint", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="check files and arrays against their recorded sha256 (exit 0 ok, 2 mismatch)")
  v.add_argument("dirs", nargs="+", metavar="DIR", help="a checkpoint directory written by save_quantized")
  args = ap.parse_args(argv)
  status = 0
  for d in args.dirs:
    try:
      r = quantized.verify(d)
    except QdllmError as e:
      print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
      status = 2
      continue
    print(f"{d}: ok ({r['files']} files, {r['bytes']} bytes, {r['arrays']} arrays match their sha256)")
  return status


if __name__ == "__main__":
  sys.exit(main())
