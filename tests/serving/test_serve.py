"""`qdllm_jax.serve` over real HTTP on a free loopback port: concurrent requests batched and answered as the
sampler on load_quantized answers them, n / seed / chat, and >= 10 kinds of bad requests answered with a 4xx JSON
error while the server keeps serving."""
import http.client
import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
from serving_common import SAMPLER, direct, same_length_prompts, text_of

from qdllm_jax import chat_template, serve
from qdllm_jax.sampling import settings as settings_lib


@pytest.fixture(scope="module")
def server(q_engine):
  s = settings_lib.apply_overrides(settings_lib.default_settings("llada"), list(SAMPLER.items()))
  srv = serve.make_server(q_engine, s, port=0, max_batch=4, max_n=4, batch_wait_s=0.5, model_name="tiny-w2")
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.batcher.close()
  srv.server_close()


def _url(srv, path):
  host, port = srv.server_address[:2]
  return f"http://{host}:{port}{path}"


def post(srv, path, body):
  req = urllib.request.Request(_url(srv, path), data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=300) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def get(srv, path):
  with urllib.request.urlopen(_url(srv, path), timeout=30) as r:
    return r.status, json.loads(r.read())


def test_binds_loopback_and_reports_health(server):
  assert server.server_address[0] == "127.0.0.1"
  status, h = get(server, "/health")
  assert status == 200 and h["status"] == "ok" and h["model"] == "tiny-w2" and h["max_batch"] == 4
  assert h["kernel_path"].startswith("packed kernels: xla")


def test_concurrent_requests_are_batched_and_answered_correctly(server, q_dir, q_engine):
  tok = q_engine.tokenizer
  prompts = same_length_prompts(tok, 4)
  want = direct(q_dir, [tok(p)["input_ids"] for p in prompts])  # temperature 0: rows do not interact
  before = server.batcher.batches_run
  results = [None] * 4

  def call(i):
    results[i] = post(server, "/v1/completions", {"prompt": prompts[i], "max_tokens": SAMPLER["gen_length"]})
  threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for i, (status, body) in enumerate(results):
    assert status == 200, body
    assert body["object"] == "text_completion" and len(body["choices"]) == 1
    assert body["choices"][0]["text"] == text_of(tok, want[i]), i
    assert body["usage"]["prompt_tokens"] == len(tok(prompts[i])["input_ids"])
  assert server.batcher.batches_run - before < 4  # at least two requests shared a batch


def test_n_and_seed_reproduce_the_seeded_sampler(server, q_dir, q_engine):
  tok = q_engine.tokenizer
  p = same_length_prompts(tok, 1)[0]
  body = {"prompt": p, "n": 2, "temperature": 0.8, "seed": 11, "model": "tiny-w2"}
  status, r1 = post(server, "/v1/completions", body)
  assert status == 200, r1
  ids = tok(p)["input_ids"]
  want = direct(q_dir, [ids, ids], seed=11, temperature=0.8)
  assert [c["text"] for c in r1["choices"]] == [text_of(tok, w) for w in want]
  assert [c["index"] for c in r1["choices"]] == [0, 1]
  assert post(server, "/v1/completions", body)[1]["choices"] == r1["choices"]


def test_chat_completion_uses_the_template(server, q_dir, q_engine):
  tok = q_engine.tokenizer
  msgs = [{"role": "user", "content": "Who made the light?"}]
  status, r = post(server, "/v1/chat/completions", {"messages": msgs, "temperature": 0.8, "seed": 7})
  assert status == 200, r
  want = direct(q_dir, [chat_template.encode_chat(tok, msgs)], seed=7, temperature=0.8)[0]
  assert r["object"] == "chat.completion"
  assert r["choices"][0]["message"] == {"role": "assistant", "content": text_of(tok, want)}


def _raw(srv, method, path, body=b"", headers=None):
  conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
  conn.request(method, path, body=body, headers=headers or {})
  r = conn.getresponse()
  out = r.status, json.loads(r.read())
  conn.close()
  return out


JSON = {"Content-Type": "application/json"}
OK = {"prompt": "And God made the light"}
BAD = [  # (method, path, body bytes, headers, status, code)
    ("POST", "/v1/completions", b"{not json", JSON, 400, "invalid_json"),
    ("POST", "/v1/completions", b"[1, 2]", JSON, 400, "invalid_body"),
    ("POST", "/v1/completions", {**OK, "top_q": 1}, JSON, 400, "unknown_field"),
    ("POST", "/v1/completions", {"max_tokens": 8}, JSON, 400, "missing_field"),
    ("POST", "/v1/completions", {"prompt": 17}, JSON, 400, "invalid_type"),
    ("POST", "/v1/completions", {**OK, "max_tokens": "8"}, JSON, 400, "invalid_type"),
    ("POST", "/v1/completions", {**OK, "n": 0}, JSON, 400, "out_of_range"),
    ("POST", "/v1/completions", {**OK, "n": 99}, JSON, 400, "out_of_range"),
    ("POST", "/v1/completions", {**OK, "temperature": -1}, JSON, 400, "out_of_range"),
    ("POST", "/v1/completions", {**OK, "seed": True}, JSON, 400, "invalid_type"),
    ("POST", "/v1/completions", {"prompt": " light" * 300}, JSON, 400, "context_length_exceeded"),
    ("POST", "/v1/completions", {**OK, "max_tokens": 6}, JSON, 400, "invalid_value"),
    ("POST", "/v1/completions", {**OK, "stream": True}, JSON, 400, "unsupported"),
    ("POST", "/v1/completions", {**OK, "model": "gpt-4"}, JSON, 404, "model_not_found"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, JSON, 400, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, JSON, 400, "invalid_value"),
    ("POST", "/v1/completions", OK, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("POST", "/v2/engines", OK, JSON, 404, "not_found"),
    ("GET", "/v1/completions", b"", {}, 405, "method_not_allowed"),
]


def test_bad_requests_get_4xx_json_errors_and_the_server_stays_up(server, q_dir, q_engine):
  for method, path, body, headers, status, code in BAD:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, err = _raw(server, method, path, data, headers)
    assert (got, err["error"]["code"]) == (status, code), (path, body, err)
    assert err["error"]["message"]
  assert len({b[-1] for b in BAD}) >= 10
  conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)  # no Content-Length at all
  conn.putrequest("POST", "/v1/completions")
  conn.putheader("Content-Type", "application/json")
  conn.endheaders()
  r = conn.getresponse()
  assert r.status == 411 and json.loads(r.read())["error"]["code"] == "length_required"
  conn.close()
  assert get(server, "/health")[0] == 200
  tok = q_engine.tokenizer
  prompts = same_length_prompts(tok, 4)
  status, r = post(server, "/v1/completions", {"prompt": prompts})  # a list of prompts: one choice each, in order
  assert status == 200
  want = direct(q_dir, [tok(p)["input_ids"] for p in prompts])
  assert [c["text"] for c in r["choices"]] == [text_of(tok, w) for w in want]


def test_busy_port_is_reported_before_the_model_loads(q_dir, monkeypatch, capsys):
  """serve binds before load_engine: a busy port exits 2 at once, and the weights are never read."""
  def no_load(*a, **k):
    raise AssertionError("load_engine ran although the port is busy")
  monkeypatch.setattr(serve.engine_lib, "load_engine", no_load)
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    assert serve.main(["--model", q_dir, "--port", str(port)]) == 2
  assert f"cannot bind 127.0.0.1:{port}" in capsys.readouterr().err
