//! The policy file and its evaluation. Default deny: a caller absent from the file, or an
//! operation, workspace, connector or user no grant covers, is refused with a reason.
//!
//! ```toml
//! [[callers]]
//! id = "spiffe://example.org/console"
//! admin_workspaces = ["*"]            # admin API on these workspaces
//!
//! [[callers]]
//! id = "spiffe://example.org/agent-runtime"
//! [[callers.grants]]
//! workspace = "default"               # or "*"
//! connectors = ["HubSpot*", "Gmail"]  # name patterns (case-insensitive), or exact ids
//! operations = ["resolve", "send_email", "fetch_mail", "watch_mail", "list_calendar", "create_event"]
//! users = ["*"]                        # end users it may act for; [] = shared connectors only
//!
//! [[callers.grants]]                  # mail organisation: move, flag, delete (and labels)
//! workspace = "default"
//! connectors = ["Gmail"]
//! operations = ["organize_mail"]      # ListFolders needs only fetch_mail
//!
//! [[callers.grants]]                  # Broker.Call: which requests, by method and path
//! workspace = "default"
//! connectors = ["Drive"]
//! operations = ["call"]
//! calls = ["GET /drive/v3/files*", "* /about"]  # METHOD (or *) and a glob over the path
//! ```
//!
//! A `calls` pattern's path is a glob over the call's path relative to the API base, as the
//! caller sent it (already refused if it could climb out of the base): `*` crosses `/`, and
//! the match is case-sensitive. A grant with `call` must list `calls`; one without may not.
//!
//! A `connectors` entry is a glob over connector *names* only: `C*` never matches the id
//! `cn_…` of a connector whose name it does not match. An entry that is a connector id
//! (`cn_` followed by its hex digits, written exactly) grants that one connector, whatever
//! its name, when the request names it by that id; connector names cannot start with `cn_`,
//! so the two never overlap.
//!
//! Requests are authorised in two steps, so that a caller learns nothing of connectors it
//! holds no grant for: [`Policy::may_reach`] before the connector is looked up (what the
//! request itself names: workspace, connector reference, user), [`Policy::check`] after it,
//! on the connector the reference resolved to.

use std::collections::HashMap;
use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Resolve,
    SendEmail,
    FetchMail,
    WatchMail,
    ListCalendar,
    CreateEvent,
    Call,
    /// MoveMessages, SetFlags and DeleteMessages: changing a mailbox, which `fetch_mail`
    /// (reading it, and ListFolders) does not allow.
    OrganizeMail,
}

impl Operation {
    pub const ALL: [Operation; 8] = [
        Operation::Resolve,
        Operation::SendEmail,
        Operation::FetchMail,
        Operation::WatchMail,
        Operation::ListCalendar,
        Operation::CreateEvent,
        Operation::Call,
        Operation::OrganizeMail,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Resolve => "resolve",
            Operation::SendEmail => "send_email",
            Operation::FetchMail => "fetch_mail",
            Operation::WatchMail => "watch_mail",
            Operation::ListCalendar => "list_calendar",
            Operation::CreateEvent => "create_event",
            Operation::Call => "call",
            Operation::OrganizeMail => "organize_mail",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy file {path} is invalid: {why}")]
    Invalid { path: String, why: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    callers: Vec<CallerFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerFile {
    id: String,
    #[serde(default)]
    admin_workspaces: Vec<String>,
    #[serde(default)]
    grants: Vec<GrantFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    workspace: String,
    connectors: Vec<String>,
    operations: Vec<Operation>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    calls: Vec<String>,
}

/// One `calls` entry: `METHOD /path-glob`, the method `*` for any.
struct CallRule {
    method: Option<String>,
    path: GlobMatcher,
}

impl CallRule {
    fn parse(pattern: &str) -> Result<Self, String> {
        let (method, path) = pattern
            .trim()
            .split_once(' ')
            .ok_or("is not \"METHOD /path\" (e.g. \"GET /drive/v3/files*\")")?;
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.to_string()),
            _ => return Err("its method must be upper-case letters (GET) or *".into()),
        };
        let path = path.trim();
        if !path.starts_with('/') && !path.starts_with('*') {
            return Err("its path must start with / or *".into());
        }
        let glob = GlobBuilder::new(path)
            .literal_separator(false)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            method,
            path: glob.compile_matcher(),
        })
    }

    fn covers(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method) && self.path.is_match(path)
    }
}

/// One `connectors` entry: a glob over names, or one exact connector id.
enum ConnectorRule {
    Name(GlobMatcher),
    Id(String),
}

