"""The router serves HTTPS when given a certificate, and mutual TLS with --tls-ca and
--require-client-cert (issue 10 item 6), as a real `familial-serve --tier router` process; a relay
node that serves TLS warns when it dials --next in plaintext. Certificates are made here."""
from __future__ import annotations

import ssl

import httpx
import openai
import pytest

from serving_helpers import spawn_serve, stop, wait_for

pytest.importorskip("cryptography.x509")
from tests.relay.test_tls import _ca, _leaf  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("familial-test-ca")
    rogue_key, rogue = _ca("rogue-ca")
    files = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    files["server.pem"], files["server.key"] = _leaf("router", ca_key, ca, server=True)
    files["client.pem"], files["client.key"] = _leaf("client", ca_key, ca)
    files["rogue.pem"], files["rogue.key"] = _leaf("intruder", rogue_key, rogue)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _ctx(pki, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.pem"), str(pki / f"{client}.key"))
    return ctx


def _router(tiny_ckpt, *extra):
    proc = spawn_serve(["--tier", "router", "--checkpoint", tiny_ckpt, "--port", "0", "--calibrate-rounds", "1",
                        *map(str, extra)])
    m, _ = wait_for(proc, r"familial router on (https?)://127.0.0.1:(\d+)/v1")
    return proc, m.group(1), int(m.group(2))


def test_router_serves_https(tiny_ckpt, pki):
    proc, scheme, port = _router(tiny_ckpt, "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key")
    try:
        assert scheme == "https"
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=_ctx(pki)) as c:
            assert c.get(url + "/health").json()["status"] == "ok"
            oc = openai.OpenAI(base_url=url + "/v1", api_key="x", http_client=c, max_retries=0)
            r = oc.completions.create(model=oc.models.list().data[0].id, prompt="hi", max_tokens=2)
            assert r.usage.completion_tokens >= 1
        with pytest.raises(httpx.TransportError):          # plain HTTP gets no answer
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError):            # a client that does not trust the CA refuses it
            httpx.get(url + "/health", timeout=5)
    finally:
        rest = stop(proc)
    assert proc.returncode == 0, rest


def test_router_mutual_tls(tiny_ckpt, pki):
    proc, _, port = _router(tiny_ckpt, "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key",
                            "--tls-ca", pki / "ca.pem", "--require-client-cert")
    url = f"https://127.0.0.1:{port}/health"
    try:
        with httpx.Client(verify=_ctx(pki, "client")) as c:
            assert c.get(url).status_code == 200
        for client in (None, "rogue"):                    # no certificate, or one from another CA
            with pytest.raises(httpx.TransportError):
                with httpx.Client(verify=_ctx(pki, client), timeout=5) as c:
                    c.get(url)
    finally:
        stop(proc)


def test_tls_flag_mistakes_are_one_line(tiny_ckpt, pki, capsys):
    from serving.cli import main

    cases = [(["--tls-cert", pki / "server.pem"], "--tls-cert needs --tls-key"),
             (["--tls-key", pki / "server.key"], "need --tls-cert"),
             (["--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key", "--require-client-cert"],
              "--require-client-cert needs --tls-ca"),
             (["--tls-cert", pki / "server.pem", "--tls-key", pki / "client.key"], "cannot use the TLS files"),
             (["--tls-cert", pki / "nope.pem", "--tls-key", pki / "server.key"], "cannot use the TLS files")]
    for extra, needle in cases:
        code = main(["--tier", "router", "--checkpoint", str(tiny_ckpt), *map(str, extra)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, (extra, err)


@pytest.mark.parametrize("next_tls", [False, True])
def test_tls_node_warns_when_it_dials_next_in_plaintext(tiny_ckpt, pki, tmp_path, next_tls):
    from deploy.shards import split_checkpoint

    split_checkpoint(tiny_ckpt, tmp_path / "shards", "device=0,edge=1,cloud=2..")
    extra = ["--tls-ca", pki / "ca.pem"] if next_tls else []
    proc = spawn_serve(["--tier", "device", "--shards", tmp_path / "shards", "--port", "0", "--next", "127.0.0.1:9",
                        "--tls-cert", pki / "server.pem", "--tls-key", pki / "server.key", *extra])
    _, out = wait_for(proc, r"serving on 127.0.0.1:\d+ with TLS")
    out += stop(proc)
    assert ("PLAINTEXT" in out) != next_tls, out
    if not next_tls:
        assert "dials --next 127.0.0.1:9 in PLAINTEXT" in out
