#!/usr/bin/env python3
"""An agent's view of credbroker: fetch a credential for a user and call an API with it.

    python examples/agent.py --addr 127.0.0.1:7443 --ca certs/dev/ca.pem \
        --cert certs/dev/agent.pem --key certs/dev/agent.key --connector Weather [--user u-42]

Prints what it got, never the secret itself.
"""

import argparse
import sys

import grpc

import credbroker
from credbroker.v1 import broker_pb2, common_pb2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1:7443")
    p.add_argument("--ca", default="certs/dev/ca.pem")
    p.add_argument("--cert", default="certs/dev/agent.pem")
    p.add_argument("--key", default="certs/dev/agent.key")
    p.add_argument("--workspace", default="")
    p.add_argument("--connector", required=True)
    p.add_argument("--user", default="")
    args = p.parse_args()

    with credbroker.connect(args.addr, ca=args.ca, cert=args.cert, key=args.key) as cb:
        try:
            cred = cb.broker.ResolveCredential(
                broker_pb2.ResolveCredentialRequest(
                    connection=common_pb2.ConnectionRef(
                        workspace=args.workspace, connector=args.connector, user_id=args.user
                    )
                ),
                timeout=30,
            )
        except grpc.RpcError as e:
            print(f"credbroker refused: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    kind = common_pb2.ConnectorKind.Name(cred.kind)
    header = f"{cred.header_name}: {cred.header_prefix}<secret>" if cred.header_name else "(no header)"
    print(f"got credential kind={kind} length={len(cred.secret)}; send it as {header}")
    # Here the agent would call the API, e.g. requests.get(url, headers={cred.header_name: ...}).
    return 0


if __name__ == "__main__":
    sys.exit(main())
