//! The table of RPCs: for each method of the Broker and Admin services, its gRPC path, what
//! the caller needs to call it (a policy operation or admin rights), the largest request it
//! accepts, whether it acts on the world (and so writes an intent record before it does), and
//! the labels its audit records and metrics carry.
//!
//! Invariants: every method of the two services has exactly one row, and every
//! [`Operation`] is reached by exactly one data-plane RPC, except `call` (Call and its
//! streaming form CallStream), `fetch_mail` (FetchMail and ListFolders: reading) and
//! `organize_mail` (MoveMessages, SetFlags, DeleteMessages) (both checked against the compiled
//! descriptors in the tests below). Only the RPCs that carry attachments accept the
//! configured large size; every other one is refused past a small fixed bound. The labels are
//! stable: audit queries filter on them and dashboards group by them, so a row's labels never
//! change once released.

use crate::policy::Operation;

/// What a caller needs to be let into an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A policy grant for this operation on the connection's connector and user.
    Grant(Operation),
    /// Admin rights on the workspace the request names.
    Admin,
}

/// How large a request an RPC accepts: the bound is checked on the message's length prefix,
/// before its body is read (see [`super::gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A connection reference, a query or a name: [`SMALL_REQUEST_BYTES`].
    Small,
    /// Connector settings, secrets and certificates: [`SETTINGS_REQUEST_BYTES`].
    Settings,
    /// A message or event with attachments, or a Broker.Call body: `[limits] max_request_bytes`
    /// (a Call body is bounded again by `max_call_request_bytes`).
    Attachments,
}

/// The largest request of a [`Size::Small`] RPC.
pub const SMALL_REQUEST_BYTES: usize = 64 * 1024;
/// The largest request of a [`Size::Settings`] RPC.
pub const SETTINGS_REQUEST_BYTES: usize = 1024 * 1024;

/// Whether an RPC changes something outside the broker's own records (a message sent, an
/// event created, a secret stored or revoked). Those write a durable intent record before
/// they act, and do not act if it cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Reads,
    Acts,
}

/// One row of the table.
struct Row {
    /// `/package.Service/Method`, as the client sends it.
    path: &'static str,
    /// The method alone: the audit and metric label.
    method: &'static str,
    access: Access,
    size: Size,
    effect: Effect,
}

macro_rules! effect {
    () => {
        Effect::Reads
    };
    (acts) => {
        Effect::Acts
    };
}

macro_rules! access {
    () => {
        Access::Admin
    };
    ($op:ident) => {
        Access::Grant(Operation::$op)
    };
}

/// The table: `Method: Service`, with the policy operation in parentheses for the RPCs a
/// grant admits to (the others need admin rights), then the request [`Size`] and `acts` for
/// the RPCs with an [`Effect`] on the world.
macro_rules! rpcs {
    ($($rpc:ident: $service:ident $(($op:ident))?, $size:ident $(, $acts:ident)?;)*) => {
        /// One RPC of the Broker or Admin service.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Rpc {
            $($rpc,)*
        }

        impl Rpc {
            pub const ALL: &[Rpc] = &[$(Rpc::$rpc,)*];

            const fn row(self) -> Row {
                match self {
                    $(Rpc::$rpc => Row {
                        path: concat!("/credbroker.v1.", stringify!($service), "/", stringify!($rpc)),
                        method: stringify!($rpc),
                        access: access!($($op)?),
                        size: Size::$size,
                        effect: effect!($($acts)?),
                    },)*
                }
            }
        }
    };
}

rpcs! {
    ResolveCredential: Broker(Resolve), Small;
    SendEmail: Broker(SendEmail), Attachments, acts;
    FetchMail: Broker(FetchMail), Small;
    WatchMail: Broker(WatchMail), Small;
    ListCalendar: Broker(ListCalendar), Small;
    CreateEvent: Broker(CreateEvent), Attachments, acts;
    Call: Broker(Call), Attachments, acts;
    CallStream: Broker(Call), Attachments, acts;
    ListFolders: Broker(FetchMail), Small;
    MoveMessages: Broker(OrganizeMail), Small, acts;
    SetFlags: Broker(OrganizeMail), Small, acts;
    DeleteMessages: Broker(OrganizeMail), Small, acts;
    CreateConnector: Admin, Settings;
    GetConnector: Admin, Small;
    ListConnectors: Admin, Small;
    UpdateConnector: Admin, Settings;
    RenameConnector: Admin, Small;
    DeleteConnector: Admin, Small;
    BeginConnect: Admin, Small;
    CompleteConnect: Admin, Small;
    ConnectWithCredentials: Admin, Settings, acts;
    TestConnection: Admin, Settings;
    Disconnect: Admin, Small, acts;
    GetConnection: Admin, Small;
    ListConnections: Admin, Small;
    QueryAudit: Admin, Small;
    GetAuditHead: Admin, Small;
    Backup: Admin, Small;
    RotateKey: Admin, Small;
    GetStatus: Admin, Small;
    WatchEvents: Admin, Small;
}

