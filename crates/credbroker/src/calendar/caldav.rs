//! CalDAV (RFC 4791) over reqwest: discovery (current-user-principal → calendar-home-set →
//! the calendar collections), REPORT calendar-query with a time range, PUT with
//! `If-None-Match: *`. Multistatus XML is read with quick-xml; anything malformed is an error,
//! never a panic.

use std::collections::BTreeMap;
use std::time::Duration;

use quick_xml::events::Event as XmlEvent;
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use reqwest::{Method, StatusCode, Url};

use super::{CalendarError, Event, Listing, ValidEvent, Window, expand, ical};
use crate::model::{Check, Connector, Secret, Stage, TestReport};

const DAV: &str = "DAV:";
const CALDAV: &str = "urn:ietf:params:xml:ns:caldav";
/// Largest response body read from a server.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// A response body, refused past [`MAX_BODY_BYTES`] (CalDAV and Google Calendar alike).
pub(super) async fn read_bounded(
    mut resp: reqwest::Response,
    server: &str,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, CalendarError> {
    let status = resp.status().as_u16();
    let mut bytes = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| transport_error(server, &e, timeout))?
    {
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(CalendarError::Rejected {
                server: server.to_string(),
                status,
                why: format!(
                    "the response is larger than {MAX_BODY_BYTES} bytes; narrow the window"
                ),
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Where and as whom to connect.
pub struct Settings {
    pub url: Url,
    pub username: String,
    pub password: Secret,
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.url.as_str())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A connection setting, if given and not empty.
fn setting<'a>(settings: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    settings
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The server URL a connection's password goes to: its `url` setting, else the connector's;
/// https only, with no credentials in it, ending in '/'.
pub fn server_url(
    connector: &Connector,
    settings: &BTreeMap<String, String>,
) -> Result<Url, CalendarError> {
    let url = setting(settings, "url")
        .or_else(|| connector.setting("url"))
        .ok_or_else(|| {
            CalendarError::Config(
                "no CalDAV server URL: set `url` on the connection or the connector".into(),
            )
        })?;
    // The value is not echoed: a malformed URL may still carry a password.
    let mut url = Url::parse(url)
        .map_err(|e| CalendarError::Config(format!("the CalDAV URL is not a URL: {e}")))?;
    if url.scheme() != "https" {
        return Err(CalendarError::Config(
            "the CalDAV URL must start with https://".into(),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(CalendarError::Config(
            "the CalDAV URL must not contain credentials: use the username setting and the password secret".into(),
        ));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

impl Settings {
    /// From a connection's settings (url, username, ca_pem), falling back to the connector's
    /// configuration (url, and its ca_pem for its own url only), and its password.
    pub fn new(
        connector: &Connector,
        settings: &BTreeMap<String, String>,
        password: Option<Secret>,
    ) -> Result<Settings, CalendarError> {
        let url = server_url(connector, settings)?;
        let username = setting(settings, "username")
            .ok_or_else(|| CalendarError::Config("no CalDAV username: set `username`".into()))?
            .to_string();
        let password =
            password.ok_or_else(|| CalendarError::Config("no CalDAV password is stored".into()))?;
        // A connector's CA vouches for the connector's server only, never for a URL the user
        // gave on their own connection.
        let users_own = setting(settings, "url").is_some();
        let ca_pem = setting(settings, "ca_pem")
            .or_else(|| connector.setting("ca_pem").filter(|_| !users_own))
            .map(str::to_string);
        Ok(Settings {
            url,
            username,
            password,
            ca_pem,
        })
    }
}

/// A calendar collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarInfo {
    /// The collection's path, e.g. "/alice/work/": the calendar's id in the API.
    pub href: String,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Discovery {
    pub principal: String,
    pub home: String,
    pub calendars: Vec<CalendarInfo>,
}

/// One signed-in CalDAV account.
pub struct Account {
    settings: Settings,
    client: reqwest::Client,
    timeout: Duration,
}

// ---- multistatus -------------------------------------------------------------------------

/// One `DAV:response` of a multistatus.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DavResponse {
    pub href: String,
    /// The response-level status, when the server gave one instead of propstats.
    pub status: Option<u16>,
    pub props: Vec<DavProp>,
}

/// One property of a propstat.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DavProp {
    pub caldav: bool,
    pub name: String,
    pub text: String,
    pub hrefs: Vec<String>,
    /// Local names of the child elements (e.g. resourcetype's `calendar`).
    pub children: Vec<String>,
    /// True when its propstat's status is 2xx.
    pub ok: bool,
}

impl DavResponse {
    pub fn prop(&self, caldav: bool, name: &str) -> Option<&DavProp> {
        self.props
            .iter()
            .find(|p| p.ok && p.caldav == caldav && p.name == name)
    }
}

fn xml_error(why: impl std::fmt::Display) -> CalendarError {
    CalendarError::Malformed {
        what: "WebDAV XML response",
        why: why.to_string(),
    }
}

fn status_code(line: &str) -> Option<u16> {
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The state of a multistatus read: one pass over the events, each handled by the method for
/// its kind. The open elements are a stack; a property being read is remembered with its depth,
/// and the properties of a propstat wait in `pending` until its status says whether they hold.
#[derive(Default)]
struct Multistatus {
    /// (is DAV, is CalDAV, local name) of each open element.
    stack: Vec<(bool, bool, String)>,
    responses: Vec<DavResponse>,
    response: Option<DavResponse>,
    pending: Vec<DavProp>,
    propstat_status: Option<u16>,
    prop: Option<(usize, DavProp)>,
    text: String,
    saw_root: bool,
}

impl Multistatus {
    fn parent_is(&self, name: &str) -> bool {
        self.stack.last().is_some_and(|(d, _, l)| *d && l == name)
    }

    /// The open property, when `stack` is directly inside it.
    fn open_prop(&mut self) -> Option<&mut DavProp> {
        let depth = self.stack.len();
        match &mut self.prop {
            Some((d, p)) if depth == *d + 1 => Some(p),
            _ => None,
        }
    }

    fn start(
        &mut self,
        dav: bool,
        caldav: bool,
        local: String,
        empty: bool,
    ) -> Result<(), CalendarError> {
        if self.stack.is_empty() {
            if !(dav && local == "multistatus") {
                return Err(xml_error(format!(
                    "the root element is {local:?}, not DAV:multistatus"
                )));
            }
            self.saw_root = true;
        }
        if let Some(p) = self.open_prop() {
            p.children.push(local.clone());
        }
        if dav && local == "response" {
            self.response = Some(DavResponse::default());
        } else if self.parent_is("prop") && self.prop.is_none() && self.response.is_some() {
            let p = DavProp {
                caldav,
                name: local.clone(),
                ..Default::default()
            };
            if empty {
                self.pending.push(p);
            } else {
                self.prop = Some((self.stack.len(), p));
            }
        }
        if !empty {
            self.stack.push((dav, caldav, local));
            self.text.clear();
        }
        Ok(())
    }

    /// Character data, CDATA or a resolved reference.
    fn text(&mut self, content: &str) {
        self.text.push_str(content);
        if let Some(p) = self.open_prop() {
            p.text.push_str(content);
        }
    }

    fn end(&mut self) -> Result<(), CalendarError> {
        let Some((dav, _, local)) = self.stack.pop() else {
            return Err(xml_error("unbalanced end tag"));
        };
        if self
            .prop
            .as_ref()
            .is_some_and(|(depth, _)| self.stack.len() == *depth)
        {
            if let Some((_, p)) = self.prop.take() {
                self.pending.push(p);
            }
            return Ok(());
        }
        if !dav {
            return Ok(());
        }
        match local.as_str() {
            "href" => {
                let href = self.text.trim().to_string();
                let in_response = self.parent_is("response");
                if let Some((_, p)) = &mut self.prop {
                    p.hrefs.push(href);
                } else if let Some(r) = &mut self.response
                    && in_response
                {
                    r.href = href;
                }
            }
            "status" if self.prop.is_none() => {
                let code = status_code(self.text.trim());
                if self.parent_is("propstat") {
                    self.propstat_status = code;
                } else if let Some(r) = &mut self.response {
                    r.status = code;
                }
            }
            "propstat" => {
                let ok = self
                    .propstat_status
                    .is_some_and(|c| (200..300).contains(&c));
                if let Some(r) = &mut self.response {
                    for mut p in self.pending.drain(..) {
                        p.ok = ok;
                        r.props.push(p);
                    }
                }
                self.propstat_status = None;
            }
            "response" => {
                if let Some(r) = self.response.take() {
                    if r.href.is_empty() {
                        return Err(xml_error("a response has no href"));
                    }
                    self.responses.push(r);
                }
            }
            _ => {}
        }
        self.text.clear();
        Ok(())
    }

    fn finish(self) -> Result<Vec<DavResponse>, CalendarError> {
        if !self.saw_root {
            return Err(xml_error("empty document"));
        }
        if !self.stack.is_empty() {
            return Err(xml_error("the document ends inside an element"));
        }
        Ok(self.responses)
    }
}

/// The text of a character or predefined entity reference.
fn entity(r: &quick_xml::events::BytesRef<'_>) -> Result<String, CalendarError> {
    Ok(match r.resolve_char_ref().map_err(xml_error)? {
        Some(c) => c.to_string(),
        None => match r.as_ref() {
            "lt" => "<".into(),
            "gt" => ">".into(),
            "amp" => "&".into(),
            "quot" => "\"".into(),
            "apos" => "'".into(),
            other => return Err(xml_error(format!("unknown entity &{other};"))),
        },
    })
}

/// Parses a `DAV:multistatus` document.
pub fn parse_multistatus(xml: &str) -> Result<Vec<DavResponse>, CalendarError> {
    let mut reader = NsReader::from_str(xml);
    let mut state = Multistatus::default();
    loop {
        let (ns, event) = reader.read_resolved_event().map_err(xml_error)?;
        let (dav, caldav) = match ns {
            ResolveResult::Bound(n) => (n.as_ref() == DAV, n.as_ref() == CALDAV),
            _ => (false, false),
        };
        match event {
            XmlEvent::Start(ref e) | XmlEvent::Empty(ref e) => {
                let local = e.local_name().as_ref().to_string();
                state.start(dav, caldav, local, matches!(event, XmlEvent::Empty(_)))?;
            }
            XmlEvent::Text(t) => state.text(&t.xml10_content()),
            XmlEvent::CData(c) => state.text(&c.into_inner()),
            XmlEvent::GeneralRef(r) => state.text(&entity(&r)?),
            XmlEvent::End(_) => state.end()?,
            XmlEvent::Eof => break,
            _ => {}
        }
    }
    state.finish()
}

// ---- HTTP --------------------------------------------------------------------------------

/// What went wrong on the way to the server, in words a user can act on.
pub(crate) fn transport_error(
    server: &str,
    e: &reqwest::Error,
    timeout: Duration,
) -> CalendarError {
    if let Some(refused) = crate::upstream::refusal(e) {
        return CalendarError::Egress(refused);
    }
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let all = chain.join(": ").to_lowercase();
    let innermost = chain.last().cloned().unwrap_or_default();
    let (stage, why) = if e.is_timeout() || all.contains("timed out") {
        (
            Stage::Timeout,
            if timeout.is_zero() {
                "did not answer in time".to_string()
            } else {
                format!("did not answer within {}s", timeout.as_secs())
            },
        )
    } else if all.contains("dns error") || all.contains("failed to lookup") {
        (
            Stage::Dns,
            "cannot resolve the server's host name: check the URL".to_string(),
        )
    } else if all.contains("certificate") || all.contains("tls") || all.contains("handshake") {
        (
            Stage::Tls,
            format!("TLS failed ({innermost}): check the URL, or give the server's CA in ca_pem"),
        )
    } else if e.is_connect() {
        (
            Stage::Tcp,
            // Not the inner cause (refused, unreachable…): that would make a port scanner.
            "cannot connect: check the URL and that the server is running".to_string(),
        )
    } else {
        (Stage::Protocol, format!("the request failed ({innermost})"))
    };
    CalendarError::Unreachable {
        server: server.to_string(),
        stage,
        why,
    }
}

fn excerpt(body: &str) -> String {
    let clean: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    clean.trim().to_string()
}

impl Account {
    pub fn new(settings: Settings, timeout: Duration) -> Result<Account, CalendarError> {
        let client = crate::tls::http_client(settings.ca_pem.as_deref(), timeout)
            .map_err(|e| CalendarError::Config(e.to_string()))?;
        Ok(Account {
            settings,
            client,
            timeout,
        })
    }

    /// "host:port", for messages.
    pub fn server(&self) -> String {
        let url = &self.settings.url;
        match url.port_or_known_default() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        }
    }

    /// Resolves a path the server (or a caller) named against the server's URL. It must stay
    /// on the same origin: the password is never sent to another host, whatever a server
    /// answers in its hrefs.
    pub(crate) fn url(&self, href: &str) -> Result<Url, CalendarError> {
        let base = &self.settings.url;
        let url = base
            .join(href)
            .map_err(|_| xml_error(format!("the server named an invalid path {href:?}")))?;
        if url.origin() != base.origin() {
            return Err(xml_error(format!(
                "the server named {href:?}, outside {}: refused",
                self.server()
            )));
        }
        Ok(url)
    }

    /// Sends one request and reads the body (bounded); maps 401/403/404/5xx to errors.
    async fn send(
        &self,
        method: &str,
        url: Url,
        headers: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Result<(StatusCode, String), CalendarError> {
        let server = self.server();
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|e| CalendarError::Internal(e.to_string()))?;
        let path = url.path().to_string();
        let mut req = self.client.request(method, url).basic_auth(
            &self.settings.username,
            Some(self.settings.password.expose()),
        );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some((content_type, body)) = body {
            req = req.header("Content-Type", content_type).body(body);
        }
        let started = std::time::Instant::now();
        let exchange = async {
            let resp = req
                .send()
                .await
                .map_err(|e| transport_error(&server, &e, self.timeout))?;
            let status = resp.status();
            let bytes = read_bounded(resp, &server, self.timeout).await?;
            Ok::<_, CalendarError>((status, bytes))
        }
        .await;
        crate::metrics::upstream(crate::metrics::Upstream::CalDav, started.elapsed());
        let (status, bytes) = exchange?;
        let text = String::from_utf8(bytes).map_err(|_| xml_error("the response is not UTF-8"))?;
        match status.as_u16() {
            401 => Err(CalendarError::AuthRefused {
                server,
                status: 401,
            }),
            403 => Err(CalendarError::Forbidden { server, path }),
            404 => Err(CalendarError::NotFound(format!(
                "{server} has nothing at {path}"
            ))),
            s if s >= 500 => Err(CalendarError::ServerError { server, status: s }),
            _ => Ok((status, text)),
        }
    }

    async fn propfind(
        &self,
        href: &str,
        depth: &str,
        props: &str,
    ) -> Result<Vec<DavResponse>, CalendarError> {
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop>{props}</d:prop></d:propfind>"#
        );
        self.multistatus("PROPFIND", href, depth, body, || {
            format!("PROPFIND {href} did not answer 207 Multi-Status: is this a CalDAV server?")
        })
        .await
    }

    /// Sends a WebDAV request with an XML body and reads its 207 Multi-Status answer; another
    /// status is [`CalendarError::Rejected`] saying `why`.
    async fn multistatus(
        &self,
        method: &str,
        href: &str,
        depth: &str,
        body: String,
        why: impl FnOnce() -> String,
    ) -> Result<Vec<DavResponse>, CalendarError> {
        let (status, text) = self
            .send(
                method,
                self.url(href)?,
                &[("Depth", depth)],
                Some(("application/xml; charset=utf-8", body)),
            )
            .await?;
        if status.as_u16() != 207 {
            return Err(CalendarError::Rejected {
                server: self.server(),
                status: status.as_u16(),
                why: why(),
            });
        }
        parse_multistatus(&text)
    }

    /// The first href in property `name` (`<d:name/>`, or `<c:name/>` when `caldav`) of `href`.
    async fn href_prop(
        &self,
        href: &str,
        caldav: bool,
        name: &str,
    ) -> Result<Option<String>, CalendarError> {
        let prefix = if caldav { "c" } else { "d" };
        let found = self
            .propfind(href, "0", &format!("<{prefix}:{name}/>"))
            .await?;
        Ok(found
            .iter()
            .find_map(|r| r.prop(caldav, name))
            .and_then(|p| p.hrefs.first().cloned()))
    }

    /// Finds the principal, the calendar home and the calendars.
    pub async fn discover(&self) -> Result<Discovery, CalendarError> {
        let base = self.settings.url.path().to_string();
        let principal = self
            .href_prop(&base, false, "current-user-principal")
            .await?
            .unwrap_or(base);
        let home = self
            .href_prop(&principal, true, "calendar-home-set")
            .await?
            .unwrap_or_else(|| principal.clone());
        let found = self
            .propfind(&home, "1", "<d:resourcetype/><d:displayname/>")
            .await?;
        let mut calendars = Vec::new();
        for r in &found {
            let is_calendar = r
                .prop(false, "resourcetype")
                .is_some_and(|p| p.children.iter().any(|c| c == "calendar"));
            if !is_calendar {
                continue;
            }
            let href = self.url(&r.href)?.path().to_string();
            let name = r
                .prop(false, "displayname")
                .map(|p| p.text.trim().to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| last_segment(&href).to_string());
            calendars.push(CalendarInfo { href, name });
        }
        calendars.sort_by(|a, b| a.href.cmp(&b.href));
        Ok(Discovery {
            principal,
            home,
            calendars,
        })
    }

    /// The calendars a request names: all of them for "", else the one whose path, last path
    /// segment or display name matches. A path not in the home ("/team/shared/") is used as
    /// given, and the server decides whether this account may read it.
    async fn pick(&self, wanted: &str, all: bool) -> Result<Vec<CalendarInfo>, CalendarError> {
        let wanted = wanted.trim();
        if wanted.starts_with('/') {
            let ok = !wanted.contains("..")
                && !wanted.contains("//")
                && !wanted
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || "?#\\".contains(c));
            if !ok {
                return Err(crate::model::FieldError::new(
                    "calendar",
                    "must be a calendar name or a collection path such as /alice/work/",
                )
                .into());
            }
        }
        let discovery = self.discover().await?;
        let calendars = discovery.calendars;
        if wanted.is_empty() {
            if calendars.is_empty() {
                return Err(CalendarError::NotFound(format!(
                    "the account has no calendar in {}",
                    discovery.home
                )));
            }
            return Ok(if all {
                calendars
            } else {
                calendars.into_iter().take(1).collect()
            });
        }
        let trimmed = wanted.trim_end_matches('/');
        if let Some(c) = calendars.iter().find(|c| {
            c.href.trim_end_matches('/') == trimmed
                || last_segment(&c.href) == trimmed
                || c.name.eq_ignore_ascii_case(wanted)
        }) {
            return Ok(vec![c.clone()]);
        }
        if wanted.starts_with('/') {
            let href = format!("{trimmed}/");
            return Ok(vec![CalendarInfo {
                name: last_segment(&href).to_string(),
                href,
            }]);
        }
        let names: Vec<_> = calendars.iter().map(|c| c.name.as_str()).collect();
        Err(CalendarError::NotFound(format!(
            "no calendar {wanted:?} in this account (calendars: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )))
    }

    async fn query(
        &self,
        calendar: &CalendarInfo,
        window: &Window,
        listing: &mut Listing,
    ) -> Result<(), CalendarError> {
        let stamp = |t: chrono::DateTime<chrono::Utc>| t.format("%Y%m%dT%H%M%SZ").to_string();
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?>
<c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav">
  <d:prop><d:getetag/><c:calendar-data/></d:prop>
  <c:filter><c:comp-filter name="VCALENDAR"><c:comp-filter name="VEVENT">
    <c:time-range start="{}" end="{}"/>
  </c:comp-filter></c:comp-filter></c:filter>
</c:calendar-query>"#,
            stamp(window.min),
            stamp(window.max)
        );
        let responses = self
            .multistatus("REPORT", &calendar.href, "1", body, || {
                format!("REPORT {} did not answer 207 Multi-Status", calendar.href)
            })
            .await?;
        for r in responses {
            let Some(data) = r.prop(true, "calendar-data") else {
                continue;
            };
            let read = ical::parse(&data.text)
                .and_then(|components| expand::expand(&components, &calendar.href, window));
            match read {
                Ok(expansion) => {
                    if expansion.capped {
                        listing.warnings.push(format!(
                            "{}: a rule repeats more than {} times before the window ends; later instances are missing",
                            r.href,
                            expand::MAX_STEPS
                        ));
                    }
                    listing.events.extend(expansion.events);
                }
                Err(e) => {
                    tracing::warn!(href = %r.href, error = %e, "unreadable calendar object skipped");
                    listing.warnings.push(format!("{}: {e}", r.href));
                }
            }
        }
        Ok(())
    }

    pub async fn list(
        &self,
        calendar: &str,
        window: &Window,
        limit: usize,
    ) -> Result<Listing, CalendarError> {
        let calendars = self.pick(calendar, true).await?;
        let mut listing = Listing::default();
        for c in &calendars {
            self.query(c, window, &mut listing).await?;
        }
        listing
            .events
            .sort_by(|a, b| (a.start, &a.uid, &a.calendar).cmp(&(b.start, &b.uid, &b.calendar)));
        if listing.events.len() > limit {
            listing.events.truncate(limit);
            listing.truncated = true;
        }
        Ok(listing)
    }

    pub async fn create(&self, calendar: &str, event: &ValidEvent) -> Result<Event, CalendarError> {
        let target = self
            .pick(calendar, false)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| CalendarError::NotFound("no calendar to write to".into()))?;
        let uid = super::new_uid();
        let ics = ical::write(&uid, event, chrono::Utc::now())?;
        let href = format!("{}{}.ics", target.href, uid.replace('@', "-"));
        let (status, body) = self
            .send(
                "PUT",
                self.url(&href)?,
                &[("If-None-Match", "*")],
                Some(("text/calendar; charset=utf-8", ics)),
            )
            .await?;
        match status.as_u16() {
            200..=299 => {}
            412 => {
                return Err(CalendarError::Conflict(format!(
                    "an event already exists at {href}"
                )));
            }
            s => {
                return Err(CalendarError::Rejected {
                    server: self.server(),
                    status: s,
                    why: excerpt(&body),
                });
            }
        }
        let (_, stored) = self.send("GET", self.url(&href)?, &[], None).await?;
        let components = ical::parse(&stored)?;
        expand::as_stored(&components, &target.href)
            .ok_or_else(|| CalendarError::Internal("the stored event has no VEVENT".into()))
    }
}

fn last_segment(href: &str) -> &str {
    href.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// The CalDAV connection test behind ConnectWithCredentials: signs in, finds the principal
/// and the calendar home, and lists the calendars, saying what failed in words a user can act on.
pub async fn test(
    connector: &Connector,
    settings: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, Secret>,
    timeout: Duration,
) -> TestReport {
    let failed = |stage: Stage, message: String| TestReport {
        checks: vec![Check::failed("caldav", stage, message)],
        account_label: None,
    };
    let account = match Settings::new(connector, settings, secrets.get("password").cloned())
        .and_then(|s| Account::new(s, timeout))
    {
        Ok(a) => a,
        Err(e) => return failed(Stage::Config, e.to_string()),
    };
    let server = account.server();
    let discovered = super::deadline(timeout, &server, account.discover()).await;
    match discovered {
        Ok(d) => {
            let names: Vec<_> = d.calendars.iter().map(|c| c.name.as_str()).collect();
            TestReport {
                checks: vec![
                    Check::passed(
                        "caldav",
                        format!(
                            "signed in to {server} as {} (principal {})",
                            account.settings.username, d.principal
                        ),
                    ),
                    Check::passed("calendar_home", format!("calendar home {}", d.home)),
                    Check::passed(
                        "calendars",
                        if names.is_empty() {
                            "no calendar yet".to_string()
                        } else {
                            format!("{} calendar(s): {}", names.len(), names.join(", "))
                        },
                    ),
                ],
                account_label: Some(account.settings.username.clone()),
            }
        }
        Err(CalendarError::AuthRefused { .. }) => failed(
            Stage::Auth,
            format!(
                "{server} refused the username or password: check them (an account with two-factor authentication needs an app password)"
            ),
        ),
        Err(CalendarError::Unreachable { stage, why, .. }) => {
            failed(stage, format!("{server}: {why}"))
        }
        Err(e @ (CalendarError::Malformed { .. } | CalendarError::Rejected { .. })) => failed(
            Stage::Protocol,
            format!("{e}: check that the URL is the CalDAV server's"),
        ),
        Err(e) => failed(Stage::Protocol, e.to_string()),
    }
}