impl ConnectorRule {
    fn parse(pattern: &str) -> Result<Self, globset::Error> {
        if is_connector_id(pattern) {
            return Ok(Self::Id(pattern.to_string()));
        }
        let glob = GlobBuilder::new(pattern)
            .case_insensitive(true)
            .literal_separator(false)
            .build()?;
        Ok(Self::Name(glob.compile_matcher()))
    }

    /// Does this entry cover the connector (`name`, `id`)?
    fn covers(&self, name: &str, id: &str) -> bool {
        match self {
            Self::Name(glob) => glob.is_match(name),
            Self::Id(exact) => exact == id,
        }
    }

    /// Could this entry cover the connector a request names by `reference` (a name or an id),
    /// before it is looked up?
    fn may_cover(&self, reference: &str) -> bool {
        if is_connector_id(reference) {
            // Ids are random: naming one reveals nothing, and the check after the lookup
            // decides on the connector's name.
            return true;
        }
        matches!(self, Self::Name(glob) if glob.is_match(reference))
    }
}

/// Connector ids are `cn_` and hex digits; connector names may not start with `cn_`.
fn is_connector_id(value: &str) -> bool {
    value
        .strip_prefix("cn_")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

struct Grant {
    workspace: String,
    connectors: Vec<ConnectorRule>,
    operations: Vec<Operation>,
    users: Vec<String>,
    calls: Vec<CallRule>,
}

#[derive(Default)]
struct CallerRules {
    admin_workspaces: Vec<String>,
    grants: Vec<Grant>,
}

#[derive(Default)]
pub struct Policy {
    callers: HashMap<String, CallerRules>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("callers", &self.callers.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn matches(pattern: &str, value: &str) -> bool {
    pattern == "*" || pattern == value
}

/// A grant's `calls`: given exactly when it grants `call`.
fn call_rules(
    caller: &str,
    operations: &[Operation],
    calls: &[String],
) -> Result<Vec<CallRule>, String> {
    match (operations.contains(&Operation::Call), calls.is_empty()) {
        (true, true) => Err(format!(
            "caller {caller}: a grant of operation call must list calls = [\"METHOD /path\", …] (\"* /*\" for any request)"
        )),
        (false, false) => Err(format!(
            "caller {caller}: a grant lists calls but not operation call"
        )),
        _ => calls
            .iter()
            .map(|p| CallRule::parse(p).map_err(|e| format!("caller {caller}: call {p:?} {e}")))
            .collect(),
    }
}

impl Policy {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|why| PolicyError::Invalid { path: shown, why })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut callers = HashMap::new();
        for caller in file.callers {
            if caller.id.is_empty() {
                return Err("a caller has an empty id".into());
            }
            let mut grants = Vec::new();
            for grant in caller.grants {
                let connectors = grant
                    .connectors
                    .iter()
                    .map(|p| {
                        ConnectorRule::parse(p).map_err(|e| {
                            format!("caller {}: connector pattern {p:?}: {e}", caller.id)
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let calls = call_rules(&caller.id, &grant.operations, &grant.calls)?;
                grants.push(Grant {
                    workspace: grant.workspace,
                    connectors,
                    operations: grant.operations,
                    users: grant.users,
                    calls,
                });
            }
            let rules = CallerRules {
                admin_workspaces: caller.admin_workspaces,
                grants,
            };
            if callers.insert(caller.id.clone(), rules).is_some() {
                return Err(format!("caller {} is listed twice", caller.id));
            }
        }
        Ok(Self { callers })
    }

    /// May `caller` use the admin API on `workspace`?
    pub fn check_admin(&self, caller: &str, workspace: &str) -> Result<(), String> {
        let rules = self
            .callers
            .get(caller)
            .ok_or_else(|| format!("caller {caller} is not in the policy"))?;
        if rules.admin_workspaces.iter().any(|w| matches(w, workspace)) {
            Ok(())
        } else {
            Err(format!(
                "caller {caller} has no admin rights on workspace {workspace}"
            ))
        }
    }

    /// May `caller` do `op` on connector (`name`, `id`) of `workspace` for `user_id`?
    /// An empty `user_id` (a shared connection used on no one's behalf) needs no user grant.
    pub fn check(
        &self,
        caller: &str,
        op: Operation,
        workspace: &str,
        name: &str,
        id: &str,
        user_id: &str,
    ) -> Result<(), String> {
        self.granted(caller, op, workspace, name, user_id, |c| c.covers(name, id))
    }

    /// May `caller` send `method path` through Broker.Call to connector (`name`, `id`) of
    /// `workspace` for `user_id`? A grant of `call` covering the connector and user must
    /// also list a `calls` pattern covering the request.
    pub fn check_call(
        &self,
        caller: &str,
        workspace: &str,
        (name, id): (&str, &str),
        user_id: &str,
        method: &str,
        path: &str,
    ) -> Result<(), String> {
        let covered = |g: &Grant| {
            g.connectors.iter().any(|c| c.covers(name, id))
                && g.calls.iter().any(|c| c.covers(method, path))
        };
        if self.any_grant(caller, Operation::Call, workspace, user_id, covered)? {
            Ok(())
        } else {
            Err(format!(
                "caller {caller} is not granted call {method} {path} on connector {name:?} in workspace {workspace}"
            ))
        }
    }

    /// Whether a grant of `caller` for `op` on `workspace` and `user_id` satisfies `covers`.
    fn any_grant(
        &self,
        caller: &str,
        op: Operation,
        workspace: &str,
        user_id: &str,
        covers: impl Fn(&Grant) -> bool,
    ) -> Result<bool, String> {
        let rules = self
            .callers
            .get(caller)
            .ok_or_else(|| format!("caller {caller} is not in the policy"))?;
        Ok(rules.grants.iter().any(|g| {
            matches(&g.workspace, workspace)
                && g.operations.contains(&op)
                && (user_id.is_empty() || g.users.iter().any(|u| matches(u, user_id)))
                && covers(g)
        }))
    }

    /// Before any lookup: could a grant of `caller` cover `op` on the connector `reference`
    /// (a name or an id) of `workspace` for `user_id`? A refusal names only what the request
    /// sent, so it reads the same whether the connector exists or not.
    pub fn may_reach(
        &self,
        caller: &str,
        op: Operation,
        workspace: &str,
        reference: &str,
        user_id: &str,
    ) -> Result<(), String> {
        self.granted(caller, op, workspace, reference, user_id, |c| {
            c.may_cover(reference)
        })
    }

    /// Before the request is read: could any rule of `caller` admit it to `op` (or, for
    /// `None`, to the admin API) anywhere? A caller the policy does not know, or one holding
    /// no such grant, is refused on the headers alone.
    pub fn may_call(&self, caller: &str, op: Option<Operation>) -> Result<(), String> {
        let rules = self
            .callers
            .get(caller)
            .ok_or_else(|| format!("caller {caller} is not in the policy"))?;
        let may = match op {
            Some(op) => rules.grants.iter().any(|g| g.operations.contains(&op)),
            None => !rules.admin_workspaces.is_empty(),
        };
        if may {
            Ok(())
        } else if let Some(op) = op {
            Err(format!(
                "caller {caller} is not granted {} anywhere",
                op.name()
            ))
        } else {
            Err(format!(
                "caller {caller} has no admin rights on any workspace"
            ))
        }
    }

    fn granted(
        &self,
        caller: &str,
        op: Operation,
        workspace: &str,
        shown: &str,
        user_id: &str,
        covers: impl Fn(&ConnectorRule) -> bool,
    ) -> Result<(), String> {
        let granted = self.any_grant(caller, op, workspace, user_id, |g| {
            g.connectors.iter().any(&covers)
        })?;
        if granted {
            Ok(())
        } else {
            Err(format!(
                "caller {caller} is not granted {} on connector {shown:?} in workspace {workspace}{}",
                op.name(),
                if user_id.is_empty() {
                    String::new()
                } else {
                    " for this user".to_string()
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[callers]]
id = "console"
admin_workspaces = ["acme"]

[[callers]]
id = "agent"
[[callers.grants]]
workspace = "acme"
connectors = ["hubspot*"]
operations = ["resolve"]
users = ["u1"]
"#;

    #[test]
    fn default_deny_and_grants() {
        let p = Policy::parse(POLICY).unwrap();
        assert!(p.check_admin("console", "acme").is_ok());
        assert!(p.check_admin("console", "other").is_err());
        assert!(p.check_admin("agent", "acme").is_err());
        assert!(
            p.check_admin("stranger", "acme")
                .unwrap_err()
                .contains("not in the policy")
        );
        // (operation, workspace, connector, user, granted)
        let cases = [
            (Operation::Resolve, "acme", "HubSpot API", "u1", true),
            (Operation::Resolve, "acme", "HubSpot API", "", true),
            (Operation::Resolve, "acme", "HubSpot API", "u2", false),
            (Operation::Resolve, "other", "HubSpot API", "u1", false),
            (Operation::Resolve, "acme", "Slack", "u1", false),
            (Operation::SendEmail, "acme", "HubSpot API", "u1", false),
        ];
        for (op, workspace, name, user, granted) in cases {
            let decided = p.check("agent", op, workspace, name, "cn_1", user);
            assert_eq!(
                decided.is_ok(),
                granted,
                "{op:?} {workspace}/{name} for {user:?}: {decided:?}"
            );
        }
    }

    #[test]
    fn globs_match_names_only_and_ids_exactly() {
        let p = Policy::parse(
            "[[callers]]\nid = \"a\"\n[[callers.grants]]\nworkspace = \"w\"\n\
             connectors = [\"C*\", \"cn_00ff\"]\noperations = [\"resolve\"]",
        )
        .unwrap();
        let check = |name, id| p.check("a", Operation::Resolve, "w", name, id, "");
        assert!(check("CRM", "cn_1234").is_ok());
        assert!(
            check("Payroll", "cn_c0ffee").is_err(),
            "a glob matched an id"
        );
        assert!(
            check("Payroll", "cn_00ff").is_ok(),
            "an exact id is granted"
        );
        assert!(check("Payroll", "cn_00FF").is_err());
        let reach = |reference| p.may_reach("a", Operation::Resolve, "w", reference, "");
        assert!(reach("crm").is_ok());
        assert!(reach("cn_abc").is_ok(), "ids are decided after the lookup");
        assert!(reach("Payroll").is_err());
        assert!(
            p.may_reach("a", Operation::Resolve, "x", "cn_abc", "")
                .is_err()
        );
    }

    #[test]
    fn calls_are_granted_by_method_and_path() {
        let p = Policy::parse(
            "[[callers]]\nid = \"a\"\n[[callers.grants]]\nworkspace = \"w\"\n\
             connectors = [\"Drive\"]\noperations = [\"call\"]\nusers = [\"u1\"]\n\
             calls = [\"GET /drive/v3/files*\", \"* /about\"]",
        )
        .unwrap();
        let call =
            |user, method, path| p.check_call("a", "w", ("drive", "cn_1"), user, method, path);
        assert!(call("u1", "GET", "/drive/v3/files").is_ok());
        assert!(call("u1", "GET", "/drive/v3/files/abc/export").is_ok());
        assert!(call("u1", "DELETE", "/drive/v3/files/abc").is_err());
        assert!(
            call("u1", "GET", "/drive/v3/FILES").is_err(),
            "paths are case-sensitive"
        );
        assert!(call("u1", "POST", "/about").is_ok());
        assert!(call("u1", "GET", "/about/x").is_err());
        assert!(call("u2", "GET", "/about").is_err());
        assert!(
            p.check_call("a", "w", ("Slack", "cn_2"), "u1", "GET", "/about")
                .is_err()
        );
        assert!(
            p.check("a", Operation::Call, "w", "Drive", "cn_1", "u1")
                .is_ok()
        );
        let grant = |ops: &str, calls: &str| {
            Policy::parse(&format!(
                "[[callers]]\nid = \"a\"\n[[callers.grants]]\nworkspace = \"w\"\n\
                 connectors = [\"x\"]\noperations = [{ops}]\n{calls}"
            ))
        };
        assert!(
            grant("\"call\"", "")
                .unwrap_err()
                .contains("must list calls")
        );
        assert!(
            grant("\"resolve\"", "calls = [\"GET /x\"]")
                .unwrap_err()
                .contains("not operation call")
        );
        for bad in ["GET", "get /x", "GET x", "GET /[x"] {
            let err = grant("\"call\"", &format!("calls = [{bad:?}]")).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn reading_mail_does_not_grant_organising_it() {
        let p = Policy::parse(
            "[[callers]]\nid = \"reader\"\n[[callers.grants]]\nworkspace = \"w\"\n\
             connectors = [\"Mail\"]\noperations = [\"fetch_mail\"]\n\n\
             [[callers]]\nid = \"organizer\"\n[[callers.grants]]\nworkspace = \"w\"\n\
             connectors = [\"Mail\"]\noperations = [\"fetch_mail\", \"organize_mail\"]",
        )
        .unwrap();
        let check = |caller, op| p.check(caller, op, "w", "Mail", "cn_1", "");
        assert!(check("reader", Operation::FetchMail).is_ok());
        let refused = check("reader", Operation::OrganizeMail).unwrap_err();
        assert!(refused.contains("organize_mail"), "{refused}");
        assert!(p.may_call("reader", Some(Operation::OrganizeMail)).is_err());
        assert!(check("organizer", Operation::OrganizeMail).is_ok());
    }

    #[test]
    fn bad_files_say_why() {
        assert!(
            Policy::parse("[[callers]]\nid = \"a\"\nadmin = [\"x\"]")
                .unwrap_err()
                .contains("admin")
        );
        assert!(Policy::parse("[[callers]]\nid = \"a\"\n[[callers.grants]]\nworkspace=\"w\"\nconnectors=[\"x\"]\noperations=[\"fly\"]").unwrap_err().contains("fly"));
    }
}
