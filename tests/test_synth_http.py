"""synth.py's OpenAI-compatible HTTP generator against a local server (127.0.0.1, port 0, a thread):
the same samples as the in-process path given the same replies, 429 retried, resumable output."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import synth
import tokenizer
from errors import UserError
from test_synth import STDLIB_DOCS, fake_generate_text

KINDS = ["single", "multi", "summary"]


class Server:
    """Replies fake_generate_text(prompt) in the OpenAI schema; `fail` lists statuses for the first requests."""

    def __init__(self, fail=()):
        self.fail, self.requests = list(fail), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body, self.headers.get("Authorization")))
                if outer.fail:
                    code = outer.fail.pop(0)
                    self.send_response(code)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                reply = {"choices": [{"message": {"role": "assistant",
                                                  "content": fake_generate_text(body["messages"][0]["content"])}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


def rows(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def without_generator(row):
    meta = {k: v for k, v in row["meta"].items() if not k.startswith("generator")}
    return {"messages": row["messages"], "meta": meta}


def test_http_generator_writes_the_in_process_samples(tmp_path, monkeypatch):
    tok = tokenizer.ByteTokenizer()
    synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "a.jsonl", n=4, seed=1,
                generate_text=fake_generate_text, generator_name="fake")
    monkeypatch.setenv("TEST_KEY", "sk-test")
    with Server() as srv:
        gen = synth.http_generate_text(srv.url, "tiny-chat", api_key_env="TEST_KEY", timeout=10)
        info = dict(generator_url=srv.url, generator_model="tiny-chat")
        synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "b.jsonl", n=4, seed=1, generate_text=gen,
                    generator_name="tiny-chat", generator_info=info, concurrency=3)
    a, b = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert [without_generator(r) for r in a] == [without_generator(r) for r in b]
    assert [r["meta"]["index"] for r in b] == [0, 1, 2, 3]  # index order whatever the completion order
    for r in b:
        assert r["meta"]["generator_url"] == srv.url and r["meta"]["generator_model"] == "tiny-chat"
        assert all(c["reply"] for c in r["meta"]["chunks"])
    path, body, auth = srv.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-chat" and auth == "Bearer sk-test"
    assert not list(tmp_path.glob("*.partial"))


def test_429_then_200_is_retried_and_a_client_error_is_not(tmp_path):
    with Server(fail=[429, 503]) as srv:
        gen = synth.http_generate_text(srv.url, "m", api_key_env=None, timeout=10, retries=2, backoff=0.01)
        assert "Question" in gen("Read it.\n\nPassage:\nalpha beta")
        assert len(srv.requests) == 3 and srv.requests[0][2] is None
    with Server(fail=[429, 429, 429]) as srv:
        gen = synth.http_generate_text(srv.url, "m", timeout=10, retries=2, backoff=0.01)
        with pytest.raises(UserError, match="gave up after 3 attempts"):
            gen("Passage:\nx")
    with Server(fail=[404]) as srv:
        with pytest.raises(UserError, match="HTTP 404"):
            synth.http_generate_text(srv.url, "m", timeout=10, backoff=0.01)("Passage:\nx")
        assert len(srv.requests) == 1
    gen = synth.http_generate_text("http://127.0.0.1:9/v1", "m", timeout=2, retries=1, backoff=0.01)
    with pytest.raises(UserError, match="gave up after 2 attempts"):  # connection refused: retried, bounded
        gen("Passage:\nx")
    with pytest.raises(UserError, match="http://"):
        synth.http_generate_text("127.0.0.1:8000/v1", "m")


def test_killed_run_resumes_with_each_sample_once(tmp_path):
    tok, out = tokenizer.ByteTokenizer(), tmp_path / "r.jsonl"
    calls = {"n": 0}

    def dies_after_three(prompt):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        return fake_generate_text(prompt)

    with pytest.raises(KeyboardInterrupt):
        synth.synth(STDLIB_DOCS, tok, 8192, KINDS, out, n=5, seed=2, generate_text=dies_after_three)
    partial = tmp_path / "r.jsonl.partial"
    settings, *first = rows(partial)
    assert settings["synth_settings"]["seed"] == 2 and settings["synth_settings"]["kinds"] == KINDS
    assert not out.exists() and 1 <= len(first) < 5
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "con')  # a kill in the middle of a write
    made = []

    def counting(prompt):
        made.append(prompt)
        return fake_generate_text(prompt)

    counts = synth.synth(STDLIB_DOCS, tok, 8192, KINDS, out, n=5, seed=2, generate_text=counting, concurrency=2)
    got = rows(out)
    assert counts == dict(written=5, failed=0) and [r["meta"]["index"] for r in got] == [0, 1, 2, 3, 4]
    assert got[:len(first)] == first  # the samples done before the kill are kept, not made again
    synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "clean.jsonl", n=5, seed=2, generate_text=fake_generate_text)
    assert got == rows(tmp_path / "clean.jsonl") and not partial.exists()
