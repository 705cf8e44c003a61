"""Batches decode requests for one `engine.Engine` on one worker thread (the server's only model caller).

A job is a list of prompt rows with sampler settings and a seed. Jobs whose settings draw no random numbers
(LLaDA at temperature 0 with low-confidence remasking, Dream at temperature 0 with a confidence alg) give each
unpadded row the same tokens whatever the other rows are, so they are merged, up to `max_batch` rows, with the
jobs queued behind them that have equal settings and prompt length (waiting at most `wait_s` for more). A job
whose settings draw noise runs alone with its own seed: the rows of a batch share random numbers, and a seeded
request must get the same answer whatever else the server is doing. Wider merging was weighed and not done: the
samplers take one key per batch (per-row keys would change every sampler and their reference equality), and a
left-padded row is not provably the same as its own run (LLaDA's positions ignore the padding; for any family the
extra masked keys change the order of floating-point reductions). The rule is documented in serve --help and
docs/generate.md.
"""
from __future__ import annotations

import collections
import dataclasses
import random
import threading
import time

from qdllm_jax.errors import QdllmError
from qdllm_jax.sampling import settings as settings_lib


@dataclasses.dataclass
class Job:
  """rows: token id lists; settings: sampler ConfigDict; seed: int or None (a random one). After `done` is set:
  result (int32 [gen_length] arrays, one per row) or error (an exception)."""
  rows: list
  settings: object
  seed: int | None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: list | None = None
  error: BaseException | None = None

  def wait(self, timeout: float | None = None) -> list:
    if not self.done.wait(timeout):
      raise TimeoutError("the decode did not finish in time")
    if self.error is not None:
      raise self.error
    return self.result


def _merge_key(job: Job):
  """Jobs with equal keys may share a batch; None: the job runs alone. Rows must also have one prompt length:
  LLaDA's positions are 0..T-1 whatever the padding (as in the reference), so left padding changes a row's
  tokens."""
  lengths = {len(r) for r in job.rows}
  if settings_lib.draws_noise(job.settings) or len(lengths) != 1:
    return None
  return settings_lib.batch_key(job.settings), lengths.pop()


class Batcher:
  """submit(job) from any thread; one daemon worker runs `engine.generate` on merged batches."""

  def __init__(self, engine, max_batch: int, wait_s: float = 0.02):
    self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
    self._queue = collections.deque()
    self._cv = threading.Condition()
    self._stop = False
    self.batches_run = 0
    self.rows_run = 0
    self._thread = threading.Thread(target=self._loop, name="qdllm-batcher", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> Job:
    with self._cv:
      self._queue.append(job)
      self._cv.notify()
    return job

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._thread.join(timeout=5)

  def _take(self) -> list[Job] | None:
    """The next group of jobs to decode together (FIFO head first), or None when closing."""
    with self._cv:
      while not self._queue and not self._stop:
        self._cv.wait()
      if self._stop:
        return None
      head = self._queue.popleft()
    key = _merge_key(head)
    if key is None or len(head.rows) >= self.max_batch:
      return [head]
    group, rows = [head], len(head.rows)
    deadline = time.monotonic() + self.wait_s
    with self._cv:
      while rows < self.max_batch:
        match = next((j for j in self._queue if _merge_key(j) == key and rows + len(j.rows) <= self.max_batch),
                     None)
        if match is not None:
          self._queue.remove(match)
          group.append(match)
          rows += len(match.rows)
          continue
        left = deadline - time.monotonic()
        if left <= 0 or self._stop:
          break
        self._cv.wait(left)
    return group

  def _loop(self) -> None:
    while True:
      group = self._take()
      if group is None:
        return
      rows = [r for j in group for r in j.rows]
      seed = group[0].seed if group[0].seed is not None else random.SystemRandom().randrange(2**31)
      try:
        outs, _ = self.engine.generate(rows, group[0].settings, seed=seed, batch_size=self.max_batch)
      except Exception as e:  # noqa: BLE001 (reported to each waiting request; the worker keeps serving)
        for j in group:
          j.error = e if isinstance(e, QdllmError) else RuntimeError(f"decode failed: {type(e).__name__}: {e}")
          j.done.set()
        continue
      self.batches_run += 1
      self.rows_run += len(rows)
      start = 0
      for j in group:
        j.result = outs[start:start + len(j.rows)]
        start += len(j.rows)
        j.done.set()
