"""The one table of benchmarks/accel_check.sh: kernel test results (JUnit XML) and the decode rows (JSON).

    python3 benchmarks/accel_table.py OUT KERNEL_PATH PALLAS_RC XLA_RC DECODE_RC

OUT holds pallas.xml and xla.xml (pytest --junitxml) and decode.json (bench_decode.py --json); the three exit
statuses say which steps failed. Prints the table to stdout; exits 0.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET


def junit(path: str) -> tuple[str, list]:
  """("N passed, M failed, K skipped (T s)", [names of the failed tests]) of a JUnit XML file."""
  if not os.path.isfile(path):
    return "did not run (see the log)", []
  suite = ET.parse(path).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  cases = suite.findall("testcase")
  bad = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
  skipped = sum(c.find("skipped") is not None for c in cases)
  return (f"{len(cases) - len(bad) - skipped} passed, {len(bad)} failed, {skipped} skipped "
          f"({float(suite.get('time', 0)):.1f} s)"), bad


def _mib(v) -> str:
  return "     n/a" if v is None else f"{v:8.1f}"


def decode_lines(rows: list) -> list[str]:
  """One line per bench_decode row: tokens/s, ms/step, weight MB/token, device and host peak, ratio to dense."""
  lines = []
  for r in rows:
    ratio = "" if r.get("speedup_vs_base") is None else f"  x{r['speedup_vs_base']:.2f} vs dense"
    lines.append(f"{'decode ' + r['part'] + ' ' + r['weights'] + ' batch ' + str(r['batch']):44s} "
                 f"{r['tokens_per_s']:9.1f} tokens/s  {r['step_ms']:8.2f} ms/step  {r['weight_mb_per_token']:8.2f} "
                 f"MB weights/token  device peak {_mib(r.get('device_peak_mib'))} MiB  host peak "
                 f"{r['host_peak_mib']:7.0f} MiB{ratio}")
  return lines


def table(out: str, kpath: str, pallas_rc: int, xla_rc: int, decode_rc: int) -> str:
  rows = [("kernel tests, " + kpath + " compiled", *junit(os.path.join(out, "pallas.xml"))),
          ("kernel tests, xla path on the device", *junit(os.path.join(out, "xla.xml")))]
  lines = [f"\n{'check':44s} result"]
  for (name, res, bad), rc in zip(rows, (pallas_rc, xla_rc)):
    lines.append(f"{name:44s} {res}" + (f"  FAILED: {', '.join(bad[:6])}" if bad else "")
                 + (f"  (pytest exit {rc})" if rc and not bad else ""))
  dec = os.path.join(out, "decode.json")
  if decode_rc == 0 and os.path.isfile(dec):
    with open(dec, encoding="utf-8") as f:
      lines += decode_lines(json.load(f)["rows"])
  else:
    lines.append(f"{'decode benchmark':44s} failed (exit {decode_rc}); see {os.path.join(out, 'decode.log')}")
  lines.append(f"\nlogs: {out}/pallas.log, xla.log, decode.log")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table(sys.argv[1], sys.argv[2], *(int(v) for v in sys.argv[3:6])))
