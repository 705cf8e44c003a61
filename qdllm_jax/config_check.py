"""Run configs: validate a ConfigDict (from `configs/<run>.py`, see launch.py) and freeze it.

The only module below the CLI that reads `ConfigDict`s. `validate` checks every key against the schema of
`config_schema.py` (unknown keys, types, values) and returns a `RunSpec` of frozen dataclasses that the
layers below take; `check_model` / `check_tokenizer` add the checks that need the checkpoint's config.json
or tokenizer (group sizes dividing the widths, mask id, vocabulary), all before any weights are read.
Every failure is a ConfigError naming the key, the value found, what was expected and how to fix it.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections as mlc

from qdllm_jax.calib.calibration import CALIB_SUFFIXES
from qdllm_jax.config_schema import RunSpec, build, defaults
from qdllm_jax.errors import ConfigError
from qdllm_jax.eval import protocols
from qdllm_jax.hardware import HARDWARE
from qdllm_jax.models import families
from qdllm_jax.quant import methods, pipeline
from qdllm_jax.quant import rules as rules_lib
from qdllm_jax.quant.methods import SCALE_DTYPES

DTYPES = ("auto", "float32", "bfloat16")
CALIB_NAMED = ("corpus", "c4", "wikitext2")
MESH_AXES = ("data", "model")
# Keys each method reads (the others are ignored by it): declared by the method (quant/method_<name>.py).
METHOD_KEYS = {name: m.config_keys for name, m in methods.REGISTRY.items()}


def _schema() -> mlc.ConfigDict:
  return defaults(RunSpec)


# ------------------------------------------------------------------------------------------ validation
def _err(key, value, expected, fix=""):
  raise ConfigError(f"config.{key}={value!r}: expected {expected}" + (f"; {fix}" if fix else ""))


def check_types(c, schema, prefix="") -> dict:
  """Plain nested dict of `c`, checked key by key against the schema's keys and value types."""
  if not isinstance(c, (mlc.ConfigDict, dict)):
    raise ConfigError(f"config{'.' + prefix[:-1] if prefix else ''} is a {type(c).__name__}; expected a section")
  unknown = sorted(set(c.keys()) - set(schema.keys()))
  if unknown:
    raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; known keys"
                      f"{' of ' + prefix[:-1] if prefix else ''}: {sorted(schema.keys())} "
                      "(every key: python -m qdllm_jax.launch --help_keys)")
  out = {}
  for k in schema.keys():
    ref, key = schema[k], prefix + k
    v = c[k] if k in c else ref
    if isinstance(ref, mlc.ConfigDict):
      out[k] = check_types(v, ref, key + ".")
    elif isinstance(ref, bool):
      out[k] = v if isinstance(v, bool) else _err(key, v, "a boolean (True/False)")
    elif isinstance(ref, int):
      out[k] = v if isinstance(v, int) and not isinstance(v, bool) else _err(key, v, "an integer")
    elif isinstance(ref, float):
      out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _err(key, v, "a number")
    elif isinstance(ref, str):
      out[k] = v if isinstance(v, str) else _err(key, v, "a string")
    elif isinstance(ref, tuple):
      out[k] = tuple(v) if isinstance(v, (tuple, list)) else _err(key, v, "a tuple")
    else:
      out[k] = v
  return out


def check_writable_dir(path: str, key: str) -> None:
  """path exists as a writable directory, or can be created (its nearest existing ancestor is writable)."""
  p = os.path.abspath(path)
  if os.path.exists(p) and not os.path.isdir(p):
    _err(key, path, "a directory", "it exists as a file; choose another path")
  probe = p
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
    _err(key, path, "a writable directory", f"{probe} is not writable; choose a path you can write to")


