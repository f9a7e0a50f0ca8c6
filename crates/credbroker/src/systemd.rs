//! The two pieces of systemd integration the daemon needs, without a library: readiness
//! notification (`Type=notify`) and process hardening that a unit file cannot express.

/// Sends `state` (e.g. "READY=1") to `$NOTIFY_SOCKET`, if systemd gave one.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Makes the process non-dumpable and disables core files, so key material cannot leave
/// through a core dump or ptrace by another user.
pub fn harden_process() {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) and setrlimit(RLIMIT_CORE, 0) take plain integer/struct
    // arguments, touch no Rust-managed memory, and are safe to call at any time.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            tracing::warn!("prctl(PR_SET_DUMPABLE) failed");
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            tracing::warn!("setrlimit(RLIMIT_CORE) failed");
        }
    }
}

/// Pings systemd's watchdog at half the interval it asked for (`WatchdogSec=`), from the
/// runtime itself: a wedged runtime stops pinging and systemd restarts the service.
pub fn spawn_watchdog() {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0)
    else {
        return;
    };
    let period = std::time::Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            notify("WATCHDOG=1");
        }
    });
}
