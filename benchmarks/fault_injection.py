"""Fault injection on the main job: kill -9 at random points then resume, and flip random checkpoint bytes.

  python benchmarks/fault_injection.py --root runs/faults --kills 20 --flips 20 [-- --config.KEY=VALUE ...]

1. Two uninterrupted runs of `python -m qdllm_jax.launch --config configs/tiny.py` (plus the overrides after
   `--`) in fresh workdirs: the first is the reference, the second must equal it (the job is deterministic), and
   its wall time T (with a JAX compilation cache, warm after the first run) sets the first kill window; after
   each trial whose resumed run started from scratch, T becomes that run's wall time (the machine's load
   changes), and a run that finished before its kill sets T to its own time and is not counted as a trial.
2. `--kills` times: a fresh workdir, the same command, SIGKILL after a delay drawn uniformly from
   [0.05 T, 0.95 T] (the step it was in is read from its log), then the same command again to completion. Each
   resumed run must exit 0, leave no temporary directory (`.tmp-` / `.old-`) anywhere in the workdir, and match
   the reference: equal checkpoint_sha256, equal array digests (every array of the checkpoint), equal metrics.
3. `--flips` times: a copy of the reference checkpoint with 1-64 random bytes XOR-ed with random non-zero
   values in one file drawn uniformly from all of its files (Orbax data and metadata, sidecar, config,
   tokenizer, checksums); `load_quantized` must raise a QdllmError and `python -m qdllm_jax.checkpoint verify`
   must exit 2.
Prints one line per trial and a summary; writes ROOT/fault_injection.json. Exit status 0 when every trial passed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"\[(\d)/6 (\w+)\]")


def _cmd(workdir: str, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "qdllm_jax.launch", "--config", os.path.join(ROOT, "configs", "tiny.py"),
          "--workdir", workdir, *overrides]


def _run(workdir: str, overrides: list[str], log: str) -> tuple[int, float]:
  t = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.run(_cmd(workdir, overrides), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
  return rc, time.perf_counter() - t


def _outcome(workdir: str) -> dict:
  with open(os.path.join(workdir, "report.json")) as f:
    rep = json.load(f)
  with open(os.path.join(workdir, "checkpoint", "qdllm_checkpoint.json")) as f:
    digests = json.load(f)["digests"]
  return {"sha": rep["sizes"]["checkpoint_sha256"], "digests": digests, "metrics": rep["metrics"],
          "resume": rep.get("resume", {})}


def _leftovers(workdir: str) -> list[str]:
  return [os.path.join(d, n) for d, dirs, _ in os.walk(workdir) for n in dirs if ".tmp-" in n or ".old-" in n]


def kill_trial(i: int, root: str, overrides: list[str], t_ref: float, ref: dict, rng: random.Random) -> dict:
  wd, log = os.path.join(root, f"kill-{i:02d}"), os.path.join(root, f"kill-{i:02d}.log")
  shutil.rmtree(wd, ignore_errors=True)
  delay = rng.uniform(0.05 * t_ref, 0.95 * t_ref)
  t0 = time.perf_counter()
  with open(log, "w") as f:
    p = subprocess.Popen(_cmd(wd, overrides), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
      p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      p.send_signal(signal.SIGKILL)
      p.wait()
  killed = p.returncode == -signal.SIGKILL
  if not killed:  # it finished first: no kill to check; its time is the run time under the current load
    shutil.rmtree(wd, ignore_errors=True)
    return {"trial": i, "killed": False, "run_s": time.perf_counter() - t0}
  steps = STEP.findall(open(log).read())
  where = f"{steps[-1][0]}/6 {steps[-1][1]}" if steps else "startup"
  rc, dt = _run(wd, overrides, log + ".resume")
  res = {"trial": i, "delay_s": round(delay, 2), "killed": killed, "killed_in": where, "resume_rc": rc,
         "resume_s": round(dt, 1)}
  problems = []
  if rc != 0:
    problems.append(f"resume exited {rc}")
  else:
    got = _outcome(wd)
    res["resumed_from_block"] = got["resume"].get("resumed_from_block")
    res["reused_checkpoint"] = got["resume"].get("reused_checkpoint")
    for k in ("sha", "digests", "metrics"):
      if got[k] != ref[k]:
        problems.append(f"{k} differs from the uninterrupted run")
  left = _leftovers(wd)
  if left:
    problems.append(f"temporary directories left: {left[:3]}")
  res["ok"], res["problems"] = not problems, problems
  return res


def flip_trial(j: int, root: str, ref_ckpt: str, rng: random.Random) -> dict:
  from qdllm_jax.checkpoint import load_quantized
  from qdllm_jax.errors import QdllmError
  d = os.path.join(root, f"flip-{j:02d}")
  shutil.rmtree(d, ignore_errors=True)
  shutil.copytree(ref_ckpt, d)
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
  f = rng.choice(files)
  data = bytearray(open(f, "rb").read())
  n = rng.randint(1, min(64, len(data)))
  for pos in rng.sample(range(len(data)), n):
    data[pos] ^= rng.randint(1, 255)
  open(f, "wb").write(bytes(data))
  res = {"trial": j, "file": os.path.relpath(f, d), "bytes_flipped": n}
  try:
    load_quantized(d)
    res["load"] = "LOADED"
  except QdllmError as e:
    res["load"] = f"{type(e).__name__}: {str(e)[:160]}"
  v = subprocess.run([sys.executable, "-m", "qdllm_jax.checkpoint", "verify", d], capture_output=True, text=True,
                     cwd=ROOT)
  res["verify_rc"] = v.returncode
  res["ok"] = res["load"] != "LOADED" and v.returncode == 2
  shutil.rmtree(d, ignore_errors=True)
  return res


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--root", required=True, help="directory for the workdirs and logs")
  ap.add_argument("--kills", type=int, default=20)
  ap.add_argument("--flips", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  os.makedirs(args.root, exist_ok=True)
  rng = random.Random(args.seed)
  ref_wd = os.path.join(args.root, "reference")
  shutil.rmtree(ref_wd, ignore_errors=True)
  rc, t_ref = _run(ref_wd, extra, os.path.join(args.root, "reference.log"))
  if rc != 0:
    print(f"reference run failed (exit {rc}); see {args.root}/reference.log")
    return 1
  ref = _outcome(ref_wd)
  again = os.path.join(args.root, "reference2")
  shutil.rmtree(again, ignore_errors=True)
  rc, t_ref = _run(again, extra, os.path.join(args.root, "reference2.log"))
  same = rc == 0 and all(_outcome(again)[k] == ref[k] for k in ("sha", "digests", "metrics"))
  print(f"reference: {t_ref:.1f}s (second run), checkpoint_sha256 {ref['sha'][:16]}; second uninterrupted run "
        f"{'equal' if same else 'DIFFERENT'}", flush=True)
  if not same:
    return 1
  shutil.rmtree(again, ignore_errors=True)
  kills, i, unkilled = [], 0, 0
  while len(kills) < args.kills and unkilled < 3 * args.kills:
    r = kill_trial(i, args.root, extra, t_ref, ref, rng)
    i += 1
    if not r["killed"]:
      unkilled, t_ref = unkilled + 1, r["run_s"]
      print(f"trial {i - 1}: the run finished in {r['run_s']:.1f}s before its kill; window now {t_ref:.1f}s",
            flush=True)
      continue
    kills.append(r)
    if r["resume_rc"] == 0 and r.get("resumed_from_block") is None and not r.get("reused_checkpoint"):
      t_ref = r["resume_s"]  # a whole run under the current load
    print(f"kill {len(kills) - 1:2d}: after {r['delay_s']:6.1f}s in [{r['killed_in']}] -> resumed from "
          f"{r.get('resumed_from_block')} reused={r.get('reused_checkpoint')}: {'ok' if r['ok'] else r['problems']}",
          flush=True)
    shutil.rmtree(os.path.join(args.root, f"kill-{i - 1:02d}"), ignore_errors=True)
  flips = []
  for j in range(args.flips):
    flips.append(flip_trial(j, args.root, os.path.join(ref_wd, "checkpoint"), rng))
    r = flips[-1]
    print(f"flip {j:2d}: {r['bytes_flipped']:2d} bytes in {r['file']}: load -> {r['load'][:90]}; verify exit "
          f"{r['verify_rc']}: {'ok' if r['ok'] else 'FAILED'}", flush=True)
  summary = {"command": " ".join(_cmd("WORKDIR", extra)), "last_window_s": t_ref, "finished_before_kill": unkilled,
             "kills": {"n": len(kills), "ok": sum(r["ok"] for r in kills), "trials": kills},
             "flips": {"n": len(flips), "ok": sum(r["ok"] for r in flips), "trials": flips}}
  with open(os.path.join(args.root, "fault_injection.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"kills: {summary['kills']['ok']}/{len(kills)} resumed to the reference; flips: {summary['flips']['ok']}/"
        f"{len(flips)} refused by load and verify")
  return 0 if summary["kills"]["ok"] == len(kills) and summary["flips"]["ok"] == len(flips) else 1


if __name__ == "__main__":
  sys.exit(main())
