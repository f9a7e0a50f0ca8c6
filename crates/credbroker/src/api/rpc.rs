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

/// One RPC of the Broker or Admin service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    ResolveCredential,
    SendEmail,
    FetchMail,
    WatchMail,
    ListCalendar,
    CreateEvent,
    CreateConnector,
    GetConnector,
    ListConnectors,
    UpdateConnector,
    RenameConnector,
    DeleteConnector,
    BeginConnect,
    CompleteConnect,
    ConnectWithCredentials,
    TestConnection,
    Disconnect,
    GetConnection,
    ListConnections,
    QueryAudit,
    GetAuditHead,
    Backup,
    RotateKey,
    GetStatus,
}

/// One row of the table.
struct Row {
    /// `/package.Service/Method`, as the client sends it.
    path: &'static str,
    access: Access,
}

const fn broker(path: &'static str, op: Operation) -> Row {
    Row {
        path,
        access: Access::Grant(op),
    }
}

const fn admin(path: &'static str) -> Row {
    Row {
        path,
        access: Access::Admin,
    }
}

impl Rpc {
    pub const ALL: [Rpc; 24] = {
        use Rpc::*;
        [
            ResolveCredential,
            SendEmail,
            FetchMail,
            WatchMail,
            ListCalendar,
            CreateEvent,
            CreateConnector,
            GetConnector,
            ListConnectors,
            UpdateConnector,
            RenameConnector,
            DeleteConnector,
            BeginConnect,
            CompleteConnect,
            ConnectWithCredentials,
            TestConnection,
            Disconnect,
            GetConnection,
            ListConnections,
            QueryAudit,
            GetAuditHead,
            Backup,
            RotateKey,
            GetStatus,
        ]
    };

    const fn row(self) -> Row {
        use Operation as Op;
        match self {
            Rpc::ResolveCredential => {
                broker("/credbroker.v1.Broker/ResolveCredential", Op::Resolve)
            }
            Rpc::SendEmail => broker("/credbroker.v1.Broker/SendEmail", Op::SendEmail),
            Rpc::FetchMail => broker("/credbroker.v1.Broker/FetchMail", Op::FetchMail),
            Rpc::WatchMail => broker("/credbroker.v1.Broker/WatchMail", Op::WatchMail),
            Rpc::ListCalendar => broker("/credbroker.v1.Broker/ListCalendar", Op::ListCalendar),
            Rpc::CreateEvent => broker("/credbroker.v1.Broker/CreateEvent", Op::CreateEvent),
            Rpc::CreateConnector => admin("/credbroker.v1.Admin/CreateConnector"),
            Rpc::GetConnector => admin("/credbroker.v1.Admin/GetConnector"),
            Rpc::ListConnectors => admin("/credbroker.v1.Admin/ListConnectors"),
            Rpc::UpdateConnector => admin("/credbroker.v1.Admin/UpdateConnector"),
            Rpc::RenameConnector => admin("/credbroker.v1.Admin/RenameConnector"),
            Rpc::DeleteConnector => admin("/credbroker.v1.Admin/DeleteConnector"),
            Rpc::BeginConnect => admin("/credbroker.v1.Admin/BeginConnect"),
            Rpc::CompleteConnect => admin("/credbroker.v1.Admin/CompleteConnect"),
            Rpc::ConnectWithCredentials => admin("/credbroker.v1.Admin/ConnectWithCredentials"),
            Rpc::TestConnection => admin("/credbroker.v1.Admin/TestConnection"),
            Rpc::Disconnect => admin("/credbroker.v1.Admin/Disconnect"),
            Rpc::GetConnection => admin("/credbroker.v1.Admin/GetConnection"),
            Rpc::ListConnections => admin("/credbroker.v1.Admin/ListConnections"),
            Rpc::QueryAudit => admin("/credbroker.v1.Admin/QueryAudit"),
            Rpc::GetAuditHead => admin("/credbroker.v1.Admin/GetAuditHead"),
            Rpc::Backup => admin("/credbroker.v1.Admin/Backup"),
            Rpc::RotateKey => admin("/credbroker.v1.Admin/RotateKey"),
            Rpc::GetStatus => admin("/credbroker.v1.Admin/GetStatus"),
        }
    }

    /// The full gRPC path, `/credbroker.v1.Service/Method`.
    pub fn grpc_path(self) -> &'static str {
        self.row().path
    }

    /// The gRPC method name alone (`ResolveCredential`).
    pub fn method(self) -> &'static str {
        let path = self.grpc_path();
        path.rfind('/').map_or(path, |i| &path[i + 1..])
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
        for rpc in Rpc::ALL {
            assert!(rpc.grpc_path().ends_with(&format!("/{:?}", rpc)), "{rpc:?}");
            assert_eq!(rpc.audit_label(), format!("{rpc:?}"));
            assert_eq!(rpc.metric_label(), format!("{rpc:?}"));
        }
    }

    #[test]
    fn every_operation_is_reached_by_exactly_one_rpc() {
        for op in Operation::ALL {
            let rpcs: Vec<Rpc> = Rpc::ALL
                .into_iter()
                .filter(|r| r.access() == Access::Grant(op))
                .collect();
            assert_eq!(rpcs.len(), 1, "{op:?} is reached by {rpcs:?}");
            assert!(rpcs[0].grpc_path().starts_with("/credbroker.v1.Broker/"));
        }
    }
}
