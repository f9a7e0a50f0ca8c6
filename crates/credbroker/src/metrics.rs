//! Process-wide metrics, rendered in the Prometheus text format on the HTTP listener's
//! `/metrics`. A small hand-rolled registry (atomic counters, fixed-bucket histograms) rather
//! than a dependency.
//!
//! Invariant: every label value comes from a closed set chosen here or in the RPC table
//! ([`crate::api::Rpc::metric_label`]): RPC method names, gRPC codes, refresh outcomes,
//! upstream kinds, connection statuses, webhook delivery outcomes. No label ever carries a user
//! id, a connector name, a caller identity or anything derived from a secret.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// Latency buckets in seconds, from 100 µs to 30 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    30.0,
];

/// A histogram over [`LATENCY_BUCKETS`]; the sum is kept in microseconds.
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// How a token refresh ended.
#[derive(Debug, Clone, Copy)]
pub enum Refresh {
    Ok,
    /// Transient failure (network, 5xx, malformed response).
    Failed,
    /// The provider refused the refresh token: the connection is now EXPIRED.
    Expired,
}

/// Why the background refresher refreshed a token.
#[derive(Debug, Clone, Copy)]
pub enum Background {
    /// A recently used connection's token, before it expired.
    Ahead,
    /// An idle connection's grant, before the provider lets it lapse.
    KeepAlive,
}

/// How one webhook delivery attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum Webhook {
    /// The receiver answered 2xx.
    Delivered,
    /// The attempt failed (unreachable, refused, not 2xx): it is retried, unless it was the
    /// last (then [`Webhook::Dropped`] follows).
    Failed,
    /// Given up: still failing past `webhook_max_age_hours`.
    Dropped,
}

/// The upstream services the daemon calls. Mail and calendar code call [`upstream`] with theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Upstream {
    OAuth,
    Smtp,
    Imap,
    CalDav,
}

impl Upstream {
    fn name(self) -> &'static str {
        match self {
            Upstream::OAuth => "oauth",
            Upstream::Smtp => "smtp",
            Upstream::Imap => "imap",
            Upstream::CalDav => "caldav",
        }
    }
}

#[derive(Default)]
struct Registry {
    /// (method, code) → calls.
    rpcs: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    rpc_latency: Mutex<BTreeMap<&'static str, &'static Histogram>>,
    refreshes: [AtomicU64; 3],
    /// Background refreshes by trigger ([`Background`]).
    background_refreshes: [AtomicU64; 2],
    /// OAuth token uses that found no fresh stored token and waited on a refresh.
    token_waits: AtomicU64,
    /// Webhook delivery attempts by outcome ([`Webhook`]).
    webhook_deliveries: [AtomicU64; 3],
    upstream: Mutex<BTreeMap<Upstream, &'static Histogram>>,
    audit_flush: Histogram,
    audit_batch_records: AtomicU64,
    audit_batches: AtomicU64,
    store_sync: Histogram,
    store_sync_waiters: AtomicU64,
    http_connections_refused: AtomicU64,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);

/// Histograms live for the whole process: leaking one per label value (a closed set) lets the
/// hot path observe without holding the map's lock.
fn histogram<K: Ord + Copy>(
    map: &Mutex<BTreeMap<K, &'static Histogram>>,
    key: K,
) -> &'static Histogram {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(key).or_insert_with(|| Box::leak(Box::default()))
}

/// One finished RPC, labelled from the RPC table.
pub fn rpc(rpc: crate::api::Rpc, code: tonic::Code, elapsed: Duration) {
    count_rpc(rpc.metric_label(), code, elapsed);
}

fn count_rpc(method: &'static str, code: tonic::Code, elapsed: Duration) {
    *REGISTRY
        .rpcs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((method, code_name(code)))
        .or_default() += 1;
    histogram(&REGISTRY.rpc_latency, method).observe(elapsed);
}

/// One OAuth token refresh.
pub fn refresh(outcome: Refresh) {
    REGISTRY.refreshes[outcome as usize].fetch_add(1, Ordering::Relaxed);
}

