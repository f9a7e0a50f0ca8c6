#!/usr/bin/env python3
"""An agent that uses Google Drive and Slack through credbroker without ever holding a token:
it lists the user's Drive files and posts their names to a Slack channel with Broker.Call, and
with --download FILE_ID streams that file's content with Broker.CallStream (however large: it
is never whole in memory), printing its size and SHA-256 (and writing it to --out if given).

    python examples/call.py --addr 127.0.0.1:7443 --ca certs/dev/ca.pem \
        --cert certs/dev/agent.pem --key certs/dev/agent.key --user u-42 --channel C123 \
        [--download FILE_ID [--out report.pdf]]

The policy must grant the agent `call` on both connectors, e.g.
    calls = ["GET /drive/v3/files*", "POST /chat.postMessage"]
"""

import argparse
import hashlib
import json
import sys

import grpc

import credbroker
from credbroker.v1 import broker_pb2, common_pb2


def call(cb, connector, user, method, path, query=(), body=None):
    """One Broker.Call; returns (status, parsed JSON body)."""
    request = broker_pb2.CallRequest(
        connection=common_pb2.ConnectionRef(connector=connector, user_id=user),
        method=method,
        path=path,
        query=[broker_pb2.QueryParam(name=n, value=v) for n, v in query],
    )
    if body is not None:
        request.headers.append(broker_pb2.HttpHeader(name="Content-Type", value="application/json"))
        request.body = json.dumps(body).encode()
    response = cb.broker.Call(request, timeout=30)
    return response.status, json.loads(response.body or b"null")


def download(cb, connector, user, file_id, out=None):
    """Streams a Drive file's content (Broker.CallStream); returns (status, size, hex SHA-256)."""
    request = broker_pb2.CallRequest(
        connection=common_pb2.ConnectionRef(connector=connector, user_id=user),
        method="GET",
        path=f"/drive/v3/files/{file_id}",
        query=[broker_pb2.QueryParam(name="alt", value="media")],
    )
    digest, size = hashlib.sha256(), 0
    with cb.call_stream(request, timeout=600) as answer:
        if answer.status != 200:
            return answer.status, 0, ""
        sink = open(out, "wb") if out else None
        try:
            for piece in answer:
                digest.update(piece)
                size += len(piece)
                if sink:
                    sink.write(piece)
        finally:
            if sink:
                sink.close()
    return 200, size, digest.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:7443")
    p.add_argument("--ca", default="certs/dev/ca.pem")
    p.add_argument("--cert", default="certs/dev/agent.pem")
    p.add_argument("--key", default="certs/dev/agent.key")
    p.add_argument("--drive", default="Drive", help="the Drive connector's name")
    p.add_argument("--slack", default="Slack", help="the Slack connector's name")
    p.add_argument("--user", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--download", metavar="FILE_ID", help="also stream this Drive file's content")
    p.add_argument("--out", help="where to write the downloaded file")
    args = p.parse_args()

    with credbroker.connect(args.addr, ca=args.ca, cert=args.cert, key=args.key) as cb:
        try:
            status, files = call(cb, args.drive, args.user, "GET", "/drive/v3/files",
                                 query=[("pageSize", "10"), ("fields", "files(id,name)")])
            if status != 200:
                print(f"Drive answered {status}: {files}", file=sys.stderr)
                return 1
            names = [f["name"] for f in files.get("files", [])]
            text = "Latest files: " + (", ".join(names) or "none")
            status, posted = call(cb, args.slack, args.user, "POST", "/chat.postMessage",
                                  body={"channel": args.channel, "text": text})
            if args.download:
                got, size, sha = download(cb, args.drive, args.user, args.download, args.out)
                if got != 200:
                    print(f"Drive answered {got} for {args.download}", file=sys.stderr)
                    return 1
                print(f"downloaded {size} bytes sha256={sha}")
        except grpc.RpcError as e:
            print(f"credbroker refused: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"listed {len(names)} files; Slack answered {status} ok={posted.get('ok')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
