//! Mail organisation on a user's behalf: ListFolders, and MoveMessages, SetFlags and
//! DeleteMessages by UID in one mailbox, over the IMAP session of [`super::imap`] (the same
//! login, TLS, meter and deadline as FetchMail).
//!
//! Invariants:
//! - a request names 1 to [`MAX_UIDS`] UIDs of one mailbox and the UIDVALIDITY they were read
//!   under; the mailbox is SELECTed and its UIDVALIDITY compared before any command that
//!   changes anything, so a stale one changes nothing ([`MailError::StaleUidValidity`]);
//! - every server extension a request needs (MOVE or UIDPLUS, X-GM-EXT-1 for labels) is
//!   checked before its first change ([`MailError::Unsupported`]);
//! - messages are only ever expunged by UID EXPUNGE of the request's own UIDs, never by a
//!   plain EXPUNGE, which would also remove other messages someone marked deleted;
//! - commands only ever carry validated mailbox names (quoted by async-imap), the flags of
//!   [`Flag`] and labels quoted here ([`label`]): nothing a caller sends is sent raw.

use std::fmt;
use std::time::Duration;

use async_imap::imap_proto::rfc4315::UidSetMember;
use async_imap::imap_proto::{Response, ResponseCode, Status};
use async_imap::types::NameAttribute;
use futures::TryStreamExt;

use super::imap::{Caps, Session, mailbox_name};
use super::{Account, Mail, MailError, Service, bounded};
use crate::model::{FieldError, Target};

/// The most UIDs one request may name.
pub const MAX_UIDS: usize = 1000;
/// The most labels one request may add or remove, each.
pub const MAX_LABELS: usize = 50;
/// The folder DeleteMessages moves to when the server marks none \Trash and the connection
/// sets no `trash_mailbox`.
pub const CONVENTIONAL_TRASH: &str = "Trash";

/// A system flag a caller may set or clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flag {
    Seen,
    Flagged,
    Answered,
    Deleted,
}

impl Flag {
    fn imap(self) -> &'static str {
        match self {
            Flag::Seen => "\\Seen",
            Flag::Flagged => "\\Flagged",
            Flag::Answered => "\\Answered",
            Flag::Deleted => "\\Deleted",
        }
    }
}

/// The messages a request acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Empty means INBOX.
    pub mailbox: String,
    pub uid_validity: u32,
    pub uids: Vec<u32>,
}

impl Selection {
    /// Checks the selection; the UIDs come out ascending, without duplicates.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        self.mailbox = mailbox_name("selection.mailbox", &self.mailbox)?;
        if self.uid_validity == 0 {
            return Err(FieldError::new(
                "selection.uid_validity",
                "is required: the mailbox's UIDVALIDITY the UIDs were read under (FetchMail's uid_validity)",
            ));
        }
        match self.uids.len() {
            0 => {
                return Err(FieldError::new(
                    "selection.uids",
                    format!("is empty; name 1 to {MAX_UIDS} UIDs"),
                ));
            }
            n if n > MAX_UIDS => {
                return Err(FieldError::new(
                    "selection.uids",
                    format!("has {n} UIDs; at most {MAX_UIDS} a request"),
                ));
            }
            _ => {}
        }
        if self.uids.contains(&0) {
            return Err(FieldError::new(
                "selection.uids",
                "contains 0; UIDs start at 1",
            ));
        }
        self.uids.sort_unstable();
        self.uids.dedup();
        Ok(())
    }
}

/// Flags and labels to add and remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagChange {
    pub add: Vec<Flag>,
    pub remove: Vec<Flag>,
    pub add_labels: Vec<String>,
    pub remove_labels: Vec<String>,
}

