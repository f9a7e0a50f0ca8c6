#!/usr/bin/env python3
"""An agent that uses Google Drive and Slack through credbroker without ever holding a token:
it lists the user's Drive files and posts their names to a Slack channel with Broker.Call.

    python examples/call.py --addr 127.0.0.1:7443 --ca certs/dev/ca.pem \
        --cert certs/dev/agent.pem --key certs/dev/agent.key --user u-42 --channel C123

The policy must grant the agent `call` on both connectors, e.g.
    calls = ["GET /drive/v3/files*", "POST /chat.postMessage"]
"""

import argparse
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
        except grpc.RpcError as e:
            print(f"credbroker refused: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"listed {len(names)} files; Slack answered {status} ok={posted.get('ok')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
