"""The one flag parser of the command lines (launch, study, eval.suite, generate, serve).

Every command takes its settings as `--config.KEY=VALUE` (or `--config.KEY VALUE`) overrides of a schema's
ConfigDict, typed like the key's default (bool: true/false/1/0; tuples: Python literals such as (2,4) or
comma-separated words a,b:c; strings as given), and exits 2 with the message of a user error (QdllmError).
"""
from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re

import ml_collections as mlc

from qdllm_jax import config_schema
from qdllm_jax.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    key, value = o if isinstance(o, tuple) else split_override(o)
    set_override(c, key, value)
  return c


def split_override(o: str):
  if "=" not in o:
    raise ConfigError(f"override {o!r} has no '='; expected --config.section.key=value")
  k, v = o.split("=", 1)
  return k.strip(), v


def parse_value(key: str, text: str, current, prefix: str = "--config."):
  """`text` typed like `current`; errors name the flag as PREFIXkey."""
  t = text.strip()
  if isinstance(current, bool):
    if t.lower() in ("true", "1", "yes"):
      return True
    if t.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"{prefix}{key}={text!r}: expected a boolean (true/false)")
  if isinstance(current, (int, float, tuple, list)) and not isinstance(current, bool):
    try:
      v = ast.literal_eval(t)
    except (ValueError, SyntaxError) as e:
      if isinstance(current, (tuple, list)) and re.fullmatch(r"[\w.:/=+-]+(,[\w.:/=+-]+)*", t):
        return tuple(t.split(","))  # comma-separated words: --config.entries=fp,gptq:w4a16
      raise ConfigError(f"{prefix}{key}={text!r}: expected a {type(current).__name__} literal") from e
    if isinstance(current, (tuple, list)):
      if isinstance(v, (int, str)):
        v = (v,)
      if not isinstance(v, (tuple, list)):
        raise ConfigError(f"{prefix}{key}={text!r}: expected a tuple such as (2, 4)")
      return tuple(v)
    if isinstance(current, float) and isinstance(v, int) and not isinstance(v, bool):
      return float(v)
    if type(v) is not type(current):
      raise ConfigError(f"{prefix}{key}={text!r}: expected a {type(current).__name__}, got {type(v).__name__}")
    return v
  return text


def set_override(c: mlc.ConfigDict, key: str, text, prefix: str = "--config.", hidden=()) -> None:
  """Set dotted `key` of `c` from a command-line string, typed like the existing value.

  Errors name the flag as PREFIXkey (the launch's --config., the generate/serve CLIs' --sampler.); keys in
  `hidden` (fixed ones such as the sampler's family) are not offered in the lists of known keys."""
  node, parts = c, key.split(".")
  for i, p in enumerate(parts[:-1]):
    if not isinstance(node, mlc.ConfigDict) or p not in node:
      raise ConfigError(f"{prefix}{key}: unknown section {'.'.join(parts[:i + 1])!r}; known: "
                        f"{known_keys(node, hidden)}")
    node = node[p]
  leaf = parts[-1]
  if not isinstance(node, mlc.ConfigDict) or leaf not in node:
    raise ConfigError(f"{prefix}{key}: unknown key; known keys here: {known_keys(node, hidden)}")
  current = node[leaf]
  if isinstance(current, mlc.ConfigDict):
    raise ConfigError(f"{prefix}{key} is a section; set one of its keys: {known_keys(current, hidden)}")
  value = parse_value(key, text, current, prefix) if isinstance(text, str) else text
  with node.ignore_type():
    node[leaf] = value


def known_keys(node, hidden=()) -> list:
  return sorted(k for k in node.keys() if k not in hidden) if isinstance(node, mlc.ConfigDict) else []


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




def parse_command(ap, argv, schema, required: str):
  """(args, [(key, value)] overrides) of a command's argv, or None when --help_keys printed `schema`'s keys.

  `ap` gets the --help_keys flag here; `required` names the flag (e.g. "--config") the command needs otherwise.
  """
  ap.add_argument("--help_keys", action="store_true", help="list every key with its default and meaning, then exit")
  args, rest = ap.parse_known_args(argv)
  if args.help_keys:
    print_keys(schema)
    return None
  if getattr(args, required.lstrip("-")) is None:
    ap.error(f"the following arguments are required: {required}")
  return args, split_overrides(rest, "--config.", ap.prog)


def print_keys(cls=config_schema.RunSpec, out=None) -> None:
  """Every key of a schema with its default and meaning, one per line (the commands' --help_keys)."""
  rows = list(config_schema.describe(cls))
  width = max(len(k) for k, _, _ in rows)
  for k, default, doc in rows:
    print(f"  --config.{k:<{width}}  {default!r:<14} {doc}", file=out)


def setup_logging(level: str = "INFO") -> None:
  """Log lines with time and level; the qdllm_jax logger at `level`, libraries (Orbax, absl) at WARNING."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("qdllm_jax").setLevel(level.upper())
