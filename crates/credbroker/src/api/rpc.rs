//! The table of RPCs: for each method of the Broker and Admin services, its gRPC path, what
//! the caller needs to call it (a policy operation or admin rights) and the labels its audit
//! records and metrics carry.
//!
//! Invariants: every method of the two services has exactly one row, and every
//! [`Operation`] is reached by exactly one data-plane RPC (both checked against the compiled
//! descriptors in the tests below). The labels are stable: audit queries filter on them and
//! dashboards group by them, so a row's labels never change once released.

use crate::policy::Operation;

/// What a caller needs to be let into an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A policy grant for this operation on the connection's connector and user.
    Grant(Operation),
    /// Admin rights on the workspace the request names.
    Admin,
}

/// One row of the table.
struct Row {
    /// `/package.Service/Method`, as the client sends it.
    path: &'static str,
    /// The method alone: the audit and metric label.
    method: &'static str,
    access: Access,
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
/// grant admits to (the others need admin rights).
macro_rules! rpcs {
    ($($rpc:ident: $service:ident $(($op:ident))?,)*) => {
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
                    },)*
                }
            }
        }
    };
}

rpcs! {
    ResolveCredential: Broker(Resolve),
    SendEmail: Broker(SendEmail),
    FetchMail: Broker(FetchMail),
    WatchMail: Broker(WatchMail),
    ListCalendar: Broker(ListCalendar),
    CreateEvent: Broker(CreateEvent),
    Call: Broker(Call),
    CreateConnector: Admin,
    GetConnector: Admin,
    ListConnectors: Admin,
    UpdateConnector: Admin,
    RenameConnector: Admin,
    DeleteConnector: Admin,
    BeginConnect: Admin,
    CompleteConnect: Admin,
    ConnectWithCredentials: Admin,
    TestConnection: Admin,
    Disconnect: Admin,
    GetConnection: Admin,
    ListConnections: Admin,
    QueryAudit: Admin,
    GetAuditHead: Admin,
    Backup: Admin,
    RotateKey: Admin,
    GetStatus: Admin,
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
    fn every_operation_is_reached_by_exactly_one_rpc() {
        for op in Operation::ALL {
            let rpcs: Vec<Rpc> = Rpc::ALL
                .iter()
                .copied()
                .filter(|r| r.access() == Access::Grant(op))
                .collect();
            assert_eq!(rpcs.len(), 1, "{op:?} is reached by {rpcs:?}");
            assert!(rpcs[0].grpc_path().starts_with("/credbroker.v1.Broker/"));
        }
    }
}