def _check_calib(d, dry_run):
  src = d["source"]
  if src not in CALIB_NAMED:
    if not src:
      _err("calib.source", src, f"one of {CALIB_NAMED} or a local file/directory")
    if not dry_run and not os.path.exists(src):
      _err("calib.source", src, f"one of {CALIB_NAMED} or an existing local file/directory of {CALIB_SUFFIXES}",
           "the path does not exist (download the C4 shard en/c4-train.00000-of-01024.json.gz and point here)")
    if os.path.isfile(src) and not src.endswith(CALIB_SUFFIXES):
      _err("calib.source", src, f"a file ending in one of {CALIB_SUFFIXES}")
  for k, lo in (("nsamples", 1), ("seqlen", 2), ("timesteps_per_sample", 1), ("chunk_size", 1), ("seed_x", 0)):
    if d[k] < lo:
      _err(f"calib.{k}", d[k], f"an integer >= {lo}")
  if not 0.0 <= d["prefix_ratio"] < 1.0:
    _err("calib.prefix_ratio", d["prefix_ratio"], "a fraction in [0, 1) (0.25 in the paper)")
  if not d["mcs"] and d["timesteps_per_sample"] != 1:
    _err("calib.timesteps_per_sample", d["timesteps_per_sample"], "1 when calib.mcs=False (no timesteps)")
  if d["offload"] not in ("auto", "host", "device"):
    _err("calib.offload", d["offload"], "'auto', 'host' or 'device'")
  if not d["text_field"]:
    _err("calib.text_field", "", "the JSON field of the document text (e.g. 'text')")


def _check_quant(d):
  m, bits, g = d["method"], d["bits"], d["group_size"]
  if m not in methods.REGISTRY:
    _err("quant.method", m, f"one of {tuple(methods.REGISTRY)}", "or use a preset: --config configs/<model>.py:gptq_w2")
  meth = methods.get_method(m)
  bad = meth.check_shape(bits, g, None)  # the widths are checked against the model later
  if bad is not None:
    _err(f"quant.{bad[0]}", bits if bad[0] == "bits" else g, bad[1])
  if not 0.0 <= d["abmp_ratio"] <= 1.0:
    _err("quant.abmp_ratio", d["abmp_ratio"], "a fraction in [0, 1] (0.05 LLaDA, 0.10 Dream, 0 = uniform)")
  if d["abmp_scope"] not in ("matrix", "global"):
    _err("quant.abmp_scope", d["abmp_scope"], "'matrix' (released code) or 'global'")
  if d["abmp_scope"] == "global" and meth.abmp_bits != bits:
    _err("quant.abmp_scope", "global", "'matrix' unless the method mixes orders at these bits "
         f"({[(n, x.abmp_bits) for n, x in methods.REGISTRY.items() if x.abmp_bits]}: ABMP orders 1/2/3)")
  if d["target_bpw"] < 0 or (d["target_bpw"] > 0 and d["abmp_scope"] != "global"):
    _err("quant.target_bpw", d["target_bpw"], "0, or a positive bits/weight target with abmp_scope='global'")
  # the options' ranges are the method's own check (quant/method_<name>.py)
  bad = meth.check_options(meth.resolve_options({k: d[k] for k in meth.config_keys if k in meth.options}))
  if bad is not None:
    raise ConfigError(f"config.quant (method {m!r}): {bad} Set the quant.* key it names.")
  if d["scale_dtype"] not in SCALE_DTYPES:
    _err("quant.scale_dtype", d["scale_dtype"], f"one of {SCALE_DTYPES}")
  if d["act_order"] and "act_order" not in meth.options:
    _err("quant.act_order", True, f"False: method {m!r} has no act-order")
  orders = sorted({"standard"}.union(*(f.module_orders for f in families.FAMILIES.values())))
  if d["module_order"] not in orders:  # the model's family is checked in check_model
    _err("quant.module_order", d["module_order"], f"one of {orders}")
  for k in [k for k in ("embeddings", "head") if d[k] != "fp"]:
    _err(f"quant.{k}", d[k], "'fp': embeddings and the LM head stay full precision (both papers)")
  table = rules_table_from(d)
  for k, e in enumerate(table):  # structure only; resolution against the model in check_model
    if not (isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str)):
      _err("quant.rules", d["rules"], "a tuple of (regex, rule dict or 'skip') pairs", f"entry {k} is {e!r}")
    if not (e[1] == rules_lib.SKIP or isinstance(e[1], (dict, rules_lib.Rule))):
      _err("quant.rules", d["rules"], "rules that are dicts {method, bits, group_size, options} or 'skip'",
           f"entry {k} has {e[1]!r}")
    if isinstance(e[1], dict):
      rules_lib.Rule.from_dict(e[1])


