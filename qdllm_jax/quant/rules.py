"""Quantization rules: which method, bits and group size each block linear gets.

A rules table is an ordered list of `(regex, rule)` pairs. The regex is matched with `re.search` against
the HF module path of every block linear (`hf.module_path`, e.g. "model.transformer.blocks.3.q_proj",
"model.layers.3.mlp.down_proj" or BERT's "encoder.layer.3.attention.self.query"); the first matching entry
wins. A rule is a `Rule` (or the dict `{"method", "bits", "group_size", "options"}`) or the string "skip"
(keep full precision). Linears no entry matches are also kept in full precision (shown as "skip (no rule)").
`resolve_rules` turns a table into a `Plan` {module path: Rule | None} once, up front; a table entry that
matches no module is an error (a typo would otherwise silently leave layers unquantized).

Embeddings and LM head: kept in full precision, as in Quant-dLLM and the PTQ study (arXiv 2508.14896).
They are never candidates of a table; `resolve_rules(..., quantize_embeddings=True)` or
`quantize_head=True` raises ConfigError (not supported), and so does an entry matching only them.

`Plan.to_json()` / `Plan.from_json()` round-trip the table and the resolution (checkpoint metadata);
`Plan.describe()` prints "module -> rule" lines.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence

from qdllm_jax.errors import ConfigError
from qdllm_jax.models import hf
from qdllm_jax.models.families import family_of
from qdllm_jax.models.model_config import ModelConfig
from qdllm_jax.quant import methods

SKIP = "skip"
_RULE_KEYS = ("method", "bits", "group_size", "options")


@dataclasses.dataclass(frozen=True)
class Rule:
  """How to quantize one linear: `quantize_weight(w, H, method, bits, group_size, **options)`.

  Attributes:
    method: a registered method name (quant/methods.py: "quant_dllm", "gptq", "rtn").
    bits: bits per weight (quant_dllm: binary planes / base order).
    group_size: input columns per quantization group / DAQ block (128 in the papers; -1 = one group per row where
      the method allows it).
    options: extra keyword options for the quantizer, as a sorted tuple of (key, value) (JSON values).
  """
  method: str = "quant_dllm"
  bits: int = 2
  group_size: int = 128
  options: tuple = ()

  def __post_init__(self):
    if self.method not in methods.REGISTRY:
      raise ConfigError(f"rule method {self.method!r} is unknown; expected one of {tuple(methods.REGISTRY)}")
    bad = methods.REGISTRY[self.method].check_shape(self.bits, self.group_size, None)  # the method's own ranges
    if bad is not None:
      field, want = bad
      raise ConfigError(f"rule {field}={getattr(self, field)!r} is not supported by {self.method}; expected {want}")
    opts = dict(self.options)
    try:
      json.dumps(opts)
    except TypeError as e:
      raise ConfigError(f"rule options {opts!r} are not JSON-serialisable ({e}); use numbers, strings, lists") from e
    object.__setattr__(self, "options", tuple(sorted((str(k), _freeze(v)) for k, v in opts.items())))

  @classmethod
  def from_dict(cls, d: dict) -> "Rule":
    """Rule from {"method", "bits", "group_size", "options"}; unknown keys raise ConfigError."""
    bad = sorted(set(d) - set(_RULE_KEYS))
    if bad:
      raise ConfigError(f"rule {d!r} has unknown keys {bad}; expected a subset of {_RULE_KEYS} (quantizer "
                        "options go inside 'options')")
    return cls(**{k: (tuple(dict(v).items()) if k == "options" else v) for k, v in d.items()})

  def to_dict(self) -> dict:
    return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
            "options": {k: _thaw(v) for k, v in self.options}}

  def kwargs(self) -> dict:
    """Keyword arguments for `quantize_weight` (besides w and hessian)."""
    return dict(method=self.method, bits=self.bits, group_size=self.group_size,
                **{k: _thaw(v) for k, v in self.options})

  def __str__(self):
    opts = " ".join(f"{k}={_thaw(v)}" for k, v in self.options)
    return f"{self.method} w{self.bits} g{self.group_size}" + (f" {opts}" if opts else "")


def _freeze(v):
  return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v):
  return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _as_rule(r, where: str) -> Rule | None:
  if isinstance(r, str):
    if r != SKIP:
      raise ConfigError(f"{where}: rule {r!r} is not a rule; expected a Rule, a dict or {SKIP!r}")
    return None
  if isinstance(r, Rule):
    return r
  if isinstance(r, dict):
    return Rule.from_dict(r)
  raise ConfigError(f"{where}: rule of type {type(r).__name__}; expected a Rule, a dict or {SKIP!r}")


def default_rules(method: str = "quant_dllm", bits: int = 2, group_size: int = 128, **options) -> list:
  """One catch-all entry `[(".*", Rule(method, bits, group_size, options))]`: every block linear alike."""
  return [(".*", Rule(method, bits, group_size, tuple(options.items())))]


def module_table(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
  """{HF module path: (layer, canonical name)} of every block linear, in block order then q,k,v,o,gate,up,down."""
  linears = family_of(cfg).linears
  return {hf.module_path(cfg, i, n): (i, n) for i in range(cfg.n_layers) for n in linears}


@dataclasses.dataclass
class Plan:
  """A resolved rules table.

  Attributes:
    table: [(regex, Rule | None)] as given (None = "skip").
    modules: {module path: Rule | None} for every block linear (None: kept in full precision).
    matched: {module path: index of the winning table entry, or None when no entry matched}.
    names: {module path: (layer, canonical name)}.
  """
  table: list
  modules: dict
  matched: dict
  names: dict

  def __post_init__(self):
    self._path_of = {v: k for k, v in self.names.items()}

  def path_of(self, layer: int, name: str) -> str:
    """The HF module path of block `layer`'s linear `name`."""
    return self._path_of[(layer, name)]

  def rule_for(self, layer: int, name: str) -> Rule | None:
    """The rule of block `layer`'s linear `name` ("q", ..., "down"), or None (full precision)."""
    return self.modules[self._path_of[(layer, name)]]

  def quantized(self) -> list[str]:
    """Module paths that get quantized."""
    return [m for m, r in self.modules.items() if r is not None]

  def describe(self) -> str:
    """One "module -> rule" line per block linear."""
    lines = []
    for m, r in self.modules.items():
      if r is None:
        lines.append(f"{m} -> {SKIP}" + (" (no rule)" if self.matched[m] is None else ""))
      else:
        lines.append(f"{m} -> {r}")
    return "\n".join(lines)

  def to_json(self) -> str:
    """JSON {"rules": [[regex, rule dict | "skip"]], "modules": {path: rule dict | "skip"}}."""
    enc = lambda r: SKIP if r is None else r.to_dict()  # noqa: E731
    return json.dumps({"rules": [[rx, enc(r)] for rx, r in self.table],
                       "modules": {m: enc(r) for m, r in self.modules.items()}}, indent=1)

  @classmethod
  def from_json(cls, s: str, cfg: ModelConfig) -> "Plan":
    """Re-resolve a saved plan's table against cfg and check it gives the saved resolution."""
    d = json.loads(s)
    plan = resolve_rules([tuple(e) for e in d["rules"]], cfg)
    saved = {m: _as_rule(r, f"saved plan module {m}") for m, r in d.get("modules", {}).items()}
    if saved and saved != plan.modules:
      diff = sorted(m for m in set(saved) | set(plan.modules) if saved.get(m) != plan.modules.get(m))
      raise ConfigError(f"saved plan does not resolve to its saved modules on this config (first: {diff[:3]}); "
                        "the config differs from the one it was made for")
    return plan


