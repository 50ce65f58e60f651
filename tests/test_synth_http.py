"""data_synth.py's OpenAI-compatible HTTP generator against a local server (127.0.0.1, port 0, a thread):
the same samples as the in-process path given the same replies, 429 retried, resumable output."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data_synth
import tokenizer
from errors import UserError
from helpers import ROOT, STDLIB_DOCS, fake_generate_text

KINDS = ["single", "multi", "summary"]


class Server:
    """Replies content(prompt) (default fake_generate_text) in the OpenAI schema after `delay` seconds; `fail`
    lists statuses for the first requests."""

    def __init__(self, fail=(), content=fake_generate_text, delay=0.0):
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
                time.sleep(delay)
                reply = {"choices": [{"message": {"role": "assistant",
                                                  "content": content(body["messages"][0]["content"])}}]}
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
    data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "a.jsonl", n=4, seed=1,
                generate_text=fake_generate_text, generator_name="fake")
    monkeypatch.setenv("TEST_KEY", "sk-test")
    with Server() as srv:
        gen = data_synth.http_generate_text(srv.url, "tiny-chat", api_key_env="TEST_KEY", timeout=10)
        info = dict(generator_url=srv.url, generator_model="tiny-chat")
        data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "b.jsonl", n=4, seed=1, generate_text=gen,
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
        gen = data_synth.http_generate_text(srv.url, "m", api_key_env=None, timeout=10, retries=2, backoff=0.01)
        assert "Question" in gen("Read it.\n\nPassage:\nalpha beta")
        assert len(srv.requests) == 3 and srv.requests[0][2] is None
    with Server(fail=[429, 429, 429]) as srv:
        gen = data_synth.http_generate_text(srv.url, "m", timeout=10, retries=2, backoff=0.01)
        with pytest.raises(UserError, match="gave up after 3 attempts"):
            gen("Passage:\nx")
    with Server(fail=[404]) as srv:
        with pytest.raises(UserError, match="HTTP 404"):
            data_synth.http_generate_text(srv.url, "m", timeout=10, backoff=0.01)("Passage:\nx")
        assert len(srv.requests) == 1
    gen = data_synth.http_generate_text("http://127.0.0.1:9/v1", "m", timeout=2, retries=1, backoff=0.01)
    with pytest.raises(UserError, match="gave up after 2 attempts"):  # connection refused: retried, bounded
        gen("Passage:\nx")
    with pytest.raises(UserError, match="http://"):
        data_synth.http_generate_text("127.0.0.1:8000/v1", "m")


def test_killed_run_resumes_with_each_sample_once(tmp_path):
    tok, out = tokenizer.ByteTokenizer(), tmp_path / "r.jsonl"
    calls = {"n": 0}

    def dies_after_three(prompt):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        return fake_generate_text(prompt)

    with pytest.raises(KeyboardInterrupt):
        data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, out, n=5, seed=2, generate_text=dies_after_three)
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

    counts = data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, out, n=5, seed=2, generate_text=counting, concurrency=2)
    got = rows(out)
    assert counts == dict(written=5, failed=0) and [r["meta"]["index"] for r in got] == [0, 1, 2, 3, 4]
    assert got[:len(first)] == first  # the samples done before the kill are kept, not made again
    data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "clean.jsonl", n=5, seed=2, generate_text=fake_generate_text)
    assert got == rows(tmp_path / "clean.jsonl") and not partial.exists()


@pytest.mark.parametrize("content", [lambda p: "", lambda p: None, lambda p: "   \n"], ids=["empty", "null", "blank"])
def test_a_generator_with_nothing_usable_is_an_error_with_the_count(tmp_path, capsys, content):
    out = tmp_path / "s.jsonl"
    with Server(content=content) as srv:
        code = data_synth.main(["--docs", *map(str, STDLIB_DOCS[:2]), "--tokenizer", "bytes", "--ctx", "8192", "--kinds",
                           "single", "--n", "3", "--generator-url", srv.url, "--generator-model", "m", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "none of the 3 samples could be made: 3 of 3 generator replies were empty or null" in err, err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a progress file


def test_a_progress_file_of_other_settings_is_refused_not_mixed(tmp_path):
    tok, out = tokenizer.ByteTokenizer(), tmp_path / "r.jsonl"

    def dies_after_two(prompt, calls=[]):
        calls.append(prompt)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return fake_generate_text(prompt)

    with pytest.raises(KeyboardInterrupt):
        data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, out, n=4, seed=2, generate_text=dies_after_two)
    before = (tmp_path / "r.jsonl.partial").read_bytes()
    for change, flag in [(dict(seed=3), "--seed"), (dict(ctx=4096), "--ctx"), (dict(kinds=["single"]), "--kinds"),
                         (dict(docs=STDLIB_DOCS[:2]), "--docs"), (dict(generator_name="other"), "--generator")]:
        args = {**dict(docs=STDLIB_DOCS, ctx=8192, kinds=KINDS, seed=2, generator_name=None), **change}
        with pytest.raises(UserError, match=f"made with {flag}"):
            data_synth.synth(args["docs"], tok, args["ctx"], args["kinds"], out, n=4, seed=args["seed"],
                        generate_text=fake_generate_text, generator_name=args["generator_name"])
        assert (tmp_path / "r.jsonl.partial").read_bytes() == before and not out.exists()


SIGNAL_SCRIPT = """
import sys
import data_synth
sys.exit(data_synth.main({argv!r}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_with_requests_in_flight_keeps_finished_rows_and_resumes(tmp_path, sig):
    """A slow server (0.5 s a reply), 4 requests in flight: the signal lets them finish, keeps every finished
    row, exits 1 with one line saying how to continue and no traceback; the rerun makes only the rest, and
    the result equals an uninterrupted run."""
    out = tmp_path / "s.jsonl"
    with Server(delay=0.5) as srv:
        argv = ["--docs", *map(str, STDLIB_DOCS), "--tokenizer", "bytes", "--ctx", "8192", "--n", "12", "--seed", "4",
                "--concurrency", "4", "--generator-url", srv.url, "--generator-model", "m", "--out", str(out)]
        script = SIGNAL_SCRIPT.format(argv=argv)
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        partial = tmp_path / "s.jsonl.partial"
        t = time.time()
        while (not partial.exists() or partial.read_text().count("\n") < 3) and time.time() - t < 120:
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "rerun the same command" in errors[0] and str(partial) in errors[0], err
        kept = [json.loads(line) for line in partial.read_text().splitlines()[1:]]
        assert 2 <= len(kept) < 12 and not out.exists()
        assert f"{len(kept)} of 12 samples kept" in errors[0]
        asked = len(srv.requests)
        assert data_synth.main(argv) == 0
    got = rows(out)
    assert [r["meta"]["index"] for r in got] == list(range(12)) and not partial.exists()
    assert [r for r in got if r in kept] == sorted(kept, key=lambda r: r["meta"]["index"])  # kept, not remade
    assert len(srv.requests) - asked < sum(len(r["meta"]["chunks"]) for r in got)  # only the rest was asked for
    tok = tokenizer.ByteTokenizer()
    data_synth.synth(STDLIB_DOCS, tok, 8192, KINDS, tmp_path / "clean.jsonl", n=12, seed=4,
                generate_text=fake_generate_text, generator_name="m",
                generator_info=dict(generator_url=srv.url, generator_model="m"))
    assert got == rows(tmp_path / "clean.jsonl")
