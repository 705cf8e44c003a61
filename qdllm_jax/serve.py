r"""An OpenAI-style HTTP endpoint for a quantized checkpoint (packed weights) or an FP HF directory.

  python -m qdllm_jax.serve --model runs/tiny/checkpoint --port 8000 --sampler.gen_length=8 \
      --sampler.block_length=8 --sampler.steps=8
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"prompt": "increment: 5 4 3 6 =>", "max_tokens": 8, "n": 2}'

Routes: POST /v1/completions, POST /v1/chat/completions (non-streaming; fields in serve_api.py: prompt or
messages, max_tokens, temperature, n, seed, model, user), GET /health, GET /v1/models. Requests are decoded by one
worker thread. A bad request gets a 4xx JSON error {"error": {"message", "type", "param", "code"}} and the server
keeps serving.

Batching (batcher.py): requests share a batch (up to --batch_size rows, waiting up to --batch_wait_ms) ONLY when
their settings draw no random numbers (LLaDA: temperature 0 and remasking low_confidence; Dream: temperature 0,
alg_temp 0 and a confidence alg, i.e. not Dream's default alg=origin) AND their prompts have the same number of
tokens. Every other request runs alone (its n choices are one batch). Reasons: the samplers draw one noise tensor
per batch from one key, so a row's random numbers would depend on what else is in the batch and a seeded request
would not be reproducible; and a left-padded row does not give the tokens of its own run (LLaDA numbers positions
0..T-1 whatever the padding, as its reference does, and extra masked keys change the floating-point reductions),
so rows of different prompt lengths are not merged. Throughput under load is therefore highest for greedy
requests of equal length; a sampled or ragged workload is decoded one request at a time.
Flags: those of `python -m qdllm_jax.generate` (--model, --chat_template, --batch_size, --dequantize, --no_verify,
--sampler.KEY=VALUE) plus --host (default 127.0.0.1: loopback only), --port (default 8000; 0 = a free one),
--max_n (default 8), --batch_wait_ms (default 20), --model_name (default the directory's name; the workdir's
for a launch checkpoint).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qdllm_jax import batcher as batcher_lib
from qdllm_jax import engine as engine_lib
from qdllm_jax import serve_api
from qdllm_jax.cli import setup_logging, split_overrides
from qdllm_jax.errors import ConfigError, QdllmError
from qdllm_jax.generate import build_parser, prepare

PROG = "python -m qdllm_jax.serve"
MAX_BODY = 1 << 20
DECODE_TIMEOUT_S = 3600
log = logging.getLogger("qdllm_jax.serve")


class Handler(BaseHTTPRequestHandler):
  """One request; the server object carries engine, settings, batcher, model_name, max_n."""
  protocol_version = "HTTP/1.1"
  server_version = "qdllm-jax"

  def log_message(self, fmt, *args):  # route the access log through logging (quiet by default)
    log.info("%s %s", self.address_string(), fmt % args)

  def _send(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, err: serve_api.BadRequest) -> None:
    self._send(err.status, err.body())

  def do_GET(self):  # noqa: N802 (http.server's naming)
    srv = self.server
    if self.path == "/health":
      self._send(200, {"status": "ok", "model": srv.model_name, "family": srv.engine.config.arch,
                       "kernel_path": srv.engine.kernel_path, "max_batch": srv.batcher.max_batch,
                       "batches_run": srv.batcher.batches_run, "rows_run": srv.batcher.rows_run})
    elif self.path == "/v1/models":
      self._send(200, {"object": "list", "data": [{"id": srv.model_name, "object": "model", "owned_by": "local"}]})
    elif self.path in serve_api.FIELDS:
      self._error(serve_api.BadRequest(405, f"{self.path} takes POST, not GET", None, "method_not_allowed"))
    else:
      self._error(_not_found(self.path))

  def do_POST(self):  # noqa: N802
    try:
      self._send(200, self._complete())
    except serve_api.BadRequest as e:
      self._error(e)
    except Exception as e:  # noqa: BLE001 (never let one request take the server down)
      log.exception("request failed")
      self._send(500, {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                 "param": None, "code": "internal_error"}})

  def _complete(self) -> dict:
    srv, route = self.server, self.path
    if route not in serve_api.FIELDS:
      self._drain()
      raise _not_found(route)
    body = self._read_json()
    rows, settings, seed, facts = serve_api.parse(route, body, srv.engine, srv.settings, max_n=srv.max_n,
                                                  model_name=srv.model_name)
    job = srv.batcher.submit(batcher_lib.Job(rows=rows, settings=settings, seed=seed))
    try:
      outs = job.wait(DECODE_TIMEOUT_S)
    except QdllmError as e:
      raise serve_api.BadRequest(400, str(e), None, "invalid_value") from None
    return serve_api.response(route, srv.engine, outs, facts, srv.model_name)

  def _drain(self) -> None:
    """Read and drop the body of a request that is refused before parsing (or close the connection after)."""
    n = self.headers.get("Content-Length")
    if n and n.isdigit() and int(n) <= MAX_BODY:
      self.rfile.read(int(n))
    else:
      self.close_connection = True

  def _read_json(self):
    ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    n = self.headers.get("Content-Length")
    if n is None or not n.isdigit():
      self.close_connection = True
      raise serve_api.BadRequest(411, "a Content-Length header is required (chunked bodies are not accepted)",
                                 None, "length_required")
    if int(n) > MAX_BODY:
      self.close_connection = True
      raise serve_api.BadRequest(413, f"the body has {n} bytes; at most {MAX_BODY} are accepted", None,
                                 "body_too_large")
    raw = self.rfile.read(int(n))
    if ctype != "application/json":
      raise serve_api.BadRequest(415, f"Content-Type {ctype or 'missing'!r}; send 'application/json'", None,
                                 "unsupported_media_type")
    try:
      return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise serve_api.BadRequest(400, f"the body is not valid JSON ({e}); send one JSON object", None,
                                 "invalid_json") from None


def _not_found(path: str) -> serve_api.BadRequest:
  return serve_api.BadRequest(404, f"no route {path!r:.80}; routes: POST /v1/completions, POST "
                              "/v1/chat/completions, GET /health, GET /v1/models", None, "not_found")


def bind(host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
  """A ThreadingHTTPServer bound and listening on host:port (0 = a free port), with nothing attached yet.

  OSError when the address is busy or not available: main binds before loading the model, so that this is
  reported at once, not after minutes of loading an 8B checkpoint (connections made while the model loads wait in
  the listen backlog)."""
  srv = ThreadingHTTPServer((host, port), Handler)
  srv.daemon_threads = True
  return srv


def attach(srv: ThreadingHTTPServer, engine, settings, *, max_batch: int = 8, max_n: int = 8,
           batch_wait_s: float = 0.02, model_name: str | None = None) -> ThreadingHTTPServer:
  """Give a bound server its engine, default sampler settings, name and batcher (starts the batcher's worker)."""
  srv.engine, srv.settings, srv.max_n = engine, settings, max_n
  path = os.path.normpath(os.path.abspath(engine.path))
  if os.path.basename(path) == "checkpoint":  # the launch's WORKDIR/checkpoint: name it by the workdir
    path = os.path.dirname(path)
  srv.model_name = model_name or os.path.basename(path)
  srv.batcher = batcher_lib.Batcher(engine, max_batch, batch_wait_s)
  return srv


def _check_sizes(max_batch: int, max_n: int) -> None:
  if max_batch < 1 or max_n < 1:
    raise ConfigError(f"batch_size={max_batch}, max_n={max_n}: both must be >= 1")


def make_server(engine, settings, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                max_n: int = 8, batch_wait_s: float = 0.02, model_name: str | None = None) -> ThreadingHTTPServer:
  """A ThreadingHTTPServer (not yet serving: call serve_forever) for `engine` with default sampler `settings`.

  port 0 binds a free port (server.server_address[1]). Close with server.shutdown(); server.batcher.close()."""
  _check_sizes(max_batch, max_n)
  return attach(bind(host, port), engine, settings, max_batch=max_batch, max_n=max_n, batch_wait_s=batch_wait_s,
                model_name=model_name)


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def main(argv=None) -> int:
  """Run the server until interrupted; returns the exit status (2 on a user error or a busy address)."""
  setup_logging("INFO")  # the qdllm_jax log (startup, access lines) at INFO; Orbax / absl stay at WARNING
  ap = build_parser(PROG, __doc__)
  ap.add_argument("--host", default="127.0.0.1")
  ap.add_argument("--port", type=int, default=8000)
  ap.add_argument("--max_n", type=int, default=8)
  ap.add_argument("--batch_wait_ms", type=float, default=20.0)
  ap.add_argument("--model_name", default=None)
  srv = None
  try:
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    overrides = split_overrides(rest, "--sampler.", PROG)
    _, _, tok, settings = prepare(args, overrides)
    _check_sizes(args.batch_size, args.max_n)
    try:
      srv = bind(args.host, args.port)
    except OSError as e:
      print(f"error: cannot bind {args.host}:{args.port} ({e.strerror}); choose another --port (or --host)",
            file=sys.stderr)
      return 2
    if not _is_loopback(args.host):
      log.warning("binding %s: the endpoint is reachable from other machines and has no authentication", args.host)
    log.info("bound http://%s:%d; loading %s", *srv.server_address[:2], args.model)
    eng = engine_lib.load_engine(args.model, dequantize=args.dequantize, tokenizer=tok, verify=not args.no_verify)
    attach(srv, eng, settings, max_batch=args.batch_size, max_n=args.max_n, batch_wait_s=args.batch_wait_ms / 1000,
           model_name=args.model_name)
  except QdllmError as e:
    if srv is not None:
      srv.server_close()
    print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
    return 2
  log.info("serving %s on http://%s:%d (%s)", srv.model_name, *srv.server_address[:2], eng.kernel_path)
  try:
    srv.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    srv.batcher.close()
    srv.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
