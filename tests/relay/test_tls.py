"""TLS and mutual TLS between tiers, with a CA and certificates generated here (cryptography).

device -> edge -> cloud all require client certificates from the CA; each node dials the next with
its own certificate. A client with a valid certificate gets exact tokens from the cloud; clients with
no certificate, a certificate from another CA, or no TLS at all are refused.
"""
import datetime as dt
import ipaddress

import pytest

from relay.client import RelayClient, RelayError
from relay.types import TLSConfig
from tests.relay.relay_helpers import chain, run

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _pem_key(k) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(name, key, issuer_name, issuer_key, *, ca=False, server=False):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return key, _cert(name, key, subject, key, ca=True)


def _leaf(name, ca_key, ca_cert, server=False):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(name, key, ca_cert.subject, ca_key, server=server)
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki():
    ca_key, ca = _ca("familial-test-ca")
    rogue_key, rogue = _ca("rogue-ca")
    node_cert, node_key = _leaf("relay-node", ca_key, ca, server=True)
    client_cert, client_key = _leaf("router", ca_key, ca)
    rogue_cert, rogue_key_pem = _leaf("intruder", rogue_key, rogue)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    return dict(ca=ca_pem, node=TLSConfig(ca=ca_pem, cert=node_cert, key=node_key),
                client=TLSConfig(ca=ca_pem, cert=client_cert, key=client_key),
                no_cert=TLSConfig(ca=ca_pem), rogue=TLSConfig(ca=ca_pem, cert=rogue_cert, key=rogue_key_pem))


def test_mutual_tls_chain_serves_valid_clients_and_refuses_others(family, pki):
    G = family.model.cfg.G
    kw = dict(tls=pki["node"], require_client_cert=True, next_tls=pki["node"])

    async def go():
        cloud_kw = dict(tls=pki["node"], require_client_cert=True)
        async with chain(family, device_kw=kw, edge_kw=kw, cloud_kw=cloud_kw) as (dev, edge, cloud):
            target = f"localhost:{dev.port}"
            good = RelayClient(target, tls=pki["client"], timeout_s=10)
            assert await good.health()
            sid = await good.open_session()
            toks = [3, 1, 4, 1, 5]
            r = await good.forward(sid, toks, 0, exit=G - 1)
            assert r.tier == "cloud" and not r.degraded and r.token == family.ref_token(toks, G - 1)
            info = await good.family_info()
            assert info["complete"] and len(info["tiers"]) == 3
            await good.close()
            refused = {}
            for name in ("no_cert", "rogue", None):
                for port in (dev.port, cloud.port):
                    c = RelayClient(f"localhost:{port}", tls=pki[name] if name else None, timeout_s=3)
                    try:
                        await c.open_session()
                        refused[(name, port)] = "accepted"
                    except RelayError as e:
                        refused[(name, port)] = e.code
                    assert not await c.health()
                    await c.close()
            return refused
    refused = run(go())
    assert all(code == "UNAVAILABLE" for code in refused.values()), refused


def test_server_only_tls(family, pki):
    async def go():
        node_tls = TLSConfig(cert=pki["node"].cert, key=pki["node"].key)
        async with chain(family, device_kw=dict(tls=node_tls), edge_kw=dict(tls=node_tls, next_tls=pki["no_cert"]),
                         cloud_kw=dict(tls=node_tls)) as (dev, edge, cloud):
            # the device dials the edge without TLS while the edge serves TLS: the deep step degrades
            c = RelayClient(f"localhost:{dev.port}", tls=pki["no_cert"], timeout_s=5)
            sid = await c.open_session()
            r = await c.forward(sid, [1, 2], 0, exit=family.model.cfg.G - 1, deadline_s=3)
            assert r.degraded and r.tier == "device"
            await c.close()
            c = RelayClient(f"localhost:{edge.port}", tls=pki["no_cert"], timeout_s=5)
            assert await c.health()
            info = await c.family_info()
            assert info["complete"] and [t["tier"] for t in info["tiers"]] == ["edge", "cloud"]
            await c.close()
    run(go())
