"""TLS settings shared by the relay client, node and CLI (PEM bytes or paths). Sampling parameters and
exit policies live in trunk/sampling.py, what crosses the engine in relay/work.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _read(x) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    return Path(x).read_bytes()


@dataclass
class TLSConfig:
    """PEM bytes or paths. Server: cert+key (+ca to verify clients). Client: ca (+cert+key for mTLS)."""
    ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None
    server_name: str | None = None   # override the name checked against the server certificate

    def channel_credentials(self):
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca), private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    def server_credentials(self, require_client_cert: bool = False):
        import grpc
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        if require_client_cert and self.ca is None:
            raise ValueError("--require-client-cert needs --tls-ca to verify clients against")
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))], root_certificates=_read(self.ca),
                                           require_client_auth=require_client_cert)