/// One refresh the background refresher made (counted in [`refresh`] too, by outcome).
pub fn background_refresh(trigger: Background) {
    REGISTRY.background_refreshes[trigger as usize].fetch_add(1, Ordering::Relaxed);
}

/// One use of an OAuth token (a resolve, mail, calendar) that waited on the token endpoint.
pub fn token_wait() {
    REGISTRY.token_waits.fetch_add(1, Ordering::Relaxed);
}

/// One webhook delivery attempt (or the end of its retries).
pub fn webhook(outcome: Webhook) {
    REGISTRY.webhook_deliveries[outcome as usize].fetch_add(1, Ordering::Relaxed);
}

/// One call to an upstream server, however it ended.
pub fn upstream(kind: Upstream, elapsed: Duration) {
    histogram(&REGISTRY.upstream, kind).observe(elapsed);
}

/// One audit batch made durable.
pub fn audit_flush(records: usize, elapsed: Duration) {
    REGISTRY.audit_flush.observe(elapsed);
    REGISTRY
        .audit_batch_records
        .fetch_add(records as u64, Ordering::Relaxed);
    REGISTRY.audit_batches.fetch_add(1, Ordering::Relaxed);
}

/// One group-commit sync of the store, covering `waiters` commits.
pub fn store_sync(waiters: usize, elapsed: Duration) {
    REGISTRY.store_sync.observe(elapsed);
    REGISTRY
        .store_sync_waiters
        .fetch_add(waiters as u64, Ordering::Relaxed);
}

/// One HTTPS connection closed at accept because the listener held its maximum.
pub fn http_connection_refused() {
    REGISTRY
        .http_connections_refused
        .fetch_add(1, Ordering::Relaxed);
}

/// Values read at scrape time from the running daemon.
#[derive(Debug, Default)]
pub struct Gauges {
    pub audit_queue_depth: usize,
    /// Status name ("connected", "expired"…) → connections.
    pub connections: BTreeMap<&'static str, u64>,
    pub key_term: u32,
    pub key_term_encryptions: u64,
    pub store_free_bytes: u64,
}

/// The Prometheus text exposition of everything above.
pub fn render(gauges: &Gauges) -> String {
    let mut out = Exposition(String::with_capacity(8192));
    render_calls(&mut out);
    render_state(&mut out, gauges);
    out.0
}

/// Prometheus text being written: each series is announced by its HELP and TYPE lines.
struct Exposition(String);

impl Exposition {
    fn help(&mut self, name: &str, kind: &str, text: &str) {
        let _ = writeln!(self.0, "# HELP {name} {text}\n# TYPE {name} {kind}");
    }

    /// A series with one unlabelled value.
    fn scalar(&mut self, name: &str, kind: &str, text: &str, value: impl std::fmt::Display) {
        self.help(name, kind, text);
        let _ = writeln!(self.0, "{name} {value}");
    }

    /// A counter with one label, a value per label value (in the same order).
    fn counters(
        &mut self,
        name: &str,
        text: &str,
        (label, values): (&str, &[&str]),
        counts: &[AtomicU64],
    ) {
        self.help(name, "counter", text);
        for (value, n) in values.iter().zip(counts) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(self.0, "{name}{{{label}=\"{value}\"}} {n}");
        }
    }

    fn histogram(&mut self, name: &str, text: &str, h: &Histogram, labels: &str) {
        self.help(name, "histogram", text);
        h.render(&mut self.0, name, labels);
    }
}

