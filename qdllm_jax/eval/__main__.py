"""The evaluation command: one model under one shipped-data protocol, printed (and written) as JSON.

  python -m qdllm_jax.eval --model qdllm_jax/shipped/tiny-llada --config.protocol=tiny --config.out=tiny.json

Flags as the launch's (`--config.KEY=VALUE` or `--config.KEY VALUE`; `--help_keys` lists the keys of
config_schema.SuiteSpec). Exit status 0, or 2 on a user error.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax

from qdllm_jax import cli, config_schema
from qdllm_jax import config_check as config_lib
from qdllm_jax.errors import QdllmError
from qdllm_jax.eval.suite import evaluate, gumbel_precision_report
from qdllm_jax.models import load_pretrained, load_tokenizer


def main(argv=None) -> int:
  """CLI: python3 -m qdllm_jax.eval --model DIR [--config.protocol=tiny] [--config.seed=0]
  [--config.limit=0] [--config.out=r.json] [--config.gumbel=true] (flags as the launch's; --help_keys lists the
  keys). With gumbel: also gumbel_precision_report at temperatures 0.5 and 1.0 (task prompts, and 32 corpus prompts
  continued by 64 tokens)."""
  ap = argparse.ArgumentParser(prog="python -m qdllm_jax.eval",
                               description="Evaluate a qdllm-jax model under a shipped-data protocol.")
  ap.add_argument("--model", help="a local model directory (config.json + safetensors + tokenizer)")
  try:
    parsed = cli.parse_command(ap, argv, config_schema.SuiteSpec, "--model")
    if parsed is None:
      return 0
    args, overrides = parsed
    c = config_schema.defaults(config_schema.SuiteSpec)
    for k, v in overrides:
      cli.set_override(c, k, v)
    o = config_schema.build(config_schema.SuiteSpec, config_lib.check_types(c, config_schema.defaults(
        config_schema.SuiteSpec)))
    model, tok = load_pretrained(args.model), load_tokenizer(args.model)
    res = evaluate(model, tok, o.protocol, seed=o.seed, limit=o.limit or None)
    if o.gumbel:
      k = jax.random.key(o.seed)
      res["gumbel_precision"] = {
          "tasks": gumbel_precision_report(model, tok, key=k, limit=o.limit or None),
          "corpus_64": gumbel_precision_report(model, tok, key=k, source="corpus", gen_length=64)}
  except QdllmError as err:
    print(f"error ({type(err).__name__}): {err}", file=sys.stderr)
    return 2
  print(json.dumps(res, indent=2, default=float))
  if o.out:
    with open(o.out, "w") as f:
      json.dump(res, f, indent=2, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