impl Rpc {
    /// The full gRPC path, `/credbroker.v1.Service/Method`.
    pub fn grpc_path(self) -> &'static str {
        self.row().path
    }

    /// The gRPC method name alone (`ResolveCredential`).
    pub fn method(self) -> &'static str {
        self.row().method
    }

    /// What the caller needs to be let in.
    pub fn access(self) -> Access {
        self.row().access
    }

    /// The row whose path is `path`, if the Broker or Admin service serves it.
    pub fn from_path(path: &str) -> Option<Rpc> {
        Rpc::ALL.iter().copied().find(|r| r.grpc_path() == path)
    }

    /// The largest request this RPC accepts, in bytes (the gRPC message, without its 5-byte
    /// prefix), given the configured size for attachments; never above it.
    pub fn max_request_bytes(self, attachments: usize) -> usize {
        match self.row().size {
            Size::Small => SMALL_REQUEST_BYTES.min(attachments),
            Size::Settings => SETTINGS_REQUEST_BYTES.min(attachments),
            Size::Attachments => attachments,
        }
    }

    /// Whether the RPC acts on the world (and so writes an intent record first).
    pub fn effect(self) -> Effect {
        self.row().effect
    }

    /// The `operation` of this RPC's audit records: the method name.
    pub fn audit_label(self) -> &'static str {
        self.method()
    }

    /// The `method` label of this RPC's metrics: the method name.
    pub fn metric_label(self) -> &'static str {
        self.method()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message as _;

    use super::*;

    fn served_paths() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(super::super::proto::FILE_DESCRIPTOR_SET)
            .unwrap();
        let mut paths = BTreeSet::new();
        for file in &set.file {
            for service in &file.service {
                let name = service.name();
                if name != "Broker" && name != "Admin" {
                    continue;
                }
                for method in &service.method {
                    paths.insert(format!("/{}.{name}/{}", file.package(), method.name()));
                }
            }
        }
        paths
    }

    #[test]
    fn every_served_method_has_exactly_one_row() {
        let table: Vec<String> = Rpc::ALL.iter().map(|r| r.grpc_path().to_string()).collect();
        let unique: BTreeSet<String> = table.iter().cloned().collect();
        assert_eq!(unique.len(), table.len(), "a path appears twice: {table:?}");
        assert_eq!(unique, served_paths());
        for &rpc in Rpc::ALL {
            assert!(rpc.grpc_path().ends_with(&format!("/{:?}", rpc)), "{rpc:?}");
            assert_eq!(rpc.audit_label(), format!("{rpc:?}"));
            assert_eq!(rpc.metric_label(), format!("{rpc:?}"));
        }
    }

    #[test]
    fn only_attachments_get_the_large_size_and_paths_find_their_rows() {
        let large = 32 * 1024 * 1024;
        let big: Vec<Rpc> = Rpc::ALL
            .iter()
            .copied()
            .filter(|r| r.max_request_bytes(large) > SETTINGS_REQUEST_BYTES)
            .collect();
        assert_eq!(
            big,
            [Rpc::SendEmail, Rpc::CreateEvent, Rpc::Call, Rpc::CallStream]
        );
        assert_eq!(Rpc::ResolveCredential.max_request_bytes(large), 64 * 1024);
        // A configured size below the fixed bounds lowers them too.
        for &rpc in Rpc::ALL {
            assert!(rpc.max_request_bytes(1000) <= 1000, "{rpc:?}");
            assert_eq!(Rpc::from_path(rpc.grpc_path()), Some(rpc));
        }
        assert_eq!(Rpc::from_path("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn the_side_effects_of_the_issue_are_the_acting_rpcs() {
        let acting: Vec<Rpc> = Rpc::ALL
            .iter()
            .copied()
            .filter(|r| r.effect() == Effect::Acts)
            .collect();
        assert_eq!(
            acting,
            [
                Rpc::SendEmail,
                Rpc::CreateEvent,
                Rpc::Call,
                Rpc::CallStream,
                Rpc::MoveMessages,
                Rpc::SetFlags,
                Rpc::DeleteMessages,
                Rpc::ConnectWithCredentials,
                Rpc::Disconnect
            ]
        );
    }

    #[test]
    fn every_operation_is_reached_by_exactly_one_rpc_but_reading_and_organising_mail() {
        for op in Operation::ALL {
            let rpcs: Vec<Rpc> = Rpc::ALL
                .iter()
                .copied()
                .filter(|r| r.access() == Access::Grant(op))
                .collect();
            match op {
                // Call's streaming form is the same operation, granted by the same `calls`.
                Operation::Call => assert_eq!(rpcs, [Rpc::Call, Rpc::CallStream]),
                Operation::FetchMail => assert_eq!(rpcs, [Rpc::FetchMail, Rpc::ListFolders]),
                Operation::OrganizeMail => assert_eq!(
                    rpcs,
                    [Rpc::MoveMessages, Rpc::SetFlags, Rpc::DeleteMessages]
                ),
                _ => assert_eq!(rpcs.len(), 1, "{op:?} is reached by {rpcs:?}"),
            }
            for rpc in rpcs {
                assert!(rpc.grpc_path().starts_with("/credbroker.v1.Broker/"));
            }
        }
    }
}
