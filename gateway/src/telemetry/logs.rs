//! Log outputs beside stderr: files (plain lines or JSON lines, reopened on
//! `SIGUSR1` so logrotate can move them) and syslog (RFC 5424 over a Unix
//! datagram socket, which journald and rsyslog take). Each output carries the
//! runtime log, the access log, or both.
//!
//! A [`tracing`] layer hands every event to one writer thread through a
//! bounded queue, so a slow disk or a stalled syslog daemon never holds a
//! worker: when the queue is full the line is dropped and counted.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// Lines waiting for the writer thread at most; beyond, lines are dropped.
const QUEUE: usize = 8192;

/// How lines are written to a file or stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `TIMESTAMP LEVEL target: message key=value ...`.
    Plain,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and every field.
    Json,
}

/// Where an output writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// A file, appended to (created 0640 if missing) and reopened on `SIGUSR1`.
    File { path: PathBuf, format: Format },
    /// The process's standard output (the journal, under systemd).
    Stdout { format: Format },
    /// RFC 5424 messages to a Unix datagram socket (`/dev/log`).
    Syslog {
        socket: PathBuf,
        /// Facility number (`daemon` is 3).
        facility: u8,
        app_name: String,
    },
}

/// One configured output and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its name in the configuration.
    pub name: String,
    /// Where it writes.
    pub sink: Sink,
    /// Whether it carries the runtime log.
    pub runtime: bool,
    /// Whether it carries the access log.
    pub access: bool,
}

/// Why an output could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file cannot be opened for appending.
    #[error(
        "log output `{name}`: cannot open {path} for appending: {source}; does its directory exist and may the gateway write there?"
    )]
    File {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The writer thread could not start.
    #[error("the log writer thread did not start: {0}")]
    Thread(#[source] io::Error),
}

/// One event, as the writer thread formats it.
#[derive(Debug)]
struct Record {
    unix_micros: u128,
    level: Level,
    target: String,
    message: String,
    fields: Vec<(&'static str, String)>,
}

enum Msg {
    Record(Record),
    Outputs(Vec<Opened>),
    Reopen,
}

/// The layer's link to its writer thread.
struct Writer {
    tx: SyncSender<Msg>,
}

/// The writer thread's queue, once started (or why it could not start).
static WRITER: OnceLock<Result<Writer, String>> = OnceLock::new();
/// Whether any output is configured: events cost nothing more than this load otherwise.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Lines dropped because the queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines dropped so far because the outputs could not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The [`tracing_subscriber`] layer that feeds the configured outputs.
pub fn layer() -> OutputLayer {
    OutputLayer
}

/// See [`layer`].
#[derive(Debug, Clone, Copy)]
pub struct OutputLayer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for OutputLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if !ACTIVE.load(Ordering::Relaxed) {
            return;
        }
        let Some(Ok(writer)) = WRITER.get() else { return };
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        let record = Record {
            unix_micros: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros()),
            level: *meta.level(),
            target: meta.target().to_owned(),
            message: visitor.message,
            fields: visitor.fields,
        };
        if let Err(TrySendError::Full(_)) = writer.tx.try_send(Msg::Record(record)) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            value.clone_into(&mut self.message);
        } else {
            self.fields.push((field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.push((field.name(), text));
        }
    }
}

/// The outputs in force, so a reload that keeps them reopens nothing.
static IN_FORCE: Mutex<Vec<Output>> = Mutex::new(Vec::new());

/// Puts `outputs` in force (none: only stderr), opening each first; on an
/// error the outputs in force stay as they were.
pub fn configure(outputs: &[Output]) -> Result<(), LogError> {
    let mut in_force = IN_FORCE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *in_force == outputs {
        return Ok(());
    }
    let opened = outputs.iter().map(Opened::open).collect::<Result<Vec<_>, _>>()?;
    let writer = WRITER
        .get_or_init(|| super::spawn_queue("log-outputs", QUEUE, write_loop).map(|tx| Writer { tx }))
        .as_ref()
        .map_err(|e| LogError::Thread(io::Error::other(e.clone())))?;
    ACTIVE.store(!opened.is_empty(), Ordering::Relaxed);
    // The writer thread lives as long as the process: the send cannot fail.
    let _ = writer.tx.send(Msg::Outputs(opened));
    outputs.clone_into(&mut in_force);
    Ok(())
}

/// Reopens every file output (after logrotate moved it) and reconnects syslog.
pub fn reopen() {
    if let Some(Ok(w)) = WRITER.get() {
        let _ = w.tx.send(Msg::Reopen);
    }
}

/// An output with its file or socket open.
struct Opened {
    output: Output,
    file: Option<File>,
    syslog: Option<UnixDatagram>,
}

impl Opened {
    fn open(output: &Output) -> Result<Self, LogError> {
        let mut opened = Self {
            output: output.clone(),
            file: None,
            syslog: None,
        };
        opened.reopen()?;
        Ok(opened)
    }

