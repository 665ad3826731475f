"""Model downloads from plain URLs (docker/fetch_models.py, UrlBackend) against a real local
HTTP server that misbehaves: drops the connection mid-body, lies about the length, stalls,
trickles, ignores Range or answers it with another range, corrupts a byte.

What must hold: a truncated, corrupt or stalled transfer never leaves a file under its final
name; an interrupted transfer resumes (Range, its Content-Range checked) instead of starting
again, with or without a hash in the manifest. Each scenario is one test; the figures in
docs/reliability.md are this file's count.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from docker_modules import load_docker_module

fm = load_docker_module("fetch_models")

PAYLOAD = os.urandom(256 * 1024)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
CHUNK = 64 * 1024


class Server(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD; `script` is a list of behaviours, one per request (the last one repeats)."""

    script: ClassVar[list[str]] = ["good"]
    requests: ClassVar[list[str | None]] = []
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        behaviour = self.script[min(len(self.requests), len(self.script) - 1)]
        header = self.headers.get("Range")
        type(self).requests.append(header)
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        data = bytearray(PAYLOAD)
        if behaviour == "corrupt":
            data[1000] ^= 0xFF
        total = len(data) + (5000 if behaviour == "longer" else 0)  # what it claims the file's size is
        if header and behaviour not in ("ignore-range",):
            if behaviour == "wrong-range":  # answers with the whole file as a range
                start = 0
            if behaviour == "416" or start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total + 1000 if behaviour == '416' else total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            if behaviour != "no-content-range":
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        else:
            start = 0
            self.send_response(200)
        body = bytes(data[start:])
        announced = {"longer": total - start, "shorter": len(body) - 5000}.get(behaviour, len(body))
        self.send_header("Content-Length", str(announced))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if behaviour == "drop":  # a piece of the body, then the connection is gone
                self.wfile.write(body[:CHUNK])
            elif behaviour == "stall":  # a piece, then silence until the client gives up
                self.wfile.write(body[:CHUNK])
                self.wfile.flush()
                time.sleep(3)
            elif behaviour == "trickle":  # a few bytes at a time, never quite silent
                for i in range(0, 200):
                    self.wfile.write(body[i * 10:(i + 1) * 10])
                    self.wfile.flush()
                    time.sleep(0.02)
            elif behaviour == "shorter":
                self.wfile.write(body[:announced])
            else:
                self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    httpd.daemon_threads = True
    Server.requests = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield lambda *script: setattr(Server, "script", list(script)) or f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetch(tmp_path: Path, url: str, retries: int = 6, **entry: Any) -> tuple[Path, list[str]]:
    messages: list[str] = []
    backend = fm.UrlBackend(timeout=1.0, stall_seconds=0.5, min_rate=2000.0, log=messages.append)
    fetcher = fm.Fetcher(tmp_path, url=backend, retries=retries, backoff=0.0, log=messages.append,
                         sleep=lambda seconds: None)
    path = fetcher.fetch(fm.ModelEntry(name="m", folder="vae", url=f"{url}/model.safetensors", **entry))
    return path, messages


def target(tmp_path: Path) -> Path:
    return tmp_path / "vae" / "model.safetensors"


def offsets() -> list[int]:
    return [int(h.split("=")[1].split("-")[0]) if h else 0 for h in Server.requests]


@pytest.mark.parametrize("checked", ["no hash", "sha256", "size"])
def test_a_dropped_connection_resumes_where_it_stopped(tmp_path, server, checked):
    extra = {"no hash": {}, "sha256": {"sha256": SHA}, "size": {"size": len(PAYLOAD)}}[checked]
    path, _ = fetch(tmp_path, server("drop"), retries=8, **extra)
    assert path.read_bytes() == PAYLOAD
    assert offsets() == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]  # each attempt asks for the rest


def test_dropped_every_time_gives_up_and_installs_nothing(tmp_path, server):
    with pytest.raises(fm.FetchError, match=r"giving up after 3 attempts: m: the connection ended after"):
        fetch(tmp_path, server("drop"), retries=2)
    assert not target(tmp_path).exists()
    part = tmp_path / fm.DOWNLOADS_DIR / "m" / "model.safetensors.part"
    assert part.read_bytes() == PAYLOAD[:3 * CHUNK]  # kept: the next start resumes


def test_a_server_announcing_more_than_it_sends_never_completes(tmp_path, server):
    with pytest.raises(fm.FetchError, match="the connection ended after"):
        fetch(tmp_path, server("longer"), retries=2)
    assert not target(tmp_path).exists()


def test_a_server_announcing_less_is_caught_by_the_hash_or_size(tmp_path, server):
    with pytest.raises(fm.FetchError, match="SHA-256"):
        fetch(tmp_path, server("shorter"), retries=1, sha256=SHA)
    assert not target(tmp_path).exists()
    with pytest.raises(fm.FatalDownloadError, match=r"models\.yaml says"):
        fetch(tmp_path, server("shorter"), size=len(PAYLOAD))
    assert not target(tmp_path).exists()


def test_a_corrupt_download_is_never_installed_and_is_fetched_again_from_zero(tmp_path, server):
    path, _ = fetch(tmp_path, server("corrupt", "good"), sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert Server.requests == [None, None]  # not resumed from the corrupt bytes
    with pytest.raises(fm.FetchError, match="SHA-256"):
        fetch(tmp_path / "again", server("corrupt"), retries=1, sha256=SHA)
    assert not target(tmp_path / "again").exists()


def test_a_stalled_server_times_out_and_the_next_attempt_resumes(tmp_path, server):
    started = time.monotonic()
    path, _ = fetch(tmp_path, server("stall", "good"), sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert offsets() == [0, CHUNK]
    assert time.monotonic() - started < 5


def test_a_trickling_server_counts_as_stalled(tmp_path, server):
    path, messages = fetch(tmp_path, server("trickle", "good"), sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert any("stalled" in m for m in messages)
    assert len(Server.requests) == 2 and Server.requests[1] is not None  # resumed after the trickle


def test_a_server_that_ignores_range_is_downloaded_again_from_the_start(tmp_path, server):
    path, messages = fetch(tmp_path, server("drop", "ignore-range"), sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert offsets() == [0, CHUNK]
    assert any("ignored the Range request" in m for m in messages)


@pytest.mark.parametrize("behaviour", ["wrong-range", "no-content-range", "416"])
def test_a_range_answer_that_does_not_fit_starts_again(tmp_path, server, behaviour):
    path, _ = fetch(tmp_path, server("drop", behaviour, "good"))
    assert path.read_bytes() == PAYLOAD
    assert offsets() == [0, CHUNK, 0]  # the partial file was dropped, not appended to


def test_a_complete_partial_file_is_accepted_only_when_the_server_says_so(tmp_path, server):
    url = server("good")
    staging = tmp_path / fm.DOWNLOADS_DIR / "m"
    staging.mkdir(parents=True)
    (staging / "model.safetensors.part").write_bytes(PAYLOAD)
    path, _ = fetch(tmp_path, url, sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert Server.requests == [f"bytes={len(PAYLOAD)}-"]  # 416 with bytes */<the same size>


def test_content_range_parsing():
    assert fm.parse_content_range("bytes 10-19/100") == (10, 19, 100)
    assert fm.parse_content_range("bytes 0-9/*") == (0, 9, None)
    assert fm.parse_content_range("bytes */100") == (None, None, 100)
    for bad in (None, "", "bytes 10-", "items 0-1/2", "bytes x-y/z"):
        with pytest.raises(fm.TransferError):
            fm.parse_content_range(bad)
