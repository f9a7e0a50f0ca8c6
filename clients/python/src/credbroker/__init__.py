"""credbroker client: gRPC stubs over mutual TLS.

    import credbroker
    from credbroker.v1 import common_pb2, broker_pb2

    with credbroker.connect("broker.internal:7443", ca="ca.pem", cert="agent.pem", key="agent.key") as cb:
        cred = cb.broker.ResolveCredential(broker_pb2.ResolveCredentialRequest(
            connection=common_pb2.ConnectionRef(connector="Slack", user_id="u-42")))

The CA is always given explicitly: the broker's certificate is checked against it, never against
the system trust store (nor SSL_CERT_FILE).

Large downloads through ``Broker.CallStream`` (the body in pieces, never whole in memory)::

    with cb.call_stream(broker_pb2.CallRequest(connection=..., method="GET",
                                               path="/drive/v3/files/FILE_ID",
                                               query=[broker_pb2.QueryParam(name="alt", value="media")])) as download:
        if download.status == 200:
            for piece in download:
                out.write(piece)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, Optional, Union

import grpc

from .v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc

__all__ = ["CallStream", "Client", "connect", "verify_webhook", "WebhookSignatureError"]

#: The replay window a webhook receiver applies: a signature more than this many seconds from
#: the receiver's clock is refused.
REPLAY_WINDOW_SECONDS = 300

PathLike = Union[str, "os.PathLike[str]"]


def _selection(mailbox: str, uid_validity: int, uids):
    return broker_pb2.MailSelection(mailbox=mailbox, uid_validity=uid_validity, uids=list(uids))


def _read(path: PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {os.fspath(path)!r}: {e.strerror}") from None


@dataclass
class CallStream:
    """An answer of ``Broker.CallStream``: ``status`` and ``headers`` (lower-case names) as the API
    sent them; iterating gives the body's pieces (``bytes``, at most 64 KiB each). An error while
    streaming (the broker's cap ``max_call_stream_bytes`` reached, the API gone) raises
    ``grpc.RpcError``. ``close()`` (or leaving the ``with`` block) hangs up; the broker records how
    much was handed on."""

    status: int
    headers: Dict[str, str]
    _messages: Any = field(repr=False)

    def __iter__(self) -> Iterator[bytes]:
        for message in self._messages:
            if message.data:
                yield message.data

    def close(self) -> None:
        self._messages.cancel()

    def __enter__(self) -> "CallStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Client:
    """An open mTLS channel and the two services on it. Close it, or use it as a context manager."""

    channel: grpc.Channel
    broker: broker_pb2_grpc.BrokerStub
    admin: admin_pb2_grpc.AdminStub

    def close(self) -> None:
        self.channel.close()

    def watch_events(
        self,
        after_cursor: int = 0,
        kinds: Iterable[str] = (),
        workspace: str = "",
        backlog_only: bool = False,
    ) -> Iterator["admin_pb2.LifecycleEvent"]:
        """Lifecycle events after ``after_cursor`` (0: every one the broker keeps), then each new
        one as it happens (unless ``backlog_only``). Keep the last ``cursor`` seen and pass it
        back to resume; an event's ``id`` is the same in the webhook delivering it."""
        request = admin_pb2.WatchEventsRequest(
            after_cursor=after_cursor,
            kinds=list(kinds),
            workspace=workspace,
            backlog_only=backlog_only,
        )
        yield from self.admin.WatchEvents(request)

    def call_stream(self, request, *, timeout: Optional[float] = None) -> CallStream:
        """Starts ``Broker.CallStream`` with ``request`` (a ``broker_pb2.CallRequest``) and waits for
        the API's status and headers; a refusal (policy, path, credential) raises ``grpc.RpcError``
        before anything is read. ``timeout`` bounds the whole download."""
        messages = self.broker.CallStream(request, timeout=timeout)
        head = next(messages, None)
        if head is None:
            messages.cancel()
            raise RuntimeError("Broker.CallStream ended without its status message")
        return CallStream(
            status=head.status,
            headers={h.name.lower(): h.value for h in head.headers},
            _messages=messages,
        )

    # Mail organisation: each names the messages by UID in one mailbox, with the UIDVALIDITY
    # they were read under (FetchMail's ``uid_validity``); a stale one changes nothing.

    def list_folders(self, connection, *, timeout: Optional[float] = 30.0):
        """``Broker.ListFolders``: the account's folders, its Trash folder, whether it has labels."""
        return self.broker.ListFolders(broker_pb2.ListFoldersRequest(connection=connection), timeout=timeout)

    def move_messages(self, connection, mailbox: str, uid_validity: int, uids, destination: str,
                      *, timeout: Optional[float] = 60.0):
        """``Broker.MoveMessages`` of ``uids`` from ``mailbox`` to ``destination``."""
        return self.broker.MoveMessages(broker_pb2.MoveMessagesRequest(
            connection=connection, selection=_selection(mailbox, uid_validity, uids),
            destination=destination), timeout=timeout)

    def set_flags(self, connection, mailbox: str, uid_validity: int, uids, *, add=(), remove=(),
                  add_labels=(), remove_labels=(), timeout: Optional[float] = 60.0):
        """``Broker.SetFlags``: ``add``/``remove`` are ``broker_pb2.SEEN``, ``FLAGGED``,
        ``ANSWERED``, ``DELETED``; labels only where the server has them (Gmail)."""
        return self.broker.SetFlags(broker_pb2.SetFlagsRequest(
            connection=connection, selection=_selection(mailbox, uid_validity, uids),
            add=list(add), remove=list(remove), add_labels=list(add_labels),
            remove_labels=list(remove_labels)), timeout=timeout)

    def delete_messages(self, connection, mailbox: str, uid_validity: int, uids, *,
                        expunge: bool = False, timeout: Optional[float] = 60.0):
        """``Broker.DeleteMessages``: to the Trash folder, or with ``expunge`` for good."""
        return self.broker.DeleteMessages(broker_pb2.DeleteMessagesRequest(
            connection=connection, selection=_selection(mailbox, uid_validity, uids),
            expunge=expunge), timeout=timeout)

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


class WebhookSignatureError(ValueError):
    """A webhook delivery whose ``credbroker-signature`` does not check out."""


def verify_webhook(
    secret: Union[str, bytes],
    signature_header: str,
    body: bytes,
    *,
    now: Optional[float] = None,
    window_seconds: int = REPLAY_WINDOW_SECONDS,
) -> None:
    """Checks a webhook delivery: ``signature_header`` is its ``credbroker-signature``
    (``t=<unix seconds>,v1=<hex>``), ``body`` the raw request body. ``v1`` must be
    HMAC-SHA256 under ``secret`` of ``"<t>.<body>"``, and ``t`` within ``window_seconds`` of
    now. Raises :class:`WebhookSignatureError` otherwise. Then drop any event ``id``
    (``credbroker-event-id``) already handled: deliveries are at least once."""
    key = secret.encode() if isinstance(secret, str) else secret
    parts = dict(p.strip().split("=", 1) for p in signature_header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
        given = bytes.fromhex(parts["v1"])
    except (KeyError, ValueError):
        raise WebhookSignatureError("the signature header is not t=<seconds>,v1=<hex>") from None
    age = (time.time() if now is None else now) - t
    if abs(age) > window_seconds:
        raise WebhookSignatureError(f"the signature is {int(age)}s old, outside the replay window")
    want = hmac.new(key, str(t).encode() + b"." + body, hashlib.sha256).digest()
    if not hmac.compare_digest(want, given):
        raise WebhookSignatureError("the signature does not match the body")
