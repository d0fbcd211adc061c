//! The configuration directory, watched: a settled burst of changes asks for a reload.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::SupervisorError;

/// How long a burst of changes may go on before the reload starts anyway.
const SETTLE_MAX: Duration = Duration::from_millis(100);
/// Quiet time that ends a burst of changes.
const SETTLE_QUIET: Duration = Duration::from_micros(200);

/// Watches `dir` with inotify and asks for a reload (SIGHUP to this process)
/// once a burst of changes has settled. While `dir` cannot be read (the
/// source is unreachable) it is polled every second, and its return reloads.
pub(super) fn watch(dir: &Path, reachable: bool) -> Result<(), SupervisorError> {
    use inotify::{EventMask, Inotify, WatchMask};
    let mask = WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::CREATE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    let dir = dir.to_path_buf();
    let reload = || {
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGHUP);
    };
    // The first watch is in place before this returns, so an edit made once
    // the gateway says it runs is never missed.
    let mut first = Inotify::init()
        .ok()
        .filter(|i| i.watches().add(&dir, mask).is_ok() && dir.is_dir());
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut reachable = reachable;
            let mut buffer = [0u8; 4096];
            loop {
                let mut inotify = if let Some(watching) = first.take() {
                    watching
                } else {
                    let inotify = match Inotify::init() {
                        Ok(i) => i,
                        Err(e) => {
                            tracing::error!(error = %e, "inotify_init failed; reload with SIGHUP");
                            return;
                        }
                    };
                    if inotify.watches().add(&dir, mask).is_err() || !dir.is_dir() {
                        if reachable {
                            tracing::warn!(config = %dir.display(), "configuration source unreachable; checking every second");
                            reachable = false;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    inotify
                };
                if !reachable {
                    tracing::info!(config = %dir.display(), "configuration source readable again");
                    reachable = true;
                    reload();
                }
                loop {
                    let (relevant, gone) = match inotify.read_events_blocking(&mut buffer) {
                        Ok(events) => events.fold((false, false), |(relevant, gone), e| {
                            let lost = e.mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED);
                            let yaml = e.name.map(Path::new).is_some_and(|n| {
                                let hidden = n.to_str().is_none_or(|n| n.starts_with('.'));
                                let ext = n.extension().is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"));
                                ext && !hidden
                            });
                            (relevant || yaml, gone || lost)
                        }),
                        Err(e) => {
                            tracing::error!(error = %e, "watching the configuration directory failed; reload with SIGHUP");
                            return;
                        }
                    };
                    if gone {
                        break;
                    }
                    if !relevant {
                        continue;
                    }
                    // Take the rest of a burst (a deploy writing several files) before reloading.
                    let started = Instant::now();
                    loop {
                        std::thread::sleep(SETTLE_QUIET);
                        let more = inotify.read_events(&mut buffer).is_ok_and(|mut e| e.next().is_some());
                        if !more || started.elapsed() > SETTLE_MAX {
                            break;
                        }
                    }
                    reload();
                }
            }
        })
        .map_err(|source| SupervisorError::Spawn {
            what: "the configuration watcher",
            source,
        })?;
    Ok(())
}