def rules_table_from(q: dict) -> list:
  """The rules table of a quant section (dict or QuantSpec): the explicit `rules`, or one catch-all rule
  made of method/bits/group_size and the options that method reads (all written out, so the resolved rule
  in the report shows every setting)."""
  q = dataclasses.asdict(q) if dataclasses.is_dataclass(q) else q
  if q["rules"]:
    return [tuple(e) if isinstance(e, list) else e for e in q["rules"]]
  keys = [k for k in METHOD_KEYS[q["method"]] if k not in ("abmp_scope", "target_bpw")]
  if "abmp_ratio" in keys and methods.get_method(q["method"]).abmp_bits != q["bits"]:
    keys.remove("abmp_ratio")  # ABMP mixes orders only around its own order (2)
  return rules_lib.default_rules(q["method"], q["bits"], q["group_size"], **{k: q[k] for k in keys})


def validate(c, *, workdir: str | None = None, dry_run: bool = False) -> RunSpec:
  """Check a run ConfigDict against the schema and return the frozen RunSpec.

  Args:
    c: the ConfigDict from a config file (+ overrides).
    workdir: --workdir, which replaces config.workdir when given.
    dry_run: the run only plans (no model_path or workdir needed; model_preset is).
  Raises:
    ConfigError before any heavy work: unknown key, wrong type, invalid value, missing model path, missing
    calibration file, unwritable workdir.
  """
  d = check_types(c, _schema())
  if workdir:
    d["workdir"] = workdir
  if d["model_preset"] and d["model_preset"] not in families.PRESETS:
    _err("model_preset", d["model_preset"], f"one of {tuple(families.PRESETS)} (or '')")
  if dry_run:
    if not d["model_preset"] and not d["model_path"]:
      _err("model_preset", "", f"one of {tuple(families.PRESETS)} for --dry_run (or a model_path to read config.json)")
  else:
    mp = d["model_path"]
    if not mp:
      _err("model_path", mp, "a local Hugging Face checkpoint directory",
           "set --config.model_path=/path/to/model (or plan without weights: --dry_run)")
    if not os.path.isdir(mp):
      hint = ("the shipped tiny model is written by "
              "`python3 scripts/make_tiny_model.py --out qdllm_jax/shipped/tiny-llada`"
              if "tiny-llada" in mp else "download the checkpoint (safetensors) and point model_path at it")
      _err("model_path", mp, "an existing checkpoint directory", hint)
    if not d["workdir"]:
      _err("workdir", "", "an output directory", "pass --workdir /path/to/run")
    check_writable_dir(d["workdir"], "workdir")
  if d["dtype"] not in DTYPES:
    _err("dtype", d["dtype"], f"one of {DTYPES}")
  if not 0 <= d["seed"] < 2 ** 31:
    _err("seed", d["seed"], "an integer in [0, 2^31)")
  _check_calib(d["calib"], dry_run)
  _check_quant(d["quant"])
  e = d["eval"]
  if e["protocol"]:
    if e["protocol"] not in protocols.PROTOCOLS:
      _err("eval.protocol", e["protocol"], f"one of {sorted(protocols.PROTOCOLS)} or '' (no evaluation)")
  if e["limit"] < 0:
    _err("eval.limit", e["limit"], "an integer >= 0 (0 = the protocol's own limit)")
  check_lm_eval_keys(e)
  m = d["mesh"]
  if len(set(m["axes"])) != len(m["axes"]) or not set(m["axes"]) <= set(MESH_AXES) or "data" not in m["axes"]:
    _err("mesh.axes", m["axes"], f"distinct names from {MESH_AXES} including 'data' (sharding.LOGICAL_RULES)")
  if m["shape"] and (len(m["shape"]) != len(m["axes"]) or
                     not all(isinstance(s, int) and s >= 1 for s in m["shape"])):
    _err("mesh.shape", m["shape"], f"() (auto) or {len(m['axes'])} positive integers for axes {m['axes']}")
  p = d["plan"]
  if p["hardware"]:
    if p["hardware"] not in HARDWARE:
      _err("plan.hardware", p["hardware"], f"'' (this machine) or one of {sorted(HARDWARE)}")
  for k in ("device_memory_gib", "host_memory_gib"):
    if p[k] < 0:
      _err(f"plan.{k}", p[k], "0 (detect) or a positive size in GiB")
  return build(RunSpec, d)


