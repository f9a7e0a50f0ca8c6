//! The other files a development or test broker runs with, beside its certificates: a policy
//! open to one admin and one agent identity ([`open_policy!`]), and a configuration listening on
//! loopback only ([`LoopbackConfig`]). `credbroker dev` (and so the benchmark) and the
//! integration tests' daemon write them through here, so they cannot drift apart. Nothing here
//! is read by the daemon library: it parses these files like any other.

use std::fmt::Write as _;
use std::path::Path;

/// A policy (a `&'static str`) in which the caller `$admin` administers every workspace and the
/// caller `$agent` may do every operation on every connector of every workspace, for any user.
/// A macro so that the policy is a constant the tests can paste into their own.
#[macro_export]
macro_rules! open_policy {
    ($admin:literal, $agent:literal) => {
        concat!(
            "[[callers]]\nid = \"",
            $admin,
            "\"\nadmin_workspaces = [\"*\"]\n\n[[callers]]\nid = \"",
            $agent,
            "\"\n[[callers.grants]]\nworkspace = \"*\"\nconnectors = [\"*\"]\n",
            "operations = [\"resolve\", \"send_email\", \"fetch_mail\", \"watch_mail\", ",
            "\"list_calendar\", \"create_event\", \"organize_mail\"]\nusers = [\"*\"]\n",
        )
    };
}

/// The `[egress]` section of a loopback configuration: its servers (the peers, a developer's
/// own) run on this machine, so loopback is allowed; other internal ranges stay refused.
pub const LOOPBACK_EGRESS: &str = "[egress]\nallow = [\"127.0.0.0/8\", \"::1/128\"]\n\n";

/// The configuration of a broker listening on 127.0.0.1 only: its store, its gRPC listener
/// (mTLS), its HTTP listener (OAuth callback, metrics), loopback egress ([`LOOPBACK_EGRESS`])
/// and its policy file. Paths are written as given: relative ones are read from the
/// configuration file's folder.
#[derive(Debug, Clone)]
pub struct LoopbackConfig<'a> {
    pub store: &'a Path,
    pub key_file: &'a Path,
    /// 0 for any free port (the daemon prints the one it bound).
    pub grpc_port: u16,
    pub server_cert: &'a Path,
    pub server_key: &'a Path,
    pub client_ca: &'a Path,
    /// Also the port of the public URL the OAuth redirect is built from, so not 0.
    pub http_port: u16,
    /// Origins a BeginConnect `return_url` may point at besides loopback ones.
    pub return_origins: &'a [&'a str],
    pub policy: &'a Path,
}

impl LoopbackConfig<'static> {
    /// Every file beside the configuration file, named as `credbroker dev` names them: `store`,
    /// `store.key`, `server.pem`, `server.key`, `ca.pem` and `policy.toml`; any gRPC port, no
    /// return origin but loopback.
    pub fn beside(http_port: u16) -> Self {
        LoopbackConfig {
            store: Path::new("store"),
            key_file: Path::new("store.key"),
            grpc_port: 0,
            server_cert: Path::new("server.pem"),
            server_key: Path::new("server.key"),
            client_ca: Path::new("ca.pem"),
            http_port,
            return_origins: &[],
            policy: Path::new("policy.toml"),
        }
    }
}

impl LoopbackConfig<'_> {
    /// The configuration file's text (TOML).
    pub fn toml(&self) -> String {
        let http_port = self.http_port;
        let mut text = format!(
            "[store]\npath = \"{}\"\nkey_file = \"{}\"\n\n",
            self.store.display(),
            self.key_file.display()
        );
        let _ = write!(
            text,
            "[grpc]\nlisten = \"127.0.0.1:{}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\n",
            self.grpc_port,
            self.server_cert.display(),
            self.server_key.display(),
            self.client_ca.display()
        );
        let _ = writeln!(
            text,
            "[http]\nlisten = \"127.0.0.1:{http_port}\"\npublic_url = \"https://127.0.0.1:{http_port}\""
        );
        if !self.return_origins.is_empty() {
            let _ = writeln!(text, "return_origins = {:?}", self.return_origins);
        }
        let _ = write!(
            text,
            "return_loopback = true\n\n{LOOPBACK_EGRESS}[policy]\nfile = \"{}\"\n",
            self.policy.display()
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_policy_names_both_callers() {
        let policy = open_policy!("spiffe://t/admin", "spiffe://t/agent");
        assert!(policy.contains("id = \"spiffe://t/admin\"\nadmin_workspaces = [\"*\"]"));
        assert!(policy.contains("id = \"spiffe://t/agent\"\n[[callers.grants]]"));
        assert!(policy.ends_with("users = [\"*\"]\n"), "{policy}");
    }

    #[test]
    fn return_origins_are_written_only_when_given() {
        let config = LoopbackConfig::beside(20_001);
        let text = config.toml();
        assert!(text.contains("listen = \"127.0.0.1:0\"\ncert = \"server.pem\""));
        assert!(text.contains("public_url = \"https://127.0.0.1:20001\"\nreturn_loopback"));
        assert!(text.contains(LOOPBACK_EGRESS), "{text}");
        let with = LoopbackConfig {
            return_origins: &["https://console.example"],
            ..config
        }
        .toml();
        assert!(with.contains("return_origins = [\"https://console.example\"]\n"));
    }
}
