"""credbroker client: gRPC stubs over mutual TLS.

    import credbroker
    from credbroker.v1 import common_pb2, broker_pb2

    with credbroker.connect("broker.internal:7443", ca="ca.pem", cert="agent.pem", key="agent.key") as cb:
        cred = cb.broker.ResolveCredential(broker_pb2.ResolveCredentialRequest(
            connection=common_pb2.ConnectionRef(connector="Slack", user_id="u-42")))

The CA is always given explicitly: the broker's certificate is checked against it, never against
the system trust store (nor SSL_CERT_FILE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import grpc

from .v1 import admin_pb2_grpc, broker_pb2_grpc

__all__ = ["Client", "connect"]

PathLike = Union[str, "os.PathLike[str]"]


def _read(path: PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {os.fspath(path)!r}: {e.strerror}") from None


@dataclass
class Client:
    """An open mTLS channel and the two services on it. Close it, or use it as a context manager."""

    channel: grpc.Channel
    broker: broker_pb2_grpc.BrokerStub
    admin: admin_pb2_grpc.AdminStub

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    addr: str,
    ca: PathLike,
    cert: PathLike,
    key: PathLike,
    *,
    server_name: Optional[str] = None,
    timeout: Optional[float] = 10.0,
) -> Client:
    """Opens a channel to ``addr`` ("host:port", an ``https://`` prefix is accepted) presenting the
    client certificate ``cert``/``key`` and trusting only the CA in ``ca``.

    ``server_name`` overrides the name checked in the broker's certificate. With ``timeout`` set,
    waits that long for the TLS handshake and raises ``grpc.FutureTimeoutError`` if it fails.
    """
    target = addr.removeprefix("https://").rstrip("/")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )
    options = []
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.secure_channel(target, credentials, options=options)
    if timeout is not None:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            raise
    return Client(
        channel=channel,
        broker=broker_pb2_grpc.BrokerStub(channel),
        admin=admin_pb2_grpc.AdminStub(channel),
    )
