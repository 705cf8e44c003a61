"""The command line: flags -> validated RunSpec -> `run.run`. Nothing else lives here.

  python -m qdllm_jax.launch --config configs/tiny.py --workdir runs/tiny
  python -m qdllm_jax.launch --config configs/llada8b.py:gptq_w2 --config.model_path=/ckpt/LLaDA-8B-Base \
      --config.calib.source=/data/c4-train.00000-of-01024.json.gz --workdir gs://... (a mounted path)
  python -m qdllm_jax.launch --config configs/llada8b.py --dry_run --config.plan.hardware=tpu_v5e_8

Flags:
  --config PATH[:PRESETS]    a config file with get_config(arg); PRESETS are method presets (qdllm_jax/run_configs.py)
  --config.KEY=VALUE         override any key of the schema (qdllm_jax/config_schema.py; --help_keys lists
                             them), typed like its default (also "--config.KEY VALUE")
  --help_keys                list every key with its default and meaning
  --workdir DIR              output directory (replaces config.workdir)
  --dry_run                  plan only: memory per device and host, mesh, rules, duration; reads no weights
  --overwrite                start over: remove this package's outputs in the workdir (whatever run made them)
  --kill_after_block N       testing crash recovery: SIGKILL this process right after block N's state is saved
  --log_level LEVEL          INFO (default), DEBUG, WARNING, ERROR
Exit status: 0 on success, 2 on a user error (QdllmError: the message says what to fix), 3 when the dry run
finds that the plan does not fit.
"""
from __future__ import annotations

import argparse
import sys

from qdllm_jax import config_check as config_lib
from qdllm_jax import config_schema
from qdllm_jax import plan as plan_lib
from qdllm_jax import run as run_lib
from qdllm_jax.cli import LOG_LEVELS, load_config, parse_command, setup_logging
from qdllm_jax.errors import QdllmError

HELP_DESCRIPTION = """Quantize a diffusion LLM end to end (load, calibrate, quantize, save, evaluate, report), or plan
it.

  python -m qdllm_jax.launch --config CONFIG[:PRESETS] [--workdir DIR] [--config.KEY=VALUE ...]
  python -m qdllm_jax.launch --config CONFIG[:PRESETS] --dry_run [--config.KEY=VALUE ...]

Examples:
  python -m qdllm_jax.launch --config configs/tiny.py --workdir runs/tiny
  python -m qdllm_jax.launch --config configs/llada8b.py:gptq_w2 --config.model_path=/ckpt/LLaDA-8B-Base \\
      --config.calib.source=/data/c4.json.gz --config.quant.group_size=128 --workdir runs/llada8b
  python -m qdllm_jax.launch --config configs/llada8b.py --dry_run --config.plan.hardware=tpu_v5e_8"""
HELP_EPILOG = """config overrides:
  --config.SECTION.KEY=VALUE (or --config.SECTION.KEY VALUE) sets any key of the schema, parsed to the type
  of its default (--help_keys lists every key with its default and meaning): --config.calib.nsamples=64,
  --config.quant.abmp_ratio=0.1, --config.eval.fp=false, --config.mesh.shape='(2,4)'. Every key is also
  explained in docs/launch.md ("Configs and overrides");
  an unknown key is an error that lists the keys of its section. Method presets after the config path, comma
  separated: configs/llada8b.py:gptq_w3, configs/dream7b.py:no_mcs,no_dor (qdllm_jax/run_configs.py).

exit status: 0 success, 2 a user error (the message names what to fix), 3 a dry run whose plan does not fit.
A killed run resumes from its last finished block when the same command is run again."""


def parse_args(argv):
  """(argparse namespace, [(key, value)] config overrides) from argv (without the program name), or None when
  --help_keys printed the keys (cli.parse_command, shared with study and eval)."""
  ap = argparse.ArgumentParser(prog="python -m qdllm_jax.launch", description=HELP_DESCRIPTION, epilog=HELP_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", metavar="CONFIG[:PRESETS]",
                  help="config file with get_config(), optionally followed by method presets, e.g. "
                       "configs/tiny.py or configs/llada8b.py:gptq_w3")
  ap.add_argument("--workdir", default=None, metavar="DIR",
                  help="output directory (replaces config.workdir); rerunning the same command there resumes")
  ap.add_argument("--dry_run", action="store_true",
                  help="print the plan only (memory per device and host, mesh, rules, duration); reads no weights")
  ap.add_argument("--overwrite", action="store_true",
                  help="start over: remove this package's outputs in the workdir (e.g. of a run with other "
                       "settings, or one made from weights that changed since) and stale temporary directories")
  ap.add_argument("--kill_after_block", type=int, default=None, help=argparse.SUPPRESS)  # crash-recovery tests
  ap.add_argument("--log_level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                  help="verbosity of the qdllm_jax log (default INFO); libraries stay at WARNING")
  return parse_command(ap, argv, config_schema.RunSpec, "--config")


def main(argv=None) -> int:
  """Run the CLI; returns the exit status (see the module docstring)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    parsed = parse_args(argv)
    if parsed is None:
      return 0
    args, overrides = parsed
    setup_logging(args.log_level)
    c = load_config(args.config, overrides)
    spec = config_lib.validate(c, workdir=args.workdir, dry_run=args.dry_run)
    if args.dry_run:
      text, plan = plan_lib.dry_run(spec)
      print(text, flush=True)
      return 0 if plan.fits else 3
    run_lib.run(spec, overwrite=args.overwrite, kill_after_block=args.kill_after_block,
                command=" ".join(["python -m qdllm_jax.launch"] + argv))
    return 0
  except QdllmError as e:
    print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