def check_lm_eval_keys(e: dict) -> None:
  """eval.include_path (a directory or '') and eval.task_map ('protocol_task=local_task' entries of the protocol)."""
  if e["include_path"] and not os.path.isdir(e["include_path"]):
    _err("eval.include_path", e["include_path"], "'' or a directory of lm-eval task YAMLs", "check the path")
  if e["task_map"]:
    names = protocols.PROTOCOLS[e["protocol"]].task_names if e["protocol"] in protocols.PROTOCOLS else set()
    for t in e["task_map"]:
      k, sep, v = str(t).partition("=")
      if not sep or not v or k not in names:
        _err("eval.task_map", e["task_map"], f"entries 'protocol_task=local_task' with protocol_task in "
             f"{sorted(names)}", "e.g. ('gsm8k=gsm8k_local',)")


def ignored_keys(spec: RunSpec) -> list[str]:
  """Quant keys set away from the base default that the chosen method does not read (for the plan)."""
  base = _schema().quant
  used = set(METHOD_KEYS[spec.quant.method]) | {"method", "bits", "group_size", "module_order", "rules",
                                                "embeddings", "head"}
  return [f"quant.{k}={getattr(spec.quant, k)!r}" for k in base.keys()
          if k not in used and getattr(spec.quant, k) != (tuple(base[k]) if isinstance(base[k], tuple) else base[k])]


def check_model(spec: RunSpec, cfg):
  """Checks that need the model's ModelConfig (from config.json or a preset); returns the resolved rules Plan.

  group sizes dividing every linear's in_features, calibration seqlen within the model context, a [MASK] id
  for MCS, the evaluation protocol's architecture, the full rules table (resolve_rules + check_plan) and the
  module order against the model's family.
  """
  q = spec.quant
  family = families.family_of(cfg)
  block = family.param_shapes(cfg)["blocks"][0]
  widths = {"/".join(names): block[names[0]][1] for names in family.linear_groups.values()}  # in_features per tap
  if not q.rules and q.group_size != -1:
    bad = {k: w for k, w in widths.items() if w % q.group_size}
    if bad:
      _err("quant.group_size", q.group_size, f"a divisor of every linear's input width {widths}",
           f"{bad} are not multiples of it")
  if spec.calib.seqlen > cfg.max_seq_len:
    _err("calib.seqlen", spec.calib.seqlen, f"at most the model context {cfg.max_seq_len}")
  if spec.calib.mcs and cfg.mask_id is None:
    _err("calib.mcs", True, "False for a model without mask_token_id in config.json")
  if spec.eval.protocol:
    arch = protocols.get_protocol(spec.eval.protocol).arch
    if arch != cfg.arch:
      _err("eval.protocol", spec.eval.protocol, f"a protocol for {cfg.arch} models (this one is for {arch})")
  try:
    plan = rules_lib.resolve_rules(rules_table_from(q), cfg)
    pipeline.check_plan(plan, cfg)
  except ConfigError as e:
    raise ConfigError(f"config.quant: {e}") from e
  try:
    pipeline.module_groups(q.module_order, family)
  except ConfigError as e:
    raise ConfigError(f"config.quant.{e}") from e
  return plan


def check_tokenizer(tok, cfg, path: str = "") -> None:
  """The tokenizer matches the model: no more ids than embedding rows, and its [MASK] is cfg.mask_id."""
  n = len(tok)
  if n > cfg.vocab_size:
    raise ConfigError(f"tokenizer {path} has {n} ids but the model's embedding has {cfg.vocab_size} rows; the "
                      "tokenizer belongs to another model: use the checkpoint's own tokenizer files")
  if cfg.mask_id is None:
    return
  mid = getattr(tok, "mask_token_id", None)
  if mid is not None and mid != cfg.mask_id:
    raise ConfigError(f"tokenizer {path} has mask token id {mid}, the model's config.json says mask_token_id="
                      f"{cfg.mask_id}; the tokenizer belongs to another model")
  if mid is None:
    name = tok.convert_ids_to_tokens(cfg.mask_id) if cfg.mask_id < n else None
    if name is None or "mask" not in str(name).lower():
      raise ConfigError(f"tokenizer {path}: id {cfg.mask_id} (the model's mask_token_id) is {name!r}, not a "
                        "[MASK] token; the tokenizer belongs to another model")
