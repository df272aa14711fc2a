//! PLC adapters: clients that turn PLC data into `Reading`s pushed through the models'
//! `IngestSink`, and carry writes back to the PLC. They know nothing of actors: the runtime
//! hands each one a sink, an event channel and a cancellation token.
//!
//! Shape shared by every protocol (one module each):
//! - a connection config (`config::ConnectionConfig`, one `[[connections]]` entry of the site
//!   config, `protocol = "modbus" | "opcua" | "mqtt"`), validated once into `TagTarget`s;
//! - a task started by `start` that connects, reconnects with `backoff::Backoff`, pushes
//!   batches with `push::push_batch` (waiting, not buffering, while the sink pushes back),
//!   keeps `status::AdapterStatus` counters and reports `status::AdapterEvent`s;
//! - writes arrive as `write::WriteCommand`s on a bounded channel and are answered with the
//!   protocol's own result.

pub mod backoff;
pub mod births;
pub mod browse;
pub mod config;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod push;
pub mod sparkplug;
pub mod status;
pub mod write;

use std::collections::HashSet;
use std::sync::Arc;

use ferrotwin_models::{AssetPath, IngestSink};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use config::{ConfigError, ConnectionConfig, TagKind, TagTarget};
pub use status::{AdapterEvent, AdapterEventKind, AdapterStatus, LinkState, StatusSnapshot};
pub use write::{WriteAck, WriteCommand, WriteError, WriteRequest};

/// Writes waiting for one adapter. At the limit `AdapterHandle::write` answers
/// `WriteError::Busy` at once instead of queueing behind a PLC that is not answering.
pub const MAX_PENDING_WRITES: usize = 64;

/// Adapter events waiting for the runtime. At the limit the adapter waits (it stops
/// polling): events are never dropped.
pub const EVENT_QUEUE: usize = 1024;

/// What an adapter task gets from whoever starts it.
pub struct AdapterIo {
    pub sink: Arc<dyn IngestSink>,
    pub events: mpsc::Sender<AdapterEvent>,
    pub status: Arc<AdapterStatus>,
    pub writes: mpsc::Receiver<WriteCommand>,
    pub token: CancellationToken,
}

/// A running adapter. Dropping the handle does not stop it: cancel the token given to
/// `start`, then await the task from `take_join`.
pub struct AdapterHandle {
    name: String,
    protocol: &'static str,
    endpoint: String,
    targets: Vec<TagTarget>,
    status: Arc<AdapterStatus>,
    writes: mpsc::Sender<WriteCommand>,
    writable: HashSet<(AssetPath, String)>,
    join: Option<JoinHandle<()>>,
}

