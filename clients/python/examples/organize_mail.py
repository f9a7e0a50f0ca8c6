#!/usr/bin/env python3
"""An agent tidying a mailbox through credbroker: it never holds the mail password or token.

    python examples/organize_mail.py --addr 127.0.0.1:7443 --ca certs/dev/ca.pem \
        --cert certs/dev/agent.pem --key certs/dev/agent.key --connector Mail \
        --mailbox INBOX --subject-contains invoice --move-to Receipts

Lists the account's folders, reads the mailbox (FetchMail), marks the messages whose subject
contains the text as read and flagged (SetFlags), then moves them (MoveMessages), each by UID
with the mailbox's UIDVALIDITY. The caller needs `fetch_mail` and `organize_mail` grants.
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
    p.add_argument("--mailbox", default="INBOX")
    p.add_argument("--subject-contains", required=True)
    p.add_argument("--move-to", required=True)
    args = p.parse_args()
    connection = common_pb2.ConnectionRef(
        workspace=args.workspace, connector=args.connector, user_id=args.user
    )

    with credbroker.connect(args.addr, ca=args.ca, cert=args.cert, key=args.key) as cb:
        broker = cb.broker
        try:
            folders = cb.list_folders(connection)
            names = [f.name for f in folders.folders]
            print(f"folders: {len(names)}; trash: {folders.trash}; labels: {folders.labels}")
            if args.move_to not in names:
                print(f"no folder {args.move_to!r} on the account", file=sys.stderr)
                return 1
            fetched = broker.FetchMail(
                broker_pb2.FetchMailRequest(connection=connection, mailbox=args.mailbox, limit=200),
                timeout=60,
            )
            uids = [m.uid for m in fetched.messages if args.subject_contains in m.subject]
            if not uids:
                print("nothing to organise")
                return 0
            mailbox, validity = args.mailbox, fetched.uid_validity
            flagged = cb.set_flags(
                connection, mailbox, validity, uids, add=[broker_pb2.SEEN, broker_pb2.FLAGGED]
            )
            moved = cb.move_messages(connection, mailbox, validity, uids, args.move_to)
        except grpc.RpcError as e:
            print(f"credbroker refused: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"flagged: {list(flagged.uids)}")
    print(f"moved: {list(moved.uids)} to {moved.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
