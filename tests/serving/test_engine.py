"""engine.compile_timer: the compilation inside a generate call is measured apart from the decode."""
import threading

import jax
import jax.numpy as jnp
import pytest

from qdllm_jax import engine


def test_compile_timer_takes_the_union_of_this_threads_spans():
  with engine.compile_timer() as out:
    for a, b in ((0.0, 2.0), (1.0, 3.0), (1.5, 2.5), (5.0, 6.0)):          # union: [0, 3] + [5, 6] = 4 s
      jax.monitoring.record_event_time_span(engine.COMPILE_EVENTS[0], 100 + a, 100 + b)
    jax.monitoring.record_event_time_span("/some/other/event", 0.0, 50.0)
    t = threading.Thread(target=jax.monitoring.record_event_time_span, args=(engine.COMPILE_EVENTS[2], 0.0, 9.0))
    t.start()
    t.join()
  assert out == [pytest.approx(4.0)]


def test_compile_timer_sees_a_real_compile_and_not_a_cached_call():
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cos(x))
  x = jnp.arange(17.0)
  with engine.compile_timer() as first:
    jax.block_until_ready(f(x))
  with engine.compile_timer() as again:
    jax.block_until_ready(f(x))
  assert first[0] > 0 and again[0] == 0.0


def test_summary_line_reports_compile_apart():
  stats = dict(rows=2, tokens=16, steps=8, seconds=9.0, compile_seconds=8.0, tokens_per_s=16.0,
               peak_device_bytes=None, peak_host_bytes=2**30, kernel_path="packed kernels: xla")
  line = engine.summary_line(stats)
  assert "seconds 9.00 (compile 8.00)" in line and "tokens/s 16.0 (excl. compile)" in line
