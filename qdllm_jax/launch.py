"""The command line: flags -> validated RunSpec -> `run.run`. Nothing else lives here.

  python -m qdllm_jax.launch --config configs/tiny.py --workdir runs/tiny
  python -m qdllm_jax.launch --config configs/llada8b.py:gptq_w2 --config.model_path=/ckpt/LLaDA-8B-Base \
      --config.calib.source=/data/c4-train.00000-of-01024.json.gz --workdir gs://... (a mounted path)
  python -m qdllm_jax.launch --config configs/llada8b.py --dry_run --config.plan.hardware=tpu_v5e_8

Flags:
  --config PATH[:PRESETS]    a config file with get_config(arg); PRESETS are method presets (configs/presets.py)
  --config.KEY=VALUE         override any key of configs/base.py, typed like its default (also "--config.KEY VALUE")
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
import ast
import importlib.util
import logging
import os
import re
import sys

import ml_collections as mlc

from qdllm_jax.errors import ConfigError, QdllmError


def load_config(spec: str, overrides=()) -> mlc.ConfigDict:
  """`path/to/config.py[:arg]` -> get_config(arg), then `overrides` applied in order.

  Args:
    spec: config file path, optionally followed by ':' and the argument of get_config (method presets).
    overrides: ["a.b=value", ...] or [("a.b", "value")]; values are parsed to the type of the existing key
      (bool: true/false/1/0; tuples: Python literals such as (2,4) or comma-separated words a,b:c;
      strings as given).
  Raises ConfigError: missing file, no get_config, unknown preset, unknown key, unparsable value.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; expected e.g. configs/tiny.py or configs/llada8b.py")
  name = "qdllm_run_config_" + os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(mod_spec)
  try:
    mod_spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: report where
    raise ConfigError(f"config file {path!r} failed to import: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
  try:
    c = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # unknown preset
    raise ConfigError(f"{path}:{arg}: {e}") from e
  for o in overrides:
    key, value = o if isinstance(o, tuple) else _split_override(o)
    set_override(c, key, value)
  return c


def _split_override(o: str):
  if "=" not in o:
    raise ConfigError(f"override {o!r} has no '='; expected --config.section.key=value")
  k, v = o.split("=", 1)
  return k.strip(), v


def _parse_value(key: str, text: str, current):
  t = text.strip()
  if isinstance(current, bool):
    if t.lower() in ("true", "1", "yes"):
      return True
    if t.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text!r}: expected a boolean (true/false)")
  if isinstance(current, (int, float, tuple, list)) and not isinstance(current, bool):
    try:
      v = ast.literal_eval(t)
    except (ValueError, SyntaxError) as e:
      if isinstance(current, (tuple, list)) and re.fullmatch(r"[\w.:/=+-]+(,[\w.:/=+-]+)*", t):
        return tuple(t.split(","))  # comma-separated words: --config.entries=fp,gptq:w4a16
      raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__} literal") from e
    if isinstance(current, (tuple, list)):
      if isinstance(v, (int, str)):
        v = (v,)
      if not isinstance(v, (tuple, list)):
        raise ConfigError(f"--config.{key}={text!r}: expected a tuple such as (2, 4)")
      return tuple(v)
    if isinstance(current, float) and isinstance(v, int) and not isinstance(v, bool):
      return float(v)
    if type(v) is not type(current):
      raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__}, got {type(v).__name__}")
    return v
  return text


def set_override(c: mlc.ConfigDict, key: str, text) -> None:
  """Set dotted `key` of `c` from a command-line string, typed like the existing value."""
  node, parts = c, key.split(".")
  for i, p in enumerate(parts[:-1]):
    if not isinstance(node, mlc.ConfigDict) or p not in node:
      raise ConfigError(f"--config.{key}: unknown section {'.'.join(parts[:i + 1])!r}; known: {_known(node)}")
    node = node[p]
  leaf = parts[-1]
  if not isinstance(node, mlc.ConfigDict) or leaf not in node:
    raise ConfigError(f"--config.{key}: unknown key; known keys here: {_known(node)}")
  current = node[leaf]
  if isinstance(current, mlc.ConfigDict):
    raise ConfigError(f"--config.{key} is a section; set one of its keys: {_known(current)}")
  value = _parse_value(key, text, current) if isinstance(text, str) else text
  with node.ignore_type():
    node[leaf] = value


def _known(node) -> list:
  return sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else []


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
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
  --config.SECTION.KEY=VALUE (or --config.SECTION.KEY VALUE) sets any key of configs/base.py, parsed to the type
  of its default: --config.calib.nsamples=64, --config.quant.abmp_ratio=0.1, --config.eval.fp=false,
  --config.mesh.shape='(2,4)'. Every key is listed and explained in docs/launch.md ("Configs and overrides");
  an unknown key is an error that lists the keys of its section. Method presets after the config path, comma
  separated: configs/llada8b.py:gptq_w3, configs/dream7b.py:no_mcs,no_dor (configs/presets.py).

exit status: 0 success, 2 a user error (the message names what to fix), 3 a dry run whose plan does not fit.
A killed run resumes from its last finished block when the same command is run again."""


def parse_args(argv):
  """(argparse namespace, [(key, value)] config overrides) from argv (without the program name)."""
  ap = argparse.ArgumentParser(prog="python -m qdllm_jax.launch", description=HELP_DESCRIPTION, epilog=HELP_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True, metavar="CONFIG[:PRESETS]",
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
  args, rest = ap.parse_known_args(argv)
  return args, split_overrides(rest, "--config.", ap.prog)


def split_overrides(rest, prefix: str, prog: str) -> list:
  """[(key, value)] from the argv left over by argparse: `PREFIXkey=value` or `PREFIXkey value` tokens.

  ConfigError for any other token or a missing value (shared by the launch's --config. and the generate/serve
  CLIs' --sampler. overrides)."""
  overrides, i = [], 0
  while i < len(rest):
    tok = rest[i]
    if not tok.startswith(prefix):
      raise ConfigError(f"unknown argument {tok!r}; expected {prefix}KEY=VALUE overrides or the flags of "
                        f"`{prog} --help`")
    if "=" in tok:
      k, v = tok[len(prefix):].split("=", 1)
      i += 1
    elif i + 1 < len(rest):
      k, v = tok[len(prefix):], rest[i + 1]
      i += 2
    else:
      raise ConfigError(f"{tok} has no value; expected {tok}=VALUE")
    overrides.append((k, v))
  return overrides


def main(argv=None) -> int:
  """Run the CLI; returns the exit status (see the module docstring)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
  try:
    args, overrides = parse_args(argv)
    logging.getLogger("qdllm_jax").setLevel(args.log_level.upper())  # libraries (Orbax, absl) stay at WARNING
    c = load_config(args.config, overrides)
    from qdllm_jax import config as config_lib
    from qdllm_jax import plan as plan_lib
    from qdllm_jax import run as run_lib
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
