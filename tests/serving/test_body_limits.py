"""Large and slow request bodies (issue 10 item 2 and the half-open part of item 9), against real
uvicorn servers: bodies over the cap get 413 (a declared length at once, nothing read; a chunked body
as soon as it passes the cap), an over-long prompt under the cap is refused by its byte count before it
is tokenized, a body that stops arriving gets 408, and `/health` keeps answering while 10-30 MB
bodies are thrown at the router (a `familial-serve --tier router` process)."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from serving.app import build_app
from serving.engine import LocalEngine
from serving.settings import ServeSettings
from serving_helpers import spawn_serve, stop, wait_for


def _raw(port: int, head: bytes, body_parts=(), gap_s: float = 0.0, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `head` (+ body parts, `gap_s` apart) on a raw socket; (everything read until close, seconds to
    the first response byte, counted from the end of the headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        t0 = time.perf_counter()
        for part in body_parts:
            try:
                s.sendall(part)
            except OSError:   # the server answered and closed while we were still sending
                break
            time.sleep(gap_s)
        data, first = b"", None
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            first = first or time.perf_counter() - t0
            data += chunk
    return data, first


def _status_and_error(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def _post_head(port: int, length: int | None, path: str = "/v1/completions") -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n").encode()


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    from serving_helpers import ServerThread

    eng = LocalEngine.from_checkpoint(tiny_ckpt, name="tiny")
    with ServerThread(build_app(eng, ServeSettings(max_body_bytes=64 * 1024, body_timeout_s=0.5))) as s:
        yield s


def test_declared_oversize_body_is_refused_before_it_is_sent(local):
    data, first = _raw(local.port, _post_head(local.port, 30_000_000))
    status, err = _status_and_error(data)
    assert status == 413 and err["code"] == "request_too_large" and "65536" in err["message"]
    assert b"connection: close" in data.lower()


def test_chunked_body_is_cut_off_at_the_cap(local):
    chunk = b"x" * 16384
    parts = [b'4000\r\n' + chunk + b'\r\n'] * 64          # 1 MiB offered, 64 KiB allowed
    data, _ = _raw(local.port, _post_head(local.port, None), parts)
    status, err = _status_and_error(data)
    assert status == 413 and err["code"] == "request_too_large"
    assert httpx.get(local.url + "/health").status_code == 200


def test_half_open_and_trickling_bodies_time_out(local):
    # headers + 10 of 100 bytes, then silence
    data, first = _raw(local.port, _post_head(local.port, 100) + b'{"prompt":', timeout=10)
    status, err = _status_and_error(data)
    assert status == 408 and err["code"] == "request_timeout"
    # one byte every 0.1 s never finishes within the 0.5 s body deadline either
    data, _ = _raw(local.port, _post_head(local.port, 100), [b"x"] * 100, gap_s=0.1, timeout=10)
    assert _status_and_error(data)[0] == 408
    assert httpx.get(local.url + "/health").status_code == 200
    r = httpx.post(local.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text      # the server is none the worse


def test_overlong_prompt_under_the_cap_is_refused_by_its_size(local):
    # the tiny family's context is 256 tokens: 60 kB of text cannot fit, whatever the tokenizer does
    r = httpx.post(local.url + "/v1/completions", json={"prompt": "x" * 60_000, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "bytes" in r.json()["error"]["message"], r.text            # refused before tokenizing
    r = httpx.post(local.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "y" * 60_000}], "max_tokens": 2})
    assert r.status_code == 400 and "bytes" in r.json()["error"]["message"], r.text
    # just over the limit: tokenized (off the event loop) and refused by its token count
    r = httpx.post(local.url + "/v1/completions", json={"prompt": "x" * 300, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt is 300 tokens"), r.text
    r = httpx.post(local.url + "/v1/completions", json={"prompt": "x" * 200, "max_tokens": 2})
    assert r.status_code == 200, r.text
    m = httpx.get(local.url + "/metrics").text
    assert 'familial_requests_total{endpoint="completions",status="400"}' in m


@pytest.fixture(scope="module")
def router(tiny_ckpt):
    proc = spawn_serve(["--tier", "router", "--checkpoint", tiny_ckpt, "--port", "0", "--calibrate-rounds", "1"])
    m, _ = wait_for(proc, r"familial router on (http://\S+)/v1")
    yield m.group(1)
    stop(proc)


def _big_uploads(url: str, bodies: list[bytes], statuses: list) -> None:
    with httpx.Client(timeout=60) as c:
        for i, body in enumerate(bodies):
            if i % 2:   # chunked: no Content-Length, so the router must count
                content = (body[k:k + (1 << 20)] for k in range(0, len(body), 1 << 20))
            else:
                content = body
            try:
                r = c.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"})
                statuses.append(r.status_code)
            except httpx.TransportError:   # the router answered 413 and closed while we were still sending
                statuses.append("closed")


def test_health_answers_while_10_to_30_mb_bodies_arrive(router):
    bodies = [json.dumps({"prompt": "x" * n, "max_tokens": 2}).encode() for n in (10_000_000, 30_000_000)] * 3
    statuses: list = []
    t = threading.Thread(target=_big_uploads, args=(router, bodies, statuses))
    lat_ms = []
    with httpx.Client(timeout=10) as c:
        c.get(router + "/health")
        t.start()
        while t.is_alive() or len(lat_ms) < 20:
            t0 = time.perf_counter()
            assert c.get(router + "/health").status_code == 200
            lat_ms.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.01)
    t.join()
    assert len(statuses) == len(bodies) and set(statuses) <= {413, "closed"} and 413 in statuses, statuses
    lat_ms.sort()
    p90 = lat_ms[int(0.9 * len(lat_ms))]
    # the target is 100 ms; the machine is shared, so one probe may be late, but not by seconds
    print(f"health probes: {len(lat_ms)}, p50 {lat_ms[len(lat_ms) // 2]:.1f} ms, p90 {p90:.1f} ms, max {lat_ms[-1]:.1f} ms; uploads {statuses}")
    assert p90 < 100 and lat_ms[-1] < 1000, (p90, lat_ms[-5:])
    r = httpx.post(router + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def test_max_body_flag(tiny_ckpt):
    proc = spawn_serve(["--tier", "router", "--checkpoint", tiny_ckpt, "--port", "0", "--calibrate-rounds", "1",
                        "--max-body-mb", "0.01", "--body-timeout-s", "0.5"])
    m, _ = wait_for(proc, r"familial router on http://127.0.0.1:(\d+)/v1")
    port = int(m.group(1))
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x" * 20_000})
        assert r.status_code == 413 and "10485 bytes" in r.json()["error"]["message"], r.text
        data, _ = _raw(port, _post_head(port, 100) + b"{", timeout=10)
        assert _status_and_error(data)[0] == 408
    finally:
        stop(proc)