/// What callers asked and what the broker asked upstream.
fn render_calls(out: &mut Exposition) {
    let r = &*REGISTRY;
    out.help(
        "credbroker_rpc_total",
        "counter",
        "gRPC calls by method and status code.",
    );
    for ((method, code), n) in r.rpcs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            out.0,
            "credbroker_rpc_total{{method=\"{method}\",code=\"{code}\"}} {n}"
        );
    }
    let name = "credbroker_rpc_duration_seconds";
    out.help(
        name,
        "histogram",
        "gRPC call latency by method, audit write included.",
    );
    for (method, h) in r
        .rpc_latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        h.render(&mut out.0, name, &format!("method=\"{method}\""));
    }
    out.counters(
        "credbroker_token_refresh_total",
        "OAuth token refreshes by outcome.",
        ("outcome", &["ok", "failed", "expired"]),
        &r.refreshes,
    );
    out.counters(
        "credbroker_token_refresh_background_total",
        "OAuth token refreshes the background refresher attempted, by trigger.",
        ("trigger", &["ahead", "keepalive"]),
        &r.background_refreshes,
    );
    out.scalar(
        "credbroker_token_waits_total",
        "counter",
        "OAuth token uses (resolve, mail, calendar) that found no fresh token and waited on a refresh.",
        r.token_waits.load(Ordering::Relaxed),
    );
    out.counters(
        "credbroker_webhook_deliveries_total",
        "Webhook delivery attempts by outcome (dropped: given up past webhook_max_age_hours).",
        ("outcome", &["delivered", "failed", "dropped"]),
        &r.webhook_deliveries,
    );
    let name = "credbroker_upstream_duration_seconds";
    out.help(
        name,
        "histogram",
        "Latency of calls to upstream servers (OAuth, SMTP, IMAP, CalDAV).",
    );
    for (kind, h) in r.upstream.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        h.render(&mut out.0, name, &format!("kind=\"{}\"", kind.name()));
    }
}

/// The broker's own state: connections, audit log, listener, store and keys.
fn render_state(out: &mut Exposition, gauges: &Gauges) {
    let r = &*REGISTRY;
    out.help("credbroker_connections", "gauge", "Connections by status.");
    for (status, n) in &gauges.connections {
        let _ = writeln!(out.0, "credbroker_connections{{status=\"{status}\"}} {n}");
    }
    out.scalar(
        "credbroker_audit_queue_depth",
        "gauge",
        "Audit events waiting to be written.",
        gauges.audit_queue_depth,
    );
    out.histogram(
        "credbroker_audit_flush_duration_seconds",
        "Time to make one audit batch durable.",
        &r.audit_flush,
        "",
    );
    out.scalar(
        "credbroker_audit_records_total",
        "counter",
        "Audit records written.",
        r.audit_batch_records.load(Ordering::Relaxed),
    );
    out.scalar(
        "credbroker_http_connections_refused_total",
        "counter",
        "HTTPS connections closed at accept because [http] max_connections were open.",
        r.http_connections_refused.load(Ordering::Relaxed),
    );
    out.histogram(
        "credbroker_store_sync_duration_seconds",
        "Duration of one group-commit sync (fsync) of the store.",
        &r.store_sync,
        "",
    );
    out.scalar(
        "credbroker_store_sync_commits_total",
        "counter",
        "Commits made durable by group-commit syncs (divide by the sync count for the group size).",
        r.store_sync_waiters.load(Ordering::Relaxed),
    );
    out.scalar(
        "credbroker_store_free_bytes",
        "gauge",
        "Bytes free on the store's disk (checked every 30 s; 0 before the first check).",
        gauges.store_free_bytes,
    );
    out.scalar(
        "credbroker_key_term",
        "gauge",
        "Current data-key term.",
        gauges.key_term,
    );
    out.scalar(
        "credbroker_key_term_encryptions",
        "gauge",
        "Encryptions counted under the current term (rotation happens well before 2^32).",
        gauges.key_term_encryptions,
    );
}

/// The gRPC code as its canonical upper-case name.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn rpc_counts_by_method_and_code() {
        count_rpc(
            "UnitTestMethod",
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        count_rpc(
            "UnitTestMethod",
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        let text = render(&Gauges::default());
        assert!(
            text.contains("credbroker_rpc_total{method=\"UnitTestMethod\",code=\"NOT_FOUND\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("credbroker_rpc_duration_seconds_count{method=\"UnitTestMethod\"} 2\n")
        );
    }
}