impl FlagChange {
    fn validate(&mut self) -> Result<(), FieldError> {
        for list in [&mut self.add, &mut self.remove] {
            list.sort_unstable();
            list.dedup();
        }
        if let Some(both) = self.add.iter().find(|f| self.remove.contains(f)) {
            return Err(FieldError::new(
                "remove",
                format!("{} is both added and removed", both.imap()),
            ));
        }
        check_labels("add_labels", &self.add_labels)?;
        check_labels("remove_labels", &self.remove_labels)?;
        if self.add.is_empty() && self.remove.is_empty() && !self.labels() {
            return Err(FieldError::new(
                "add",
                "nothing to change: name flags (or labels) to add or remove",
            ));
        }
        Ok(())
    }

    fn labels(&self) -> bool {
        !self.add_labels.is_empty() || !self.remove_labels.is_empty()
    }
}

fn check_labels(field: &str, labels: &[String]) -> Result<(), FieldError> {
    if labels.len() > MAX_LABELS {
        return Err(FieldError::new(
            field,
            format!("has {} labels; at most {MAX_LABELS}", labels.len()),
        ));
    }
    for (i, l) in labels.iter().enumerate() {
        if l.is_empty() || l.len() > 255 || !l.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                "must be 1-255 printable ASCII characters (a non-ASCII label in modified UTF-7, as the server lists it)",
            ));
        }
    }
    Ok(())
}

/// What to do with the selected messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Move { destination: String },
    Flags(FlagChange),
    Delete { expunge: bool },
}

/// One MoveMessages, SetFlags or DeleteMessages request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub selection: Selection,
    pub action: Action,
}

impl Request {
    pub fn validate(&mut self) -> Result<(), FieldError> {
        self.selection.validate()?;
        match &mut self.action {
            Action::Move { destination } => {
                if destination.is_empty() {
                    return Err(FieldError::new("destination", "is required"));
                }
                *destination = mailbox_name("destination", destination)?;
                if *destination == self.selection.mailbox {
                    return Err(FieldError::new(
                        "destination",
                        "is the selection's own mailbox",
                    ));
                }
                Ok(())
            }
            Action::Flags(change) => change.validate(),
            Action::Delete { .. } => Ok(()),
        }
    }
}

/// What the audit record says of a request: the action, the mailbox and the UIDs (as ranges),
/// never anything of the messages themselves.
impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.selection;
        let mut uids = uid_ranges(&s.uids);
        if uids.len() > 200 {
            uids.truncate(uids[..200].rfind(',').unwrap_or(200));
            uids.push_str(",…");
        }
        match &self.action {
            Action::Move { destination } => write!(f, "move to {destination:?}")?,
            Action::Flags(c) => {
                let names = |l: &[Flag]| l.iter().map(|x| x.imap()).collect::<Vec<_>>().join(" ");
                write!(f, "flags +({}) -({})", names(&c.add), names(&c.remove))?;
                if c.labels() {
                    let (a, r) = (c.add_labels.len(), c.remove_labels.len());
                    write!(f, " labels +{a} -{r}")?;
                }
            }
            Action::Delete { expunge: true } => f.write_str("expunge")?,
            Action::Delete { expunge: false } => f.write_str("delete to trash")?,
        }
        write!(
            f,
            ": {} UIDs of {:?} (UIDVALIDITY {}): {uids}",
            s.uids.len(),
            s.mailbox,
            s.uid_validity
        )
    }
}

/// What a request did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The request's UIDs that were in the mailbox, ascending: the ones acted on.
    pub uids: Vec<u32>,
    /// The request's UIDs that were not.
    pub missing: Vec<u32>,
    /// Where the messages went (a move, a delete to trash).
    pub destination: String,
    /// The UIDs the messages have there, in the order of `uids`, and that folder's
    /// UIDVALIDITY: where the server said (COPYUID, UIDPLUS), else empty and 0.
    pub destination_uids: Vec<u32>,
    pub destination_uid_validity: u32,
    pub expunged: bool,
}

/// One folder of the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub name: String,
    pub delimiter: String,
    pub attributes: Vec<String>,
}