def resolve_rules(table: Sequence, cfg: ModelConfig, *, quantize_embeddings: bool = False,
                  quantize_head: bool = False) -> Plan:
  """Resolve a rules table against a model: {module path: Rule | None}, first match (re.search) wins.

  Args:
    table: ordered [(regex, Rule | dict | "skip")], or a Plan (returned as is after the embedding checks).
    cfg: the model config (gives the module paths).
    quantize_embeddings, quantize_head: must be False (they stay full precision; see module docstring).
  Raises:
    ConfigError: an invalid regex or rule; an entry that matches no block linear (named in the message);
      quantize_embeddings/quantize_head set.
  """
  for flag, what in ((quantize_embeddings, "embeddings"), (quantize_head, "LM head")):
    if flag:
      raise ConfigError(f"quantizing the {what} is not supported: Quant-dLLM and the PTQ baselines keep the "
                        f"embedding and LM head in full precision (and so does qdllm-jax); drop the option")
  if isinstance(table, Plan):
    return table
  entries = []
  for k, e in enumerate(table):
    if not isinstance(e, (tuple, list)) or len(e) != 2 or not isinstance(e[0], str):
      raise ConfigError(f"rules table entry {k} is {e!r}; expected (regex string, rule)")
    try:
      rx = re.compile(e[0])
    except re.error as err:
      raise ConfigError(f"rules table entry {k}: invalid regex {e[0]!r} ({err})") from err
    entries.append((e[0], rx, _as_rule(e[1], f"rules table entry {k} ({e[0]!r})")))
  names = module_table(cfg)
  modules, matched, hits = {}, {}, [0] * len(entries)
  for m in names:
    win = next((k for k, (_, rx, _) in enumerate(entries) if rx.search(m)), None)
    matched[m] = win
    modules[m] = None if win is None else entries[win][2]
    if win is not None:
      hits[win] += 1
  tops = list(hf.top_names(cfg).values())
  for k, (src, rx, _) in enumerate(entries):
    if not any(rx.search(m) for m in names):
      extra = (f"; it matches {[t for t in tops if rx.search(t)]}, but embeddings and the LM head are never "
               "quantized") if any(rx.search(t) for t in tops) else ""
      raise ConfigError(f"rules table entry {k} ({src!r}) matches no block linear of this {cfg.arch} model "
                        f"(e.g. {next(iter(names))!r}){extra}; fix or remove the entry")
    if not hits[k]:
      first = next(m for m in names if rx.search(m))
      raise ConfigError(f"rules table entry {k} ({src!r}) never applies: every module it matches (e.g. {first!r}) "
                        f"is taken by the earlier entry {matched[first]} ({entries[matched[first]][0]!r}); "
                        "move it up or remove it")
  return Plan(table=[(src, r) for src, _, r in entries], modules=modules, matched=matched, names=names)
