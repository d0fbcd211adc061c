//! The service manager's notification protocol (`sd_notify`): `READY=1` once
//! the gates are held at the NIC and every API instance's policies are
//! applied or gated, `WATCHDOG=1` while every worker runs, `STOPPING=1` when
//! a drain starts. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::runtime::Shared;

/// Sends `state` (`KEY=value` lines) to the service manager, if there is one.
pub(super) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "the service manager was not notified");
    }
}

/// Pings the service manager's watchdog at half its interval while all
/// `workers` are up; a hung or dead worker stops the pings, and systemd
/// restarts the service (XDP keeps the gates meanwhile).
pub(super) fn watchdog(shared: Arc<Shared>, workers: usize) {
    let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p != std::process::id())
    {
        return;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            loop {
                if shared.ready_workers.load(Ordering::Acquire) >= workers {
                    notify("WATCHDOG=1");
                }
                std::thread::sleep(every);
            }
        });
}