/// ListFolders: the folders, where DeleteMessages moves to, and whether labels work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Folders {
    pub folders: Vec<Folder>,
    pub trash: String,
    pub labels: bool,
}

/// The extensions of the server that organising needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Features {
    moves: bool,
    uidplus: bool,
    labels: bool,
}

/// A UID set in IMAP syntax, runs as ranges: `[1, 2, 3, 5]` is `1:3,5`. `uids` ascending.
fn uid_ranges(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        while i + 1 < uids.len() && uids[i + 1] == uids[i] + 1 {
            i += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if uids[i] == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{}", uids[i]));
        }
        i += 1;
    }
    out
}

/// A label as X-GM-LABELS takes it: a system label (`\Important`) as its atom, any other as a
/// quoted string.
fn label(l: &str) -> String {
    let system = l
        .strip_prefix('\\')
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()));
    if system { l.to_string() } else { quoted(l) }
}

/// An IMAP quoted string (`"` and `\` escaped); `s` holds no line break (validated before).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The UIDs of a COPYUID set, in order; `None` past [`MAX_UIDS`]: a server may name any
/// range, and it is never expanded beyond what a request can hold.
fn expand(set: &[UidSetMember]) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for member in set {
        let (a, b) = match member {
            UidSetMember::Uid(u) => (*u, *u),
            UidSetMember::UidRange(r) => (*r.start(), *r.end()),
        };
        let (lo, hi) = (a.min(b), a.max(b));
        if (hi - lo) as usize >= MAX_UIDS - out.len().min(MAX_UIDS) {
            return None;
        }
        out.extend(lo..=hi);
    }
    Some(out)
}

/// What a COPYUID response code says: the destination's UIDVALIDITY, and where each source
/// UID went.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Copied {
    uid_validity: u32,
    pairs: Vec<(u32, u32)>,
}

fn copied(code: &ResponseCode<'_>) -> Option<Copied> {
    let ResponseCode::CopyUid(uid_validity, from, to) = code else {
        return None;
    };
    let (from, to) = (expand(from)?, expand(to)?);
    (from.len() == to.len()).then(|| Copied {
        uid_validity: *uid_validity,
        pairs: from.into_iter().zip(to).collect(),
    })
}

impl Copied {
    /// The new UID of each of `uids`, if the server named them all.
    fn of(&self, uids: &[u32]) -> Vec<u32> {
        let found: Option<Vec<u32>> = uids
            .iter()
            .map(|u| self.pairs.iter().find(|(f, _)| f == u).map(|(_, t)| *t))
            .collect();
        found.unwrap_or_default()
    }
}

/// The UID STORE queries of a change, in order: flags added, flags removed, labels added,
/// labels removed.
fn store_queries(c: &FlagChange) -> Vec<String> {
    let flags = |sign: char, l: &[Flag]| {
        let names: Vec<&str> = l.iter().map(|f| f.imap()).collect();
        format!("{sign}FLAGS.SILENT ({})", names.join(" "))
    };
    let labels = |sign: char, l: &[String]| {
        let names: Vec<String> = l.iter().map(|x| label(x)).collect();
        format!("{sign}X-GM-LABELS ({})", names.join(" "))
    };
    let mut out = Vec::new();
    if !c.add.is_empty() {
        out.push(flags('+', &c.add));
    }
    if !c.remove.is_empty() {
        out.push(flags('-', &c.remove));
    }
    if !c.add_labels.is_empty() {
        out.push(labels('+', &c.add_labels));
    }
    if !c.remove_labels.is_empty() {
        out.push(labels('-', &c.remove_labels));
    }
    out
}