impl AdapterHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The validated tags of the connection.
    pub fn targets(&self) -> &[TagTarget] {
        &self.targets
    }

    /// The adapter's task (once): it ends after the token given to `start` is cancelled.
    pub fn take_join(&mut self) -> Option<JoinHandle<()>> {
        self.join.take()
    }

    pub fn status(&self) -> &Arc<AdapterStatus> {
        &self.status
    }

    /// Whether this adapter carries writes of `property` of `asset`.
    pub fn writes_to(&self, asset: &AssetPath, property: &str) -> bool {
        self.writable
            .contains(&(asset.clone(), property.to_owned()))
    }

    /// Sends `req` to the PLC and waits for the protocol's answer.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteAck, WriteError> {
        if !self.writes_to(&req.asset, &req.property) {
            return Err(WriteError::NotWritable {
                asset: req.asset,
                property: req.property,
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let span = tracing::info_span!(
            "adapter.write",
            otel.kind = "client",
            ferrotwin.connection = %self.name,
            network.protocol.name = self.protocol,
            server.address = %self.endpoint,
            ferrotwin.asset = %req.asset,
            ferrotwin.property = %req.property,
            ferrotwin.value = %req.value,
            ferrotwin.plc_answer = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let cmd = WriteCommand {
            req,
            reply,
            span: span.clone(),
        };
        match self.writes.try_send(cmd) {
            Ok(()) => {}
            Err(e) => {
                let connection = self.name.clone();
                let refused = Err(match e {
                    mpsc::error::TrySendError::Full(_) => WriteError::Busy { connection },
                    mpsc::error::TrySendError::Closed(_) => WriteError::Stopped { connection },
                });
                write::record_answer(&span, &refused);
                return refused;
            }
        }
        let answer = answer.instrument(span.clone()).await.unwrap_or_else(|_| {
            Err(WriteError::Stopped {
                connection: self.name.clone(),
            })
        });
        write::record_answer(&span, &answer);
        answer
    }
}

/// Validates `config` and starts its adapter task on the current tokio runtime.
pub fn start(
    config: ConnectionConfig,
    sink: Arc<dyn IngestSink>,
    events: mpsc::Sender<AdapterEvent>,
    token: CancellationToken,
) -> Result<AdapterHandle, ConfigError> {
    let targets = config.targets()?;
    let name = config.name().to_owned();
    let protocol = config.protocol();
    let endpoint = config.endpoint();
    let writable = targets
        .iter()
        .filter(|t| t.writable)
        .map(|t| (t.asset.clone(), t.property_name().to_owned()))
        .collect();
    let status = Arc::new(AdapterStatus::new(&name));
    let (writes_tx, writes) = mpsc::channel(MAX_PENDING_WRITES);
    let io = AdapterIo {
        sink,
        events,
        status: Arc::clone(&status),
        writes,
        token,
    };
    let join = spawn_protocol(config, targets.clone(), io);
    Ok(AdapterHandle {
        name,
        protocol,
        endpoint,
        targets,
        status,
        writes: writes_tx,
        writable,
        join: Some(join),
    })
}

/// The one place that matches on the protocol.
fn spawn_protocol(
    config: ConnectionConfig,
    targets: Vec<TagTarget>,
    io: AdapterIo,
) -> JoinHandle<()> {
    match config {
        ConnectionConfig::Modbus(c) => tokio::spawn(modbus::run(c, targets, io)),
        ConnectionConfig::Mqtt(c) => tokio::spawn(mqtt::run(c, targets, io)),
        ConnectionConfig::OpcUa(c) => tokio::spawn(opcua::run(c, targets, io)),
    }
}

/// Whether `host` can name a host: a DNS name (letters, digits, `-`, `.`, `_`; a fully
/// qualified one may end in `.`), an IPv4 address, or an IPv6 address (in brackets or not,
/// a link-local one with its zone, `fe80::1%eth0`). A space or any other character is a
/// typo that would fail every connect attempt, so a config with one is refused at start.
pub(crate) fn valid_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    if let Some((addr, zone)) = bare.split_once('%') {
        return addr.parse::<std::net::Ipv6Addr>().is_ok()
            && !zone.is_empty()
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    }
    let bare = bare.strip_suffix('.').unwrap_or(bare);
    !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The span of one connect attempt of a connection (`adapter.connect`), with its outcome
/// recorded by `connect_outcome`.
pub(crate) fn connect_span(
    connection: &str,
    protocol: &'static str,
    endpoint: &str,
) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "adapter.connect",
        otel.kind = "client",
        ferrotwin.connection = %connection,
        network.protocol.name = protocol,
        server.address = %endpoint,
        ferrotwin.outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// The span of a connection's loss (`adapter.disconnect`): an instant, with the reason, in no
/// trace of its own making (a loss has no caller). The next attempts are `adapter.connect`.
pub(crate) fn disconnect_span(
    connection: &str,
    protocol: &'static str,
    endpoint: &str,
    reason: &str,
) {
    let span = tracing::info_span!(
        parent: None,
        "adapter.disconnect",
        otel.kind = "internal",
        ferrotwin.connection = %connection,
        network.protocol.name = protocol,
        server.address = %endpoint,
        ferrotwin.outcome = %reason,
        otel.status_code = "error",
        error.type = "link_lost",
    );
    drop(span);
}

/// Records a connect attempt's outcome on its span.
pub(crate) fn connect_outcome<T>(span: &tracing::Span, r: &Result<T, String>) {
    match r {
        Ok(_) => {
            span.record("ferrotwin.outcome", "connected");
        }
        Err(why) => {
            span.record("ferrotwin.outcome", why.as_str());
            span.record("otel.status_code", "error");
            span.record("error.type", "connect");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn hosts_as_operators_write_them() {
        for ok in [
            "plc-7.hall2.example.com",
            "plc-7.hall2.example.com.",
            "10.0.4.51",
            "::1",
            "[::1]",
            "fe80::1%eth0",
            "[fe80::1%2]",
            "broker_1",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "plc 7",
            "plc..7",
            ".",
            "fe80::1%",
            "10.0.0.1%eth0",
            "a/b",
            "plc7..",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }
}