    fn reopen(&mut self) -> Result<(), LogError> {
        match &self.output.sink {
            Sink::File { path, .. } => {
                self.file = Some(open_append(path).map_err(|source| LogError::File {
                    name: self.output.name.clone(),
                    path: path.clone(),
                    source,
                })?);
            }
            // A syslog daemon that is not there yet is tried again at the next line.
            Sink::Syslog { socket, .. } => self.syslog = connect(socket),
            Sink::Stdout { .. } => {}
        }
        Ok(())
    }

    fn carries(&self, r: &Record) -> bool {
        if r.target == "access" {
            self.output.access
        } else {
            self.output.runtime
        }
    }

    fn write(&mut self, r: &Record, host: &str) {
        let line = |format: &Format| match format {
            Format::Plain => plain(r),
            Format::Json => json(r),
        };
        match &self.output.sink {
            Sink::File { format, .. } => {
                if let Some(f) = &mut self.file {
                    let _ = f.write_all(line(format).as_bytes());
                }
            }
            Sink::Stdout { format } => {
                let _ = io::stdout().lock().write_all(line(format).as_bytes());
            }
            Sink::Syslog {
                socket,
                facility,
                app_name,
            } => {
                let message = rfc5424(r, *facility, host, app_name);
                if self.syslog.is_none() {
                    self.syslog = connect(socket);
                }
                if let Some(s) = &self.syslog
                    && s.send(message.as_bytes()).is_err()
                {
                    // The daemon restarted: the next line connects again.
                    self.syslog = None;
                }
            }
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

fn connect(socket: &Path) -> Option<UnixDatagram> {
    let s = UnixDatagram::unbound().ok()?;
    s.connect(socket).ok()?;
    Some(s)
}

fn write_loop(rx: &Receiver<Msg>) {
    let host = hostname();
    let mut outputs: Vec<Opened> = Vec::new();
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Record(r) => {
                for o in outputs.iter_mut().filter(|o| o.carries(&r)) {
                    o.write(&r, &host);
                }
            }
            Msg::Outputs(new) => outputs = new,
            Msg::Reopen => {
                for o in &mut outputs {
                    if let Err(e) = o.reopen() {
                        // Said on stderr alone: this output is the one that failed.
                        eprintln!("portcullis: {e}");
                    }
                }
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "-".into())
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` for microseconds since the epoch (UTC).
///
/// Written here rather than with a date crate: it is the only date the gateway formats.
fn rfc3339(unix_micros: u128) -> String {
    let secs = u64::try_from(unix_micros / 1_000_000).unwrap_or(0);
    let micros = unix_micros % 1_000_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn plain(r: &Record) -> String {
    let mut line = format!(
        "{} {:>5} {}: {}",
        rfc3339(r.unix_micros),
        r.level,
        r.target,
        r.message
    );
    for (k, v) in &r.fields {
        let _ = write!(line, " {k}={v}");
    }
    line.push('\n');
    line
}

fn json(r: &Record) -> String {
    let mut map = serde_json::Map::new();
    map.insert("timestamp".into(), rfc3339(r.unix_micros).into());
    map.insert("level".into(), r.level.as_str().into());
    map.insert("target".into(), r.target.clone().into());
    if !r.message.is_empty() {
        map.insert("message".into(), r.message.clone().into());
    }
    for (k, v) in &r.fields {
        map.insert((*k).to_owned(), v.clone().into());
    }
    let mut line = serde_json::Value::Object(map).to_string();
    line.push('\n');
    line
}

/// An RFC 5424 message: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG`, the
/// message id `access` or `runtime`.
fn rfc5424(r: &Record, facility: u8, host: &str, app: &str) -> String {
    let severity = match r.level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    };
    let kind = if r.target == "access" { "access" } else { "runtime" };
    let mut msg = format!(
        "<{}>1 {} {host} {app} {} {kind} - {}",
        u16::from(facility) * 8 + severity,
        rfc3339(r.unix_micros),
        std::process::id(),
        r.message
    );
    for (k, v) in &r.fields {
        let _ = write!(msg, " {k}={v}");
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(target: &str) -> Record {
        Record {
            unix_micros: 1_764_745_200_123_456,
            level: Level::WARN,
            target: target.into(),
            message: "endpoint ejected".into(),
            fields: vec![("service", "orders".into()), ("seconds", "10".into())],
        }
    }

    #[test]
    fn each_format_carries_the_time_level_message_and_fields() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        let r = record("portcullis::proxy");
        assert_eq!(
            plain(&r),
            "2025-12-03T07:00:00.123456Z  WARN portcullis::proxy: endpoint ejected service=orders seconds=10\n"
        );
        let j: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(j["level"], "WARN");
        assert_eq!(j["service"], "orders");
        assert_eq!(j["message"], "endpoint ejected");
        assert_eq!(
            rfc5424(&record("access"), 3, "gw1", "portcullis"),
            format!(
                "<28>1 2025-12-03T07:00:00.123456Z gw1 portcullis {} access - endpoint ejected service=orders seconds=10",
                std::process::id()
            )
        );
    }
}