fn attribute(a: &NameAttribute<'_>) -> String {
    match a {
        NameAttribute::NoInferiors => "\\Noinferiors".into(),
        NameAttribute::NoSelect => "\\Noselect".into(),
        NameAttribute::Marked => "\\Marked".into(),
        NameAttribute::Unmarked => "\\Unmarked".into(),
        NameAttribute::All => "\\All".into(),
        NameAttribute::Archive => "\\Archive".into(),
        NameAttribute::Drafts => "\\Drafts".into(),
        NameAttribute::Flagged => "\\Flagged".into(),
        NameAttribute::Junk => "\\Junk".into(),
        NameAttribute::Sent => "\\Sent".into(),
        NameAttribute::Trash => "\\Trash".into(),
        NameAttribute::Extension(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

/// The folder DeleteMessages moves to: the one the server marks \Trash, else the configured
/// one, else [`CONVENTIONAL_TRASH`]; and whether it already exists.
fn trash_of(folders: &[Folder], configured: Option<&str>) -> (String, bool) {
    if let Some(f) = folders.iter().find(|f| {
        f.attributes
            .iter()
            .any(|a| a.eq_ignore_ascii_case("\\Trash"))
    }) {
        return (f.name.clone(), true);
    }
    let name = configured.unwrap_or(CONVENTIONAL_TRASH);
    (name.to_string(), folders.iter().any(|f| f.name == name))
}

/// An error of a command that changes something: a refusal (NO/BAD) as the server's, anything
/// else as a protocol failure.
fn refused(session: &Session, what: &str, e: async_imap::error::Error) -> MailError {
    match e {
        async_imap::error::Error::No(message) | async_imap::error::Error::Bad(message) => {
            MailError::Rejected {
                service: Service::Imap,
                server: session.opened.server.clone(),
                message: format!("{what}: {message}"),
                too_large: false,
            }
        }
        e => session.err(what, e),
    }
}

impl Session {
    async fn features(&mut self) -> Result<Features, MailError> {
        self.allow_command();
        let caps = self
            .inner
            .capabilities()
            .await
            .map_err(|e| self.err("capability", e))?;
        Ok(Features {
            moves: caps.has_str("MOVE"),
            uidplus: caps.has_str("UIDPLUS"),
            labels: caps.has_str("X-GM-EXT-1"),
        })
    }

    async fn folders(&mut self) -> Result<Vec<Folder>, MailError> {
        self.allow_command();
        let listed = match self.inner.list(Some(""), Some("*")).await {
            Ok(stream) => stream.try_collect::<Vec<_>>().await,
            Err(e) => Err(e),
        };
        let names = listed.map_err(|e| self.err("list", e))?;
        Ok(names
            .iter()
            .map(|n| Folder {
                name: n.name().to_string(),
                delimiter: n.delimiter().unwrap_or_default().to_string(),
                attributes: n.attributes().iter().map(attribute).collect(),
            })
            .collect())
    }

    /// The given UIDs (ascending) that are in the mailbox.
    async fn present(&mut self, uids: &[u32]) -> Result<Vec<u32>, MailError> {
        let mut found = self.search(&format!("UID {}", uid_ranges(uids))).await?;
        found.retain(|u| uids.binary_search(u).is_ok());
        Ok(found)
    }

    async fn store(&mut self, uids: &[u32], query: &str) -> Result<(), MailError> {
        self.allow_command();
        let stored = match self.inner.uid_store(uid_ranges(uids), query).await {
            Ok(stream) => stream.try_collect::<Vec<_>>().await.map(drop),
            Err(e) => Err(e),
        };
        stored.map_err(|e| refused(self, "store", e))
    }

    /// UID EXPUNGE of `uids`, marked deleted first.
    async fn expunge(&mut self, uids: &[u32]) -> Result<(), MailError> {
        self.store(uids, "+FLAGS.SILENT (\\Deleted)").await?;
        self.allow_command();
        let expunged = match self.inner.uid_expunge(uid_ranges(uids)).await {
            Ok(stream) => stream.try_collect::<Vec<_>>().await.map(drop),
            Err(e) => Err(e),
        };
        expunged.map_err(|e| refused(self, "expunge", e))
    }

    /// Moves `uids` to `destination`: UID MOVE, or UID COPY then UID EXPUNGE (UIDPLUS); what
    /// the server said of their new UIDs.
    async fn transfer(
        &mut self,
        uids: &[u32],
        destination: &str,
        features: Features,
    ) -> Result<Option<Copied>, MailError> {
        let verb = if features.moves { "MOVE" } else { "COPY" };
        let command = format!("UID {verb} {} {}", uid_ranges(uids), quoted(destination));
        let copied = self.copying(&command, destination).await?;
        if !features.moves {
            self.expunge(uids).await?;
        }
        Ok(copied)
    }

    /// Runs a UID MOVE or UID COPY to `destination` to its tagged reply, keeping the COPYUID
    /// code servers send untagged (MOVE) or in that reply (COPY).
    async fn copying(
        &mut self,
        command: &str,
        destination: &str,
    ) -> Result<Option<Copied>, MailError> {
        self.allow_command();
        let id = self.inner.run_command(command).await;
        let id = id.map_err(|e| self.err("move", e))?;
        let mut found = None;
        loop {
            let response = self.inner.read_response().await;
            let response = response
                .map_err(|e| self.err("move", e))?
                .ok_or_else(|| self.err("move", "the server closed the connection"))?;
            let (status, outcome) = match response.parsed() {
                Response::Data { outcome, .. } => (None, outcome),
                Response::Done {
                    tag,
                    status,
                    outcome,
                } if *tag == id => (Some(status), outcome),
                _ => continue,
            };
            if let Some(c) = outcome.code.as_ref().and_then(copied) {
                found = Some(c);
            }
            let message = outcome.information.as_deref().unwrap_or_default();
            match status {
                None => {}
                Some(Status::Ok) => return Ok(found),
                Some(Status::No) if outcome.code == Some(ResponseCode::TryCreate) => {
                    return Err(MailError::NoMailbox {
                        mailbox: destination.to_string(),
                        message: message.to_string(),
                    });
                }
                Some(_) => {
                    return Err(refused(
                        self,
                        "move",
                        async_imap::error::Error::No(message.to_string()),
                    ));
                }
            }
        }
    }
}

/// What the server lacks for `action`, checked before anything changes.
fn unsupported(action: &Action, f: Features) -> Option<&'static str> {
    let transfers = matches!(
        action,
        Action::Move { .. } | Action::Delete { expunge: false }
    );
    match action {
        _ if transfers && !f.moves && !f.uidplus => Some(
            "has neither MOVE nor UIDPLUS: messages cannot be moved without expunging others marked deleted",
        ),
        Action::Delete { expunge: true } if !f.uidplus => Some(
            "has no UIDPLUS (UID EXPUNGE): the messages cannot be expunged without expunging others marked deleted; delete them to Trash instead",
        ),
        Action::Flags(c) if c.labels() && !f.labels => Some(
            "has no labels (no X-GM-EXT-1 in its CAPABILITY): only Gmail's IMAP has X-GM-LABELS",
        ),
        _ => None,
    }
}

/// The Trash folder for a delete from `mailbox`, created (with `create`: there is something
/// to move) if it is a configured or conventional name the account does not have yet.
async fn trash_for(
    session: &mut Session,
    mailbox: &str,
    configured: Option<&str>,
    create: bool,
) -> Result<String, MailError> {
    let folders = session.folders().await?;
    let (trash, exists) = trash_of(&folders, configured);
    if trash == mailbox {
        return Err(FieldError::new(
            "expunge",
            format!("the messages are already in the Trash folder {trash:?}; set expunge to remove them for good"),
        )
        .into());
    }
    if create && !exists {
        session.allow_command();
        let created = session.inner.create(&trash).await;
        created.map_err(|e| refused(session, "creating the Trash folder", e))?;
    }
    Ok(trash)
}

/// The request on an open session: UIDVALIDITY and extensions first, then the change.
async fn act(
    session: &mut Session,
    account: &Account,
    request: &Request,
) -> Result<Outcome, MailError> {
    let s = &request.selection;
    if session.opened.uid_validity != s.uid_validity {
        return Err(MailError::StaleUidValidity {
            mailbox: s.mailbox.clone(),
            expected: s.uid_validity,
            actual: session.opened.uid_validity,
        });
    }
    let features = session.features().await?;
    if let Some(what) = unsupported(&request.action, features) {
        return Err(MailError::Unsupported {
            server: session.opened.server.clone(),
            what: what.to_string(),
        });
    }
    let uids = session.present(&s.uids).await?;
    let missing = s.uids.iter().filter(|u| !uids.contains(u)).copied();
    let mut outcome = Outcome {
        missing: missing.collect(),
        ..Outcome::default()
    };
    match &request.action {
        Action::Move { destination } => outcome.destination = destination.clone(),
        Action::Delete { expunge: false } => {
            let (configured, create) = (account.trash.as_deref(), !uids.is_empty());
            outcome.destination = trash_for(session, &s.mailbox, configured, create).await?
        }
        _ => {}
    }
    if uids.is_empty() {
        return Ok(outcome);
    }
    match &request.action {
        Action::Move { .. } | Action::Delete { expunge: false } => {
            let copied = session
                .transfer(&uids, &outcome.destination, features)
                .await?;
            if let Some(c) = copied {
                outcome.destination_uids = c.of(&uids);
                outcome.destination_uid_validity = c.uid_validity;
            }
        }
        Action::Delete { expunge: true } => {
            session.expunge(&uids).await?;
            outcome.expunged = true;
        }
        Action::Flags(change) => {
            for query in store_queries(change) {
                session.store(&uids, &query).await?;
            }
        }
    }
    outcome.uids = uids;
    Ok(outcome)
}

/// Opens the selection's mailbox read-write and runs the request within `timeout`.
async fn organize(
    account: &Account,
    request: &Request,
    timeout: Duration,
    caps: Caps,
) -> Result<Outcome, MailError> {
    let mailbox = &request.selection.mailbox;
    let mut session = Session::open(account, mailbox, true, timeout, caps).await?;
    let server = account.imap.addr();
    let result = bounded(
        Service::Imap,
        &server,
        timeout,
        act(&mut session, account, request),
    )
    .await;
    session.logout().await;
    result
}

/// The account's folders, read with INBOX examined (every account has one).
async fn list(account: &Account, timeout: Duration, caps: Caps) -> Result<Folders, MailError> {
    let mut session = Session::open(account, "INBOX", false, timeout, caps).await?;
    let server = account.imap.addr();
    let result = bounded(Service::Imap, &server, timeout, async {
        let features = session.features().await?;
        let folders = session.folders().await?;
        let (trash, _) = trash_of(&folders, account.trash.as_deref());
        Ok(Folders {
            folders,
            trash,
            labels: features.labels,
        })
    })
    .await;
    session.logout().await;
    result
}

impl Mail {
    /// ListFolders.
    pub async fn list_folders(&self, target: &Target) -> Result<Folders, MailError> {
        let account = self.account(target).await?;
        let result = list(&account, self.timeout, self.caps).await;
        self.settle(target, &account, result).await
    }

    /// MoveMessages, SetFlags or DeleteMessages.
    pub async fn organize(
        &self,
        target: &Target,
        mut request: Request,
    ) -> Result<Outcome, MailError> {
        request.validate()?;
        let account = self.account(target).await?;
        let result = organize(&account, &request, self.timeout, self.caps).await;
        self.settle(target, &account, result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(uids: Vec<u32>) -> Selection {
        Selection {
            mailbox: String::new(),
            uid_validity: 7,
            uids,
        }
    }

    fn field(r: Result<(), FieldError>) -> (String, String) {
        let e = r.unwrap_err();
        (e.field.clone(), e.to_string())
    }

    #[test]
    fn a_selection_is_bounded_and_names_what_is_wrong() {
        let mut ok = selection(vec![5, 3, 3, 4]);
        ok.validate().unwrap();
        assert_eq!((ok.mailbox.as_str(), ok.uids), ("INBOX", vec![3, 4, 5]));
        let (f, why) = field(selection((1..=1001).collect()).validate());
        assert_eq!(f, "selection.uids");
        assert!(why.contains("1001") && why.contains("1000"), "{why}");
        assert!(selection((1..=1000).collect()).validate().is_ok());
        assert_eq!(field(selection(vec![]).validate()).0, "selection.uids");
        assert!(field(selection(vec![0, 1]).validate()).1.contains("0"));
        let mut stale = selection(vec![1]);
        stale.uid_validity = 0;
        assert_eq!(field(stale.validate()).0, "selection.uid_validity");
        let mut smuggled = selection(vec![1]);
        smuggled.mailbox = "INBOX\r\nA1 DELETE INBOX".into();
        assert_eq!(field(smuggled.validate()).0, "selection.mailbox");
    }

    fn request(action: Action) -> Request {
        Request {
            selection: selection(vec![1]),
            action,
        }
    }

    #[test]
    fn requests_say_what_is_wrong() {
        let mv = |d: &str| {
            request(Action::Move {
                destination: d.into(),
            })
            .validate()
        };
        assert_eq!(field(mv("")).0, "destination");
        assert!(field(mv("INBOX")).1.contains("own mailbox"));
        assert_eq!(field(mv("a\nb")).0, "destination");
        assert!(mv("Archive").is_ok());
        let flags = |c: FlagChange| request(Action::Flags(c)).validate();
        assert!(field(flags(FlagChange::default())).1.contains("nothing"));
        let both = FlagChange {
            add: vec![Flag::Seen],
            remove: vec![Flag::Seen],
            ..FlagChange::default()
        };
        assert!(field(flags(both)).1.contains("\\Seen"));
        let bad_label = FlagChange {
            add_labels: vec!["ok".into(), "é".into()],
            ..FlagChange::default()
        };
        assert_eq!(field(flags(bad_label)).0, "add_labels[1]");
        let too_many = FlagChange {
            remove_labels: vec!["x".into(); 51],
            ..FlagChange::default()
        };
        assert_eq!(field(flags(too_many)).0, "remove_labels");
    }

    fn copyuid(line: &str) -> Option<Copied> {
        let (_, response) = Response::parse(line.as_bytes()).unwrap();
        match response {
            Response::Data { outcome, .. } | Response::Done { outcome, .. } => {
                copied(outcome.code.as_ref()?)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn copyuid_says_where_each_message_went_within_bounds() {
        let c = copyuid("* OK [COPYUID 38505 304,319:320 3956:3958] Moved UIDs.\r\n").unwrap();
        assert_eq!(c.uid_validity, 38505);
        assert_eq!(c.of(&[304, 319, 320]), [3956, 3957, 3958]);
        assert_eq!(c.of(&[320, 304]), [3958, 3956]);
        assert!(c.of(&[304, 999]).is_empty(), "a UID it did not name");
        let tagged = copyuid("A3 OK [COPYUID 7 1 9] Copy completed.\r\n").unwrap();
        assert_eq!((tagged.uid_validity, tagged.of(&[1])), (7, vec![9]));
        // A server naming a huge range is not believed, and nothing is expanded.
        assert_eq!(
            copyuid("* OK [COPYUID 7 1:4294967295 1:4294967295] x\r\n"),
            None
        );
        assert_eq!(
            copyuid("* OK [COPYUID 7 1:3 1:2] x\r\n"),
            None,
            "sets of other lengths"
        );
        assert_eq!(copyuid("* OK [UIDNEXT 5] x\r\n"), None);
    }

    #[test]
    fn uid_sets_are_ranges() {
        assert_eq!(uid_ranges(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_ranges(&[9]), "9");
        assert_eq!(uid_ranges(&[]), "");
        assert_eq!(uid_ranges(&[1, 3, 5]), "1,3,5");
    }

    #[test]
    fn store_commands_are_formatted_for_flags_and_labels() {
        let change = FlagChange {
            add: vec![Flag::Seen, Flag::Flagged],
            remove: vec![Flag::Answered],
            add_labels: vec![
                "Receipts".into(),
                "a \"b\" \\c".into(),
                "\\Important".into(),
            ],
            remove_labels: vec!["\\Inbox".into(), "\\".into()],
        };
        assert_eq!(
            store_queries(&change),
            [
                "+FLAGS.SILENT (\\Seen \\Flagged)",
                "-FLAGS.SILENT (\\Answered)",
                "+X-GM-LABELS (\"Receipts\" \"a \\\"b\\\" \\\\c\" \\Important)",
                "-X-GM-LABELS (\\Inbox \"\\\\\")",
            ]
        );
        let only_deleted = FlagChange {
            remove: vec![Flag::Deleted],
            ..FlagChange::default()
        };
        assert_eq!(store_queries(&only_deleted), ["-FLAGS.SILENT (\\Deleted)"]);
    }

    #[test]
    fn what_the_server_lacks_is_known_before_anything_changes() {
        let all = Features {
            moves: true,
            uidplus: true,
            labels: true,
        };
        let labels = Action::Flags(FlagChange {
            add_labels: vec!["x".into()],
            ..FlagChange::default()
        });
        let flags = Action::Flags(FlagChange {
            add: vec![Flag::Seen],
            ..FlagChange::default()
        });
        let mv = Action::Move {
            destination: "A".into(),
        };
        let expunge = Action::Delete { expunge: true };
        let trash = Action::Delete { expunge: false };
        for a in [&labels, &flags, &mv, &expunge, &trash] {
            assert_eq!(unsupported(a, all), None, "{a:?}");
        }
        let dovecot = Features {
            labels: false,
            ..all
        };
        assert!(unsupported(&labels, dovecot).unwrap().contains("no labels"));
        assert_eq!(unsupported(&flags, dovecot), None);
        let copy_only = Features {
            moves: false,
            ..dovecot
        };
        assert_eq!(unsupported(&mv, copy_only), None, "COPY + UID EXPUNGE");
        let bare = Features::default();
        for a in [&mv, &trash, &expunge] {
            assert!(unsupported(a, bare).is_some(), "{a:?}");
        }
    }

    fn folder(name: &str, attributes: &[&str]) -> Folder {
        Folder {
            name: name.into(),
            delimiter: "/".into(),
            attributes: attributes.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn trash_is_the_special_use_folder_else_the_setting_else_the_convention() {
        let gmail = [
            folder("INBOX", &[]),
            folder("[Gmail]/Bin", &["\\HasNoChildren", "\\Trash"]),
        ];
        assert_eq!(
            trash_of(&gmail, Some("Deleted")),
            ("[Gmail]/Bin".into(), true)
        );
        let plain = [folder("INBOX", &[]), folder("Deleted", &[])];
        assert_eq!(trash_of(&plain, Some("Deleted")), ("Deleted".into(), true));
        assert_eq!(trash_of(&plain, None), ("Trash".into(), false));
    }

    #[test]
    fn the_audit_detail_names_the_request_not_the_messages() {
        let mut r = request(Action::Move {
            destination: "Archive".into(),
        });
        r.selection.uids = vec![1, 2, 3, 9];
        r.validate().unwrap();
        assert_eq!(
            r.to_string(),
            "move to \"Archive\": 4 UIDs of \"INBOX\" (UIDVALIDITY 7): 1:3,9"
        );
        r.selection.uids = (1..=1000).map(|u| u * 2).collect();
        assert!(r.to_string().len() < 320, "{}", r.to_string().len());
        assert!(r.to_string().ends_with(",…"));
    }
}
