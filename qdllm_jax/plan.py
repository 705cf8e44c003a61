"""Know before you run: memory, mesh, rules and duration of a run, from shapes alone (no weights read).

Memory model (bytes; N = nsamples x timesteps_per_sample sequences of L tokens, D model width, F MLP width,
H heads, V vocabulary, b the param dtype's bytes, n_d / n_m the mesh's data / model axis sizes):
  host      calibration activations 2 N L D b (a block's inputs and outputs; only when offloaded to the host)
            + one FP block + the quantized blocks done so far (packed bytes) + embedding/head
            + the whole FP model when it is evaluated (it is read into memory once)
  device    calibration: [2 N L D b / n_d if the activations live on the devices] + one FP block (replicated)
            + the largest Hessian and its factors 4 c^2 x 4 + the solver's f32 copies 6 r c x 4
            + one chunk's forward on ceil(chunk / n_d) sequences (every chunk is split over the data axis):
              taps (3D + Hd + 2F) L x 4 and the attention scores H L^2 (4 + b)
            evaluation: the params sharded by the family's param_axes and sharding.LOGICAL_RULES + logits
              B T V x 4 (an encoder without a head: hidden states B T D x 4) and attention B H T^2 x 4 of
              the protocol's largest batch (`eval_batch`), split over the data axis
A plan fits when every device needs at most 90 % of its memory and the host at most 90 % of its RAM.
Duration (plan_timing.py): on this backend the real kernels are timed (factorisation per Hessian width, the
solvers, one calibration block forward) and scaled to the run: a range, fastest to slowest of 3 runs. For a
hardware preset a duration is printed only from figures measured on it (plan_timing.MEASURED); none yet.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from qdllm_jax import config_check as config_lib
from qdllm_jax import plan_timing, sharding
from qdllm_jax.eval import protocols
from qdllm_jax.hardware import GiB, Hardware, get_hardware
from qdllm_jax.models import families, open_checkpoint
from qdllm_jax.quant import methods

FIT_FRACTION = 0.9
CALIB_PASSES = 5  # block forwards per block during calibration: 4 Hessian captures (one per tap) + the outputs


class _MeshShape:
  """What sharding.logical_to_spec reads of a mesh (axis names and sizes), without devices."""

  def __init__(self, axes: dict):
    self.axis_names, self.shape = tuple(axes), dict(axes)


def param_bytes_per_device(cfg, itemsize: int, axes: dict) -> int:
  """Bytes of the FP params on one device, each leaf split as the family's `param_axes` and
  sharding.LOGICAL_RULES say (as `sharding.param_shardings` places them)."""
  mesh, total = _MeshShape(axes), 0
  shapes, param_axes = families.param_shapes(cfg), families.family_of(cfg).param_axes
  leaves = [(k, s) for k, s in shapes.items() if k != "blocks"]
  leaves += [(k, s) for blk in shapes["blocks"] for k, s in blk.items()]
  for name, shape in leaves:
    spec = sharding.logical_to_spec(param_axes[name], mesh, shape=shape)
    split = math.prod(axes[a] for a in spec if a is not None)
    total += math.prod(shape) * itemsize // split
  return total


def linear_bytes(rows: int, cols: int, method: str, bits: int, group_size: int, scale_dtype: str = "float16",
                 sym: bool = False, act_order: bool = False) -> int:
  """Exact packed bytes of one [rows, cols] weight (packed.QuantizedWeight.nbytes) at uniform order/bits, as
  the method declares it (quant/method_<name>.py over the byte layout of quant/packed.py). ABMP keeps the mean
  order at `bits` in every matrix, so its size equals the uniform one."""
  opts = {"scale_dtype": scale_dtype, "sym": sym, "act_order": act_order}
  return methods.get_method(method).packed_bytes(rows, cols, bits, group_size, opts)


def summarize_rules(plan) -> list[str]:
  """'module pattern -> rule (count)' lines: the resolved rules with layer indices folded into '*'."""
  groups = {}
  for path, rule in plan.modules.items():
    pattern = re.sub(r"\.\d+\.", ".*.", path)
    groups.setdefault((pattern, "skip (full precision)" if rule is None else str(rule)), []).append(path)
  return [f"{pat} -> {r}  ({len(v)} modules)" for (pat, r), v in groups.items()]


def choose_mesh(spec, hw: Hardware, need_fn) -> dict:
  """{axis: size} for the run: config.mesh.shape if given, else all devices with the smallest model axis
  (1, 2, 4, ...) for which `need_fn(axes)` (per-device bytes) fits."""
  axes = spec.mesh.axes
  if spec.mesh.shape:
    return dict(zip(axes, spec.mesh.shape))
  n = hw.n_devices
  if "model" not in axes:
    return {"data": n}
  options = [m for m in range(1, n + 1) if n % m == 0]
  for m in options:
    cand = {a: (m if a == "model" else n // m) for a in axes}
    if need_fn(cand) <= FIT_FRACTION * hw.device_gib * GiB:
      return cand
  return {a: (options[-1] if a == "model" else n // options[-1]) for a in axes}


def eval_batch(protocol_name: str) -> tuple[int, int]:
  """(rows B, tokens T) of the protocol's largest evaluation forward, for the memory estimate: an encoder's
  fidelity batch of sentences; the shipped tasks' 256 rows of 128 tokens; else the largest likelihood MC batch of
  few-shot prompts (about 1k tokens). (0, 0) without a protocol (nothing is evaluated)."""
  if not protocol_name:
    return 0, 0
  proto = protocols.get_protocol(protocol_name)
  if proto.fidelity is not None:
    return proto.fidelity.batch, proto.fidelity.max_tokens
  if proto.data == "shipped":
    return 256, 128
  return max((t.mc_batch for t in proto.likelihood), default=1), 1024


@dataclasses.dataclass
class RunPlan:
  """The plan of one run. Byte counts are per host / per device; times in seconds."""
  hardware_name: str
  hardware: Hardware
  mesh: dict
  offload: bool
  n_matrices: int
  n_quantized: int
  rules: list
  host: dict
  device: dict
  predicted: dict
  estimate_s: dict
  problems: list
  notes: list
  timing_source: str = ""

  @property
  def fits(self) -> bool:
    return not self.problems

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["fits"] = self.fits
    return d

  def text(self) -> str:
    """The human-readable plan (printed before heavy work)."""
    hw, g = self.hardware, lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    lines = [f"hardware  {self.hardware_name}: {hw.description}; {hw.n_devices} devices x {hw.device_gib:g} GiB, "
             f"host {hw.host_gib:g} GiB x {hw.hosts}",
             f"mesh      {self.mesh}  (calibration sequences over 'data'; eval params over 'model')",
             f"matrices  {self.n_quantized} of {self.n_matrices} block linears quantized; rules:"]
    lines += [f"  {r}" for r in self.rules]
    lines.append(f"host memory (activations {'offloaded to host' if self.offload else 'on the devices'}):")
    lines += [f"  {k:<34}{g(v)}" for k, v in self.host.items()]
    lines.append("device memory, per device:")
    lines += [f"  {k:<34}{g(v)}" for k, v in self.device.items()]
    p = self.predicted
    lines.append(f"predicted: {p['linear_bits_per_weight']:.3f} bits/weight in the quantized linears, checkpoint "
                 f"{p['checkpoint_bytes'] / GiB:.3f} GiB ({p['model_bits_per_weight']:.3f} bits/param overall)")
    if self.estimate_s is None:
      lines.append(f"estimated duration: {self.timing_source}; no duration is printed (plan on that machine to "
                   "time its kernels)")
    else:
      lines.append("estimated duration (kernels timed, scaled to the model; compile time not included): "
                   + ", ".join(f"{k} {format_hms(lo)}-{format_hms(hi)}" for k, (lo, hi) in self.estimate_s.items())
                   + f" [{self.timing_source}]")
    lines += [f"note: {n}" for n in self.notes]
    lines.append("FITS" if self.fits else "DOES NOT FIT:\n  " + "\n  ".join(self.problems))
    return "\n".join(lines)


def format_hms(s: float) -> str:
  """A duration in seconds as '1h02m' (an hour or more) or '3m05s'."""
  s = int(round(s))
  return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def make_plan(spec, cfg, rules_plan, *, itemsize: int, hw_name: str, hw: Hardware, times=None,
              mesh: dict | None = None, time_kernels: bool = False) -> RunPlan:
  """Plan a run of `spec` (RunSpec) on model `cfg` (ModelConfig) with the resolved `rules_plan` (rules.Plan).

  itemsize: bytes of a param (2 bf16, 4 f32). hw: the Hardware planned for. times: plan_timing.KernelTimes for
  the durations (default: measured now when hw_name is "local", else plan_timing.MEASURED[hw_name] or none:
  the plan then prints no duration). mesh: {axis: size} (default: choose_mesh). time_kernels: time the kernels
  on this backend for a "local" plan (the dry run does; a run logs its own progress instead).
  """
  c = spec.calib
  n, seq, d, f, h = c.nsamples * c.timesteps_per_sample, c.seqlen, cfg.d_model, cfg.mlp_hidden, cfg.n_heads
  shapes = families.param_shapes(cfg)
  blk = shapes["blocks"][0]
  blk_params = sum(math.prod(s) for s in blk.values())
  top_bytes = sum(math.prod(s) for k, s in shapes.items() if k != "blocks") * itemsize
  lin = {nm: blk[nm] for nm in families.family_of(cfg).linears}
  q_bytes, fp_lin_bytes, q_params = 0, 0, 0  # packed bytes / params of the quantized linears; FP linears
  for path, rule in rules_plan.modules.items():
    r, cc = lin[rules_plan.names[path][1]]
    if rule is None:
      fp_lin_bytes += r * cc * itemsize
      continue
    opts = dict(rule.options)
    q_params += r * cc
    q_bytes += linear_bytes(r, cc, rule.method, rule.bits, rule.group_size, opts.get("scale_dtype", "float16"),
                            bool(opts.get("sym", False)), bool(opts.get("act_order", False)))
  other_blk = (blk_params - sum(math.prod(s) for s in lin.values())) * itemsize * cfg.n_layers
  ckpt = q_bytes + fp_lin_bytes + top_bytes + other_blk
  act = n * seq * d * itemsize
  max_c, max_rc = max(s[1] for s in lin.values()), max(math.prod(s) for s in lin.values())
  eval_b, eval_t = eval_batch(spec.eval.protocol)
  out_width = cfg.vocab_size if cfg.has_head else d  # logits, or an encoder's hidden states
  fp_total = families.num_params(cfg) * itemsize

  def calib_device(axes, on_device):
    nd = axes.get("data", 1)
    k = nd if n % nd == 0 else 1  # calib.capture splits each chunk's rows over the data axis
    cs = -(-min(max(c.chunk_size // k, 1) * k if k > 1 else c.chunk_size, n) // k)
    return {"calibration activations": 2 * act // nd if on_device else 0,
            "one block (FP, replicated)": blk_params * itemsize,
            "Hessian + factors (f32)": 4 * max_c * max_c * 4,
            "solver working copies (f32)": 6 * max_rc * 4,
            "chunk forward (taps + attention)": cs * seq * ((3 * d + cfg.q_dim + 2 * f) * 4 + h * seq * (4 + itemsize))}

  def eval_device(axes, params_bytes):
    nd = axes.get("data", 1)
    rows = -(-eval_b // nd)
    vocab_split = axes.get("model", 1) if cfg.has_head and cfg.vocab_size % axes.get("model", 1) == 0 else 1
    return params_bytes + rows * eval_t * (out_width * 4 // vocab_split + h * eval_t * 4)

  def need(axes):  # what the model axis decides: the FP evaluation (calibration does not depend on it)
    fp = spec.eval.protocol and spec.eval.fp
    per_dev = param_bytes_per_device(cfg, itemsize, axes)
    return eval_device(axes, per_dev * (1 if fp else ckpt) // (1 if fp else fp_total))

  if mesh is None:
    mesh = choose_mesh(spec, hw, need)
  n_mesh = math.prod(mesh.values())
  problems, notes = [], []
  if n_mesh > hw.n_devices:
    problems.append(f"mesh {mesh} needs {n_mesh} devices; {hw_name} has {hw.n_devices} (set config.mesh.shape)")
  cap = FIT_FRACTION * hw.device_gib * GiB
  offload = c.offload == "host" or (c.offload == "auto" and sum(calib_device(mesh, True).values()) > cap)
  dev = calib_device(mesh, not offload)
  dev_calib = sum(dev.values())
  dev["= calibration total"] = dev_calib
  if spec.eval.protocol and spec.eval.fp:
    dev["evaluation, FP model"] = eval_device(mesh, param_bytes_per_device(cfg, itemsize, mesh))
  if spec.eval.protocol and spec.eval.quantized:
    dev["evaluation, quantized model"] = eval_device(
        mesh, param_bytes_per_device(cfg, itemsize, mesh) * ckpt // max(fp_total, 1))
  host = {"calibration activations (in + out)": 2 * act if offload else 0,
          "one FP block being quantized": blk_params * itemsize,
          "quantized blocks (packed)": q_bytes, "embedding + head + norms": top_bytes + other_blk,
          "FP model for its evaluation": fp_total if spec.eval.protocol and spec.eval.fp else 0}
  host_total = sum(host.values())
  if hw.platform == "cpu":  # the "devices" are host memory too
    host_total += max(v for k, v in dev.items() if not k.startswith("=")) * n_mesh
    notes.append("CPU devices share the host RAM: the host total includes every device's share")
  host["= host total"] = host_total
  for k, v in dev.items():
    if (k.startswith("=") or k.startswith("evaluation")) and v > cap and hw.platform != "cpu":
      problems.append(f"{k.strip('= ')}: {v / GiB:.2f} GiB per device > {FIT_FRACTION:.0%} of {hw.device_gib:g} GiB"
                      + ("; add a model axis (e.g. --config.mesh.shape='(2,4)')" if k.startswith("evaluation") else
                         "; lower calib.chunk_size or calib.seqlen"))
  if host_total > FIT_FRACTION * hw.host_gib * GiB:
    problems.append(f"host memory {host_total / GiB:.2f} GiB > {FIT_FRACTION:.0%} of {hw.host_gib:g} GiB; lower "
                    "calib.nsamples / calib.seqlen, or skip the FP evaluation (--config.eval.fp=False)")
  if n % mesh.get("data", 1):
    notes.append(f"{n} calibration sequences do not divide over data={mesh.get('data', 1)}: kept replicated")
  nd_eff = mesh.get("data", 1) if n % mesh.get("data", 1) == 0 else 1  # chunks split over the data axis
  nm_eff = mesh.get("model", 1)  # the solvers split each matrix's rows over the model axis
  if times is None and hw_name == "local" and time_kernels:
    times = plan_timing.measure_for(cfg, rules_plan, itemsize, n, seq, max(c.chunk_size, 1), CALIB_PASSES)
  elif times is None:
    times = plan_timing.MEASURED.get(hw_name)
  est = None if times is None else plan_timing.durations(times, cfg, rules_plan, nd_eff, nm_eff)
  if times is not None:
    timing_source = times.source
  elif hw_name == "local":
    timing_source = "kernels not timed for this run (the dry run times them: --dry_run)"
  else:
    timing_source = f"not measured on this hardware ({hw_name})"
  nq = len(rules_plan.quantized())
  predicted = {"linear_bits_per_weight": 8 * q_bytes / max(q_params, 1), "checkpoint_bytes": ckpt,
               "model_bits_per_weight": 8 * ckpt / families.num_params(cfg), "fp_bytes": fp_total}
  return RunPlan(hw_name, hw, mesh, offload, len(rules_plan.modules), nq, summarize_rules(rules_plan), host, dev,
                 predicted, est, problems, notes, timing_source)


def abstract_model(cfg, dtype, batch: int, seqlen: int):
  """`jax.eval_shape` of the model: (params tree of ShapeDtypeStruct, logits ShapeDtypeStruct [B, T, V]).

  Nothing is allocated: init_params and forward are traced abstractly for int32 ids [batch, seqlen].
  """
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), families.param_shapes(cfg),
                        is_leaf=lambda s: isinstance(s, tuple))
  logits = jax.eval_shape(lambda p, x: families.forward(p, cfg, x), params,
                          jax.ShapeDtypeStruct((batch, seqlen), jnp.int32))
  return params, logits


def dry_run(spec) -> tuple[str, RunPlan]:
  """Plan a run without reading weights: the architecture of `spec.model_preset` (or model_path's config.json
  when no preset is given), evaluated abstractly, on `spec.plan.hardware` (or this machine).

  Returns (the printed text, the RunPlan). Raises ConfigError for configs that are invalid for the model.
  """
  if spec.model_preset:
    cfg = families.preset(spec.model_preset)
  else:
    cfg = open_checkpoint(spec.model_path).config
  rules_plan = config_lib.check_model(spec, cfg)
  stored = dict(cfg.raw).get("torch_dtype", "bfloat16")
  dtype = jnp.dtype(stored if spec.dtype == "auto" else spec.dtype)
  params, logits = abstract_model(cfg, dtype, 1, min(spec.calib.seqlen, cfg.max_seq_len))
  leaves = jax.tree_util.tree_leaves(params)
  n_params = sum(math.prod(x.shape) for x in leaves)
  hw_name, hw = get_hardware(spec)
  plan = make_plan(spec, cfg, rules_plan, itemsize=dtype.itemsize, hw_name=hw_name, hw=hw, time_kernels=True)
  head = [f"DRY RUN (no weights read): {spec.model_preset or spec.model_path}, {cfg.arch}, {cfg.n_layers} blocks, "
          f"d_model {cfg.d_model}, mlp {cfg.mlp_hidden}, vocab {cfg.vocab_size}",
          f"jax.eval_shape: {n_params / 1e9:.3f} B params in {len(leaves)} arrays, {dtype.name} = "
          f"{n_params * dtype.itemsize / GiB:.2f} GiB; forward int32 [1, {logits.shape[1]}] -> {logits.dtype} "
          f"{list(logits.shape)}",
          f"calibration: {spec.calib.nsamples} x {spec.calib.seqlen} tokens from {spec.calib.source!r}, "
          f"MCS={spec.calib.mcs}; method {spec.quant.method} w{spec.quant.bits} g{spec.quant.group_size}"]
  return "\n".join(head) + "\n" + plan.text(), plan
