//! OPC UA client adapter (async-opcua): one session per connection, one subscription with a
//! monitored item per reading tag; data changes become `Reading`s with the server's source
//! timestamps and qualities from the status codes; writes go out as OPC UA Write of the
//! variable's own data type.
//!
//! Reconnects are ours, not the crate's: the crate's event loop can reconnect and recreate
//! subscriptions by itself, but then hides which monitored items failed again and what the
//! link did meanwhile. So the first `ConnectionLost` / `ReconnectFailed` ends the session; we
//! report it (Bad readings with the last values, `Disconnected`), wait with `Backoff` and
//! build a new session, subscription and monitored items, reporting each item's result.
//!
//! Push-back: the crate calls our subscription callback while its event loop is polled; the
//! callback only appends to a buffer, and the task polling the loop hands the buffer over on a
//! channel of `LOOP_QUEUE` before polling again. While the sink pushes back, that channel is
//! full, the loop is not polled, no Publish requests go out, and the server holds (and, past
//! its queues, coalesces) the changes: nothing piles up here. Writes travel over the same
//! event loop, so during a long push-back they wait too and answer `Timeout` after
//! `timeout_ms`.
//!
//! Security: `none`, or `basic256sha256` with `sign` / `sign_and_encrypt`, the client's
//! certificate and key, and a PKI folder; the server's certificate must be in
//! `pki_dir/trusted` unless `trust_server_cert = true`. `security_policy` has no default: a
//! connection without message security says so (`"none"`). The identity is anonymous, or a
//! user name token (`user = { name = "ft", password_file = "/run/secrets/ua" }`), or an X.509
//! user token (`user = { cert = "user.der", key = "user-key.pem" }`).
//!
//! Config, one `[[connections]]` entry:
//! ```toml
//! [[connections]]
//! protocol = "opcua"
//! name = "berlin-opcua"
//! endpoint = "opc.tcp://127.0.0.1:4840/"
//! security_policy = "none"          # or "basic256sha256" with security_mode, client_cert,
//!                                   # client_key (under pki_dir), pki_dir (relative: to
//!                                   # the config file's folder)
//! publishing_interval_ms = 100
//! sampling_interval_ms = 100
//! deadband = 0.05                   # absolute, optional
//! timeout_ms = 5000
//! [[connections.tags]]
//! node_id = "ns=2;s=acme/berlin/assembly/line-1/press-1/temp/value"
//! asset = "acme/berlin/assembly/line-1/press-1/temp"
//! property = "value"
//! [[connections.tags]]
//! node_id = "ns=2;s=acme/berlin/assembly/line-1/press-1/speed_setpoint_pct"
//! asset = "acme/berlin/assembly/line-1/press-1"
//! property = "speed_setpoint_pct"
//! writable = true
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_models::{Property, Quality, QualityReason, Reading, Timestamp, Value};
use opcua::client::transport::TcpConnector;
use opcua::client::{
    ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore, Session,
    SessionEventLoop, SessionPollResult,
};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DataTypeId,
    DataValue, DateTime, DeadbandType, ExtensionObject, MessageSecurityMode,
    MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId, NotificationMessage,
    NumericRange, ReadValueId, StatusChangeNotification, StatusCode, TimestampsToReturn, Variant,
    WriteValue,
};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::AdapterIo;
use crate::backoff::Backoff;
use crate::config::{ConfigError, TagTarget, check_connection};
use crate::push::push_batch;
use crate::status::{AdapterEvent, AdapterEventKind, AdapterStatus, LinkState};
use crate::write::{WriteAck, WriteCommand, WriteError};
use tracing::Instrument as _;

/// Batches of data changes between the task polling the session and the adapter. Small: a
/// full queue is how push-back reaches the server (see the module doc).
const LOOP_QUEUE: usize = 2;

/// Notifications per Publish response, so one response (what the buffer holds at most
/// between two polls) stays bounded. 1000 is also the array length a default async-opcua
/// peer decodes: more in one response and its decoder fails the whole connection.
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 1000;

/// Decoding limits of our side: the crate's defaults (arrays of 1000, messages of 320 KiB)
/// are below what a Browse, Read or create result of a large server can be.
const MAX_ARRAY_LENGTH: usize = 100_000;
const MAX_MESSAGE_SIZE: usize = 16 << 20;
const MAX_CHUNK_COUNT: usize = 256;

/// How long the server keeps a session we lost without closing it (the link died): short,
/// so that a flapping link does not fill the server's session table with orphans.
const SESSION_TIMEOUT_MS: u32 = 30_000;

/// Monitored items per CreateMonitoredItems call: async-opcua servers refuse more by default
/// (`max_monitored_items_per_call`), and other servers' limits are rarely lower.
const ITEMS_PER_CALL: usize = 1000;

/// Values a server keeps per monitored item between two publishes. 10 is async-opcua's
/// maximum; a sensor sampling faster than the publishing interval keeps its history.
const QUEUE_SIZE: u32 = 10;

/// Keep-alive counts of the subscription: a keep-alive message after 10 empty publishing
/// intervals; the server drops the subscription after 600 intervals (a minute at 100 ms)
/// without Publish requests, generous so that a long push-back does not cost it.
const KEEP_ALIVE_COUNT: u32 = 10;
const LIFETIME_COUNT: u32 = 600;

/// Session keep-alive reads fail this many times in a row before the link counts as lost
/// (a server that vanished without closing the socket).
const MAX_FAILED_KEEP_ALIVES: u64 = 3;

const RECONNECT_BASE_MS: u64 = 250;
const RECONNECT_MAX_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SecurityPolicyName {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "basic256sha256")]
    Basic256Sha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityModeName {
    Sign,
    SignAndEncrypt,
}

mod defaults {
    pub fn publishing_interval_ms() -> u64 {
        100
    }
    pub fn sampling_interval_ms() -> u64 {
        100
    }
    pub fn timeout_ms() -> u64 {
        5000
    }
    pub fn property() -> String {
        "value".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaConfig {
    pub name: String,
    /// `opc.tcp://HOST:PORT/PATH`
    pub endpoint: String,
    /// `"none"` or `"basic256sha256"`: required, so no connection runs without message
    /// security unless its config names it.
    #[serde(default)]
    pub security_policy: Option<SecurityPolicyName>,
    /// The user the session activates as (default: anonymous).
    #[serde(default)]
    pub user: Option<OpcUaUser>,
    /// Required with `basic256sha256`, refused with `none`.
    pub security_mode: Option<SecurityModeName>,
    /// Client certificate (DER) and private key (PEM) for `basic256sha256`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Where trusted and rejected server certificates live (`trusted/`, `rejected/`).
    /// Required with `basic256sha256`; with `none` the crate still opens one (default: a
    /// folder under the system temp dir).
    pub pki_dir: Option<PathBuf>,
    /// Trust a server certificate that is not in `pki_dir/trusted` (tests, commissioning).
    #[serde(default)]
    pub trust_server_cert: bool,
    #[serde(default = "defaults::publishing_interval_ms")]
    pub publishing_interval_ms: u64,
    #[serde(default = "defaults::sampling_interval_ms")]
    pub sampling_interval_ms: u64,
    /// Absolute deadband: a value moving less than this since the last one reported is not
    /// reported (so a flat value then sends nothing and its twin turns stale; without a
    /// deadband every new sample is reported, changed or not).
    pub deadband: Option<f64>,
    /// Per request (connect, create, write); keep-alives every `timeout_ms` too.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub tags: Vec<OpcUaTag>,
}

/// `user = { name, password_file | password }` or `user = { cert, key }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaUser {
    #[serde(default)]
    pub name: Option<String>,
    /// The password in the config (prefer `password_file`). Never logged.
    #[serde(default)]
    pub password: Option<crate::mqtt::Secret>,
    /// A file holding the password (a mounted secret), read at each connect.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An X.509 user certificate (DER or PEM) and its private key (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl OpcUaUser {
    fn check(&self) -> Result<(), String> {
        let named = self.name.is_some() || self.password.is_some() || self.password_file.is_some();
        let certified = self.cert.is_some() || self.key.is_some();
        match (named, certified) {
            (true, true) => Err("user: a user name or a certificate, not both".into()),
            (true, false) if self.name.is_none() => Err("user: password without name".into()),
            (true, false) if self.password.is_some() == self.password_file.is_some() => {
                Err("user: give password_file (or password), one of them".into())
            }
            (false, true) if self.cert.is_none() || self.key.is_none() => {
                Err("user: give both cert and key".into())
            }
            (false, false) => Err("user: give name and password_file, or cert and key".into()),
            _ => Ok(()),
        }
    }

    /// The session's identity token (files read now).
    fn token(&self) -> Result<IdentityToken, String> {
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            return IdentityToken::new_x509_path(c, k)
                .map_err(|e| format!("user certificate {}: {e}", c.display()));
        }
        let name = self.name.clone().unwrap_or_default();
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => p.0.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| format!("password_file {}: {e}", f.display()))?
                .trim_end()
                .to_owned(),
            (None, None) => String::new(),
        };
        Ok(IdentityToken::new_user_name(name, password))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaTag {
    /// `ns=2;s=...`, `ns=3;i=1001`, ...
    pub node_id: String,
    pub asset: String,
    #[serde(default = "defaults::property")]
    pub property: String,
    #[serde(default)]
    pub writable: bool,
}

impl OpcUaConfig {
    /// Makes the connection's file paths (PKI folder, the user's password file, certificate
    /// and key) relative to `base` (the config file's folder). `client_cert` and
    /// `client_key` stay as written: relative ones are under `pki_dir`, as async-opcua
    /// reads them.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let user = self.user.as_mut();
        let paths = std::iter::once(self.pki_dir.as_mut()).chain(
            user.into_iter()
                .flat_map(|u| [u.password_file.as_mut(), u.cert.as_mut(), u.key.as_mut()]),
        );
        for p in paths.flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Every tag's target, after checking the connection settings and node ids.
    pub fn targets(&self) -> Result<Vec<TagTarget>, ConfigError> {
        let conn = |what: String| ConfigError::Connection {
            connection: self.name.clone(),
            what,
        };
        let host_ok = self
            .endpoint
            .strip_prefix("opc.tcp://")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(opc_host_port_ok);
        if !host_ok || self.endpoint.contains(char::is_whitespace) {
            return Err(conn(format!(
                "endpoint {:?} is not an opc.tcp://HOST:PORT/ URL",
                self.endpoint
            )));
        }
        if let Some(u) = &self.user {
            u.check().map_err(conn)?;
        }
        match self.security_policy.ok_or_else(|| {
            conn(
                "security_policy: name it, \"basic256sha256\" (with security_mode) or \"none\" (no message security)"
                    .into(),
            )
        })? {
            SecurityPolicyName::None => {
                if self.security_mode.is_some() {
                    return Err(conn(
                        "security_mode needs security_policy = \"basic256sha256\"".into(),
                    ));
                }
            }
            SecurityPolicyName::Basic256Sha256 => {
                let missing: Vec<&str> = [
                    ("security_mode", self.security_mode.is_none()),
                    ("client_cert", self.client_cert.is_none()),
                    ("client_key", self.client_key.is_none()),
                    ("pki_dir", self.pki_dir.is_none()),
                ]
                .into_iter()
                .filter_map(|(k, m)| m.then_some(k))
                .collect();
                if !missing.is_empty() {
                    return Err(conn(format!(
                        "security_policy \"basic256sha256\" needs {}",
                        missing.join(", ")
                    )));
                }
                // Unreadable files are named here (async-opcua's own complaints are not
                // logged: see the CLI's `logging::default_filter`).
                // (async-opcua reads relative paths under `pki_dir`.)
                for (key, path) in [
                    ("client_cert", &self.client_cert),
                    ("client_key", &self.client_key),
                ] {
                    if let (Some(path), Some(pki)) = (path, &self.pki_dir) {
                        let at = pki.join(path);
                        if let Err(e) = std::fs::File::open(&at) {
                            return Err(conn(format!(
                                "{key} {} (under pki_dir when relative): {e}",
                                at.display()
                            )));
                        }
                    }
                }
            }
        }
        if self.publishing_interval_ms == 0 || self.timeout_ms == 0 {
            return Err(conn(
                "publishing_interval_ms and timeout_ms must be > 0".into(),
            ));
        }
        if let Some(d) = self.deadband
            && !(d.is_finite() && d >= 0.0)
        {
            return Err(conn(format!("deadband {d} is not a finite number >= 0")));
        }
        let mut targets = Vec::with_capacity(self.tags.len());
        for t in &self.tags {
            if let Err(code) = NodeId::from_str(&t.node_id) {
                return Err(ConfigError::Tag {
                    connection: self.name.clone(),
                    tag: t.node_id.clone(),
                    what: format!("not an OPC UA node id (ns=N;s=... or ns=N;i=...): {code}"),
                });
            }
            targets.push(TagTarget::parse(
                &self.name,
                &t.node_id,
                &t.asset,
                &t.property,
                t.writable,
            )?);
        }
        check_connection(&self.name, &targets)?;
        Ok(targets)
    }
}

/// One configured tag, resolved.
struct Tag {
    node: NodeId,
    /// As configured (events name it).
    address: String,
    target: TagTarget,
}

/// Why a session ended.
enum SessionEnd {
    Cancelled,
    SinkClosed,
    Lost(String),
}

/// What the task polling the session tells the adapter.
enum LoopEvent {
    Connected,
    Data(Vec<(u32, DataValue)>),
    /// The server ended the subscription (e.g. its lifetime ran out).
    SubscriptionEnded(StatusCode),
    Lost(String),
}

/// Filled by the subscription callback, emptied by the task polling the session.
#[derive(Default)]
struct Inbox {
    values: Vec<(u32, DataValue)>,
    ended: Option<StatusCode>,
}

struct Notifications(Arc<Mutex<Inbox>>);

impl OnSubscriptionNotificationCore for Notifications {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        let mut inbox = self.0.lock().expect("inbox lock is never poisoned");
        for obj in notification.notification_data.into_iter().flatten() {
            if let Some(change) = obj.inner_as::<DataChangeNotification>() {
                for item in change.monitored_items.iter().flatten() {
                    inbox.values.push((item.client_handle, item.value.clone()));
                }
            } else if let Some(status) = obj.inner_as::<StatusChangeNotification>() {
                inbox.ended = Some(status.status);
            }
        }
    }
}

/// The adapter task: connects, subscribes, pushes, reconnects, until `io.token` is cancelled.
pub async fn run(config: OpcUaConfig, targets: Vec<TagTarget>, io: AdapterIo) {
    let AdapterIo {
        sink,
        events,
        status,
        writes,
        token,
    } = io;
    let tags: Arc<Vec<Tag>> = Arc::new(
        config
            .tags
            .iter()
            .zip(targets)
            .map(|(t, target)| Tag {
                // `targets` checked every node id; a null one would only fail its tag.
                node: NodeId::from_str(&t.node_id).unwrap_or_else(|_| NodeId::null()),
                address: t.node_id.clone(),
                target,
            })
            .collect(),
    );
    let (session_tx, session_rx) = watch::channel(None::<Arc<Session>>);
    // Its own token: the writer also stops when this task ends for another reason.
    let writer_token = token.child_token();
    let writer = tokio::spawn(serve_writes(
        config.clone(),
        Arc::clone(&tags),
        writes,
        session_rx,
        Arc::clone(&status),
        events.clone(),
        writer_token.clone(),
    ));
    let mut state = TagState::new(tags.len());
    let mut backoff = Backoff::new(RECONNECT_BASE_MS, RECONNECT_MAX_MS);
    let ctx = Ctx {
        config: &config,
        tags: &tags,
        sink: &*sink,
        events: &events,
        status: &status,
        token: &token,
    };
    loop {
        status.set_link(LinkState::Connecting, None);
        let span = crate::connect_span(&config.name, "opcua", &config.endpoint);
        let connected = ctx.connect().instrument(span.clone()).await;
        crate::connect_outcome(&span, &connected);
        drop(span);
        let end = match connected {
            Ok((session, event_loop)) => {
                let end = ctx
                    .serve_session(&session, event_loop, &mut state, &mut backoff, &session_tx)
                    .await;
                session_tx.send_replace(None);
                end
            }
            Err(e) => SessionEnd::Lost(e),
        };
        let reason = match end {
            SessionEnd::Cancelled | SessionEnd::SinkClosed => break,
            SessionEnd::Lost(reason) => reason,
        };
        AdapterStatus::add(&status.errors, 1);
        status.set_link(LinkState::Disconnected, Some(reason.clone()));
        if state.connected {
            state.connected = false;
            tracing::warn!(connection = %config.name, error = %reason, "opc ua link lost");
            crate::disconnect_span(&config.name, "opcua", &config.endpoint, &reason);
            ctx.event(None, AdapterEventKind::Disconnected { reason })
                .await;
            // Twins turn Bad until values flow again.
            let now = Timestamp::now();
            let batch = state.comm_failure_readings(&tags, now);
            if !batch.is_empty() && push_batch(&*sink, batch, &token).await.is_err() {
                break;
            }
        }
        tokio::select! {
            () = token.cancelled() => break,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    status.set_link(LinkState::Stopped, None);
    writer_token.cancel();
    let _ = writer.await;
}

/// A session of `c` and its (not yet polled) event loop; `Err` says why not. The
/// adapter's connect, and `browse`'s.
pub(crate) async fn open_session(
    c: &OpcUaConfig,
) -> Result<(Arc<Session>, SessionEventLoop<TcpConnector>), String> {
    let timeout = Duration::from_millis(c.timeout_ms);
    let mut builder = ClientBuilder::new()
        .application_name(format!("ferrotwin {}", c.name))
        .application_uri(format!("urn:ferrotwin:adapter:{}", c.name))
        .product_uri("urn:ferrotwin")
        .pki_dir(
            c.pki_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("ferrotwin-opcua-pki")),
        )
        .create_sample_keypair(false)
        .trust_server_certs(c.trust_server_cert)
        .request_timeout(timeout)
        .keep_alive_interval(timeout.max(Duration::from_secs(1)))
        .max_failed_keep_alive_count(MAX_FAILED_KEEP_ALIVES)
        .session_timeout(SESSION_TIMEOUT_MS)
        .max_array_length(MAX_ARRAY_LENGTH)
        .max_message_size(MAX_MESSAGE_SIZE)
        .max_chunk_count(MAX_CHUNK_COUNT)
        // Reconnects are ours (module doc): the crate gives up at once.
        .session_retry_limit(0);
    if let (Some(cert), Some(key)) = (&c.client_cert, &c.client_key) {
        builder = builder.certificate_path(cert).private_key_path(key);
    }
    let mut client = builder
        .client()
        .map_err(|errors| format!("client configuration refused: {}", errors.join("; ")))?;
    let identity = match &c.user {
        Some(u) => u.token()?,
        None => IdentityToken::Anonymous,
    };
    let (policy, mode) = match (c.security_policy.unwrap_or_default(), c.security_mode) {
        (SecurityPolicyName::None, _) => (SecurityPolicy::None, MessageSecurityMode::None),
        (SecurityPolicyName::Basic256Sha256, Some(SecurityModeName::Sign)) => {
            (SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign)
        }
        (SecurityPolicyName::Basic256Sha256, _) => (
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
        ),
    };
    let endpoint = (c.endpoint.as_str(), policy.to_str(), mode);
    match tokio::time::timeout(
        timeout,
        client.connect_to_matching_endpoint(endpoint, identity),
    )
    .await
    {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(format!("{}: {e}", c.endpoint)),
        Err(_) => Err(format!(
            "{}: no answer within {} ms",
            c.endpoint, c.timeout_ms
        )),
    }
}

/// What the per-tag bookkeeping of a connection holds across sessions.
struct TagState {
    last: Vec<Option<Value>>,
    failed: Vec<bool>,
    /// A session was up since the last `Disconnected` (so the next loss is reported once).
    connected: bool,
}

impl TagState {
    fn new(n: usize) -> TagState {
        TagState {
            last: vec![None; n],
            failed: vec![false; n],
            connected: false,
        }
    }

    /// One Bad (communication failure) reading per tag that had a value: the last value,
    /// stamped now.
    fn comm_failure_readings(&self, tags: &[Tag], now: Timestamp) -> Vec<Reading> {
        tags.iter()
            .zip(&self.last)
            .filter_map(|(t, last)| {
                Some(Reading {
                    asset: t.target.asset.id(),
                    property: t.target.reading_property()?,
                    value: (*last)?,
                    quality: Quality::bad(QualityReason::CommFailure),
                    source_ts: now,
                })
            })
            .collect()
    }
}

/// What every step of the adapter task needs.
struct Ctx<'a> {
    config: &'a OpcUaConfig,
    tags: &'a [Tag],
    sink: &'a dyn ferrotwin_models::IngestSink,
    events: &'a mpsc::Sender<AdapterEvent>,
    status: &'a AdapterStatus,
    token: &'a CancellationToken,
}

impl Ctx<'_> {
    async fn event(&self, tag: Option<usize>, kind: AdapterEventKind) {
        let asset = tag.map(|i| self.tags[i].target.asset.clone());
        send_event(self.events, &self.config.name, asset, kind).await;
    }

    async fn connect(&self) -> Result<(Arc<Session>, SessionEventLoop<TcpConnector>), String> {
        open_session(self.config).await
    }

    /// Runs one session until it is lost or the adapter is cancelled.
    async fn serve_session(
        &self,
        session: &Arc<Session>,
        event_loop: SessionEventLoop<TcpConnector>,
        state: &mut TagState,
        backoff: &mut Backoff,
        session_tx: &watch::Sender<Option<Arc<Session>>>,
    ) -> SessionEnd {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let (loop_tx, mut loop_rx) = mpsc::channel(LOOP_QUEUE);
        let driver = tokio::spawn(drive(event_loop, Arc::clone(&inbox), loop_tx));
        let _abort = AbortOnDrop(driver);
        // Until the session is up nothing else happens.
        let up = tokio::select! {
            () = self.token.cancelled() => return SessionEnd::Cancelled,
            ev = loop_rx.recv() => ev,
        };
        match up {
            Some(LoopEvent::Connected) => {}
            Some(LoopEvent::Lost(reason)) => return SessionEnd::Lost(reason),
            _ => return SessionEnd::Lost("session ended before it connected".into()),
        }
        AdapterStatus::add(&self.status.connects, 1);
        self.status.set_link(LinkState::Connected, None);
        backoff.reset();
        state.connected = true;
        session_tx.send_replace(Some(Arc::clone(session)));
        tracing::info!(connection = %self.config.name, endpoint = %self.config.endpoint, "opc ua connected");
        self.event(
            None,
            AdapterEventKind::Connected {
                endpoint: self.config.endpoint.clone(),
            },
        )
        .await;
        let setup = self.subscribe(session, Arc::clone(&inbox));
        tokio::pin!(setup);
        let mut subscribed = false;
        let end = loop {
            tokio::select! {
                () = self.token.cancelled() => break SessionEnd::Cancelled,
                created = &mut setup, if !subscribed => {
                    subscribed = true;
                    match created {
                        Ok(results) => {
                            if let Err(end) = self.apply_create_results(results, state).await {
                                break end;
                            }
                        }
                        Err(e) => break SessionEnd::Lost(e),
                    }
                }
                ev = loop_rx.recv() => match ev {
                    Some(LoopEvent::Data(values)) => {
                        if let Err(end) = self.apply_values(values, state).await {
                            break end;
                        }
                    }
                    Some(LoopEvent::SubscriptionEnded(code)) => {
                        break SessionEnd::Lost(format!("the server ended the subscription: {code}"));
                    }
                    Some(LoopEvent::Lost(reason)) => break SessionEnd::Lost(reason),
                    Some(LoopEvent::Connected) => {}
                    None => break SessionEnd::Lost("session event loop ended".into()),
                }
            }
        };
        if matches!(end, SessionEnd::Cancelled) {
            // Polite close while the event loop still runs; a dead server does not hold us.
            let _ = tokio::time::timeout(
                Duration::from_millis(self.config.timeout_ms),
                session.disconnect(),
            )
            .await;
        }
        end
    }

    /// Creates the subscription and a monitored item per reading tag; returns each tag's
    /// result.
    async fn subscribe(
        &self,
        session: &Session,
        inbox: Arc<Mutex<Inbox>>,
    ) -> Result<Vec<(usize, StatusCode)>, String> {
        let c = self.config;
        let sub = session
            .create_subscription(
                Duration::from_millis(c.publishing_interval_ms),
                LIFETIME_COUNT,
                KEEP_ALIVE_COUNT,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                Notifications(inbox),
            )
            .await
            .map_err(|e| format!("cannot create the subscription: {e}"))?;
        let filter = match c.deadband {
            Some(d) => ExtensionObject::from_message(DataChangeFilter {
                trigger: DataChangeTrigger::StatusValue,
                deadband_type: DeadbandType::Absolute as u32,
                deadband_value: d,
            }),
            // Every new sample, even of an unchanged value: the server's source timestamp
            // moving is what tells the twin its sensor is alive (a twin turns stale after
            // its period × N without a reading; a flat value is not a dead sensor).
            None => ExtensionObject::from_message(DataChangeFilter {
                trigger: DataChangeTrigger::StatusValueTimestamp,
                deadband_type: DeadbandType::None as u32,
                deadband_value: 0.0,
            }),
        };
        let items: Vec<(usize, MonitoredItemCreateRequest)> = self
            .tags
            .iter()
            .enumerate()
            .filter(|(_, t)| t.target.reading_property().is_some())
            .map(|(i, t)| {
                (
                    i,
                    MonitoredItemCreateRequest {
                        item_to_monitor: ReadValueId::new_value(t.node.clone()),
                        monitoring_mode: MonitoringMode::Reporting,
                        requested_parameters: MonitoringParameters {
                            client_handle: handle_of(i),
                            sampling_interval: c.sampling_interval_ms as f64,
                            filter: filter.clone(),
                            queue_size: QUEUE_SIZE,
                            discard_oldest: true,
                        },
                    },
                )
            })
            .collect();
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(ITEMS_PER_CALL) {
            let created = session
                .create_monitored_items(
                    sub,
                    TimestampsToReturn::Both,
                    chunk.iter().map(|(_, r)| r.clone()).collect(),
                )
                .await
                .map_err(|e| format!("cannot create monitored items: {e}"))?;
            for ((i, _), r) in chunk.iter().zip(created) {
                results.push((*i, r.result.status_code));
            }
        }
        Ok(results)
    }

    /// Reports tags the server refused to monitor (`TagFailed`, counted, a Bad reading with
    /// the last value if there was one). Servers may also accept the item and send a Bad
    /// value instead (async-opcua does for an unknown node): `apply_values` handles those
    /// alike.
    async fn apply_create_results(
        &self,
        results: Vec<(usize, StatusCode)>,
        state: &mut TagState,
    ) -> Result<(), SessionEnd> {
        let mut bad = Vec::new();
        for (i, code) in results {
            if code.is_good() {
                continue;
            }
            tracing::warn!(connection = %self.config.name, tag = %self.tags[i].address, status = %code, "monitored item refused");
            self.fail_with(i, status_name(code), state).await;
            let t = &self.tags[i];
            if let (Some(property), Some(value)) = (t.target.reading_property(), state.last[i]) {
                bad.push(Reading {
                    asset: t.target.asset.id(),
                    property,
                    value,
                    quality: Quality::bad(reason_of(code)),
                    source_ts: Timestamp::now(),
                });
            }
        }
        self.push(bad).await
    }

    /// Turns data changes into readings and pushes them (waiting while the sink pushes back).
    async fn apply_values(
        &self,
        values: Vec<(u32, DataValue)>,
        state: &mut TagState,
    ) -> Result<(), SessionEnd> {
        let mut batch = Vec::with_capacity(values.len());
        let mut rejected = 0;
        for (handle, dv) in values {
            let Some(i) = tag_of(handle).filter(|&i| i < self.tags.len()) else {
                rejected += 1;
                continue;
            };
            let t = &self.tags[i];
            let Some(property) = t.target.reading_property() else {
                continue;
            };
            let code = dv.status();
            let source_ts = [dv.source_timestamp, dv.server_timestamp]
                .into_iter()
                .flatten()
                .find(|d| !d.is_null())
                .map_or_else(Timestamp::now, from_ua_time);
            // No value with a usable status: nothing to report (not a failure either).
            let raw = dv.value.as_ref().filter(|v| !matches!(v, Variant::Empty));
            if raw.is_none() && !code.is_bad() {
                continue;
            }
            let value = raw.and_then(|v| value_of(v, property));
            if code.is_bad() {
                if code_of(code) == StatusCode::BadWaitingForInitialData {
                    continue;
                }
                let value = value.or(state.last[i]);
                self.fail_with(i, status_name(code), state).await;
                if let Some(value) = value {
                    state.last[i] = Some(value);
                    batch.push(Reading {
                        asset: t.target.asset.id(),
                        property,
                        value,
                        quality: Quality::bad(reason_of(code)),
                        source_ts,
                    });
                }
                continue;
            }
            let Some(value) = value else {
                // Good or uncertain but a value we cannot use: the tag is misconfigured.
                rejected += 1;
                let why = format!("{raw:?} is not a number or boolean for {property}");
                self.fail_with(i, why, state).await;
                if let Some(last) = state.last[i] {
                    batch.push(Reading {
                        asset: t.target.asset.id(),
                        property,
                        value: last,
                        quality: Quality::bad(QualityReason::ConfigError),
                        source_ts,
                    });
                }
                continue;
            };
            if state.failed[i] {
                state.failed[i] = false;
                self.event(
                    Some(i),
                    AdapterEventKind::TagRecovered {
                        tag: t.address.clone(),
                    },
                )
                .await;
            }
            state.last[i] = Some(value);
            let quality = if code.is_uncertain() {
                Quality::uncertain(uncertain_reason(code))
            } else {
                Quality::GOOD
            };
            batch.push(Reading {
                asset: t.target.asset.id(),
                property,
                value,
                quality,
                source_ts,
            });
        }
        AdapterStatus::add(&self.status.rejected, rejected);
        self.push(batch).await
    }

    /// Marks tag `i` failed: counted and reported once, when it starts failing.
    async fn fail_with(&self, i: usize, error: String, state: &mut TagState) {
        if !state.failed[i] {
            state.failed[i] = true;
            AdapterStatus::add(&self.status.errors, 1);
            self.event(
                Some(i),
                AdapterEventKind::TagFailed {
                    tag: self.tags[i].address.clone(),
                    error,
                },
            )
            .await;
        }
    }

    async fn push(&self, batch: Vec<Reading>) -> Result<(), SessionEnd> {
        let n = batch.len() as u64;
        match push_batch(self.sink, batch, self.token).await {
            Ok(()) => {
                AdapterStatus::add(&self.status.received, n);
                Ok(())
            }
            Err(crate::push::NotDelivered::Cancelled) => Err(SessionEnd::Cancelled),
            Err(crate::push::NotDelivered::SinkClosed) => Err(SessionEnd::SinkClosed),
        }
    }
}

/// Aborts the task polling a session when the session is given up.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the session's event loop, hands over what the subscription callback collected after
/// each step, and ends at the first loss (reconnects are the adapter's).
async fn drive(
    event_loop: SessionEventLoop<TcpConnector>,
    inbox: Arc<Mutex<Inbox>>,
    tx: mpsc::Sender<LoopEvent>,
) {
    let stream = event_loop.enter();
    tokio::pin!(stream);
    loop {
        let step = stream.next().await;
        let (values, ended) = {
            let mut inbox = inbox.lock().expect("inbox lock is never poisoned");
            (std::mem::take(&mut inbox.values), inbox.ended.take())
        };
        // Values first: they arrived before whatever ended the session.
        if !values.is_empty() && tx.send(LoopEvent::Data(values)).await.is_err() {
            return;
        }
        if let Some(code) = ended
            && tx.send(LoopEvent::SubscriptionEnded(code)).await.is_err()
        {
            return;
        }
        let ev = match step {
            Some(Ok(SessionPollResult::Reconnected(_))) => LoopEvent::Connected,
            Some(Ok(SessionPollResult::ConnectionLost(code))) => {
                LoopEvent::Lost(format!("connection lost: {}", status_name(code)))
            }
            Some(Ok(SessionPollResult::ReconnectFailed(code))) => {
                LoopEvent::Lost(format!("cannot open a session: {}", status_name(code)))
            }
            Some(Ok(_)) => continue,
            Some(Err(code)) => LoopEvent::Lost(format!("session failed: {}", status_name(code))),
            None => LoopEvent::Lost("session closed".into()),
        };
        let last = matches!(ev, LoopEvent::Lost(_));
        if tx.send(ev).await.is_err() || last {
            return;
        }
    }
}

/// Serves write commands with whatever session is up; runs beside the subscription so a
/// write never waits behind push-back of readings (only behind the server).
async fn serve_writes(
    config: OpcUaConfig,
    tags: Arc<Vec<Tag>>,
    mut writes: mpsc::Receiver<WriteCommand>,
    session: watch::Receiver<Option<Arc<Session>>>,
    status: Arc<AdapterStatus>,
    events: mpsc::Sender<AdapterEvent>,
    token: CancellationToken,
) {
    let by_target: HashMap<(&ferrotwin_models::AssetPath, &str), usize> = tags
        .iter()
        .enumerate()
        .filter(|(_, t)| t.target.writable)
        .map(|(i, t)| ((&t.target.asset, t.target.property_name()), i))
        .collect();
    // Data types read from the server, per tag, valid for one session.
    let mut types: HashMap<usize, NodeId> = HashMap::new();
    let mut types_of: Option<Arc<Session>> = None;
    loop {
        let cmd = tokio::select! {
            () = token.cancelled() => return,
            cmd = writes.recv() => match cmd {
                Some(cmd) => cmd,
                None => return,
            },
        };
        let req = &cmd.req;
        let result = match by_target.get(&(&req.asset, req.property.as_str())) {
            None => Err(WriteError::NotWritable {
                asset: req.asset.clone(),
                property: req.property.clone(),
            }),
            Some(&i) => {
                let current = session.borrow().clone();
                match current {
                    None => Err(WriteError::NotConnected {
                        connection: config.name.clone(),
                    }),
                    Some(s) => {
                        if !types_of.as_ref().is_some_and(|t| Arc::ptr_eq(t, &s)) {
                            types.clear();
                            types_of = Some(Arc::clone(&s));
                        }
                        let write = write_tag(&config, &s, &tags[i], i, req.value, &mut types)
                            .instrument(cmd.span.clone());
                        tokio::select! {
                            () = token.cancelled() => return,
                            r = write => r,
                        }
                    }
                }
            }
        };
        // A Good status is the server's own answer to the write.
        let result = result.map(|()| WriteAck::Confirmed);
        let counter = if result.is_ok() {
            &status.writes_ok
        } else {
            &status.writes_failed
        };
        AdapterStatus::add(counter, 1);
        let kind = AdapterEventKind::Written {
            property: req.property.clone(),
            value: req.value.to_string(),
            by: req.by.clone(),
            outcome: result.clone().map_err(|e| e.to_string()),
        };
        send_event(&events, &config.name, Some(req.asset.clone()), kind).await;
        // The caller may have given up waiting: not an error.
        let _ = cmd.reply.send(result);
    }
}

/// Writes `value` to tag `i` as the variable's own data type (read once per session).
async fn write_tag(
    config: &OpcUaConfig,
    session: &Session,
    tag: &Tag,
    i: usize,
    value: Value,
    types: &mut HashMap<usize, NodeId>,
) -> Result<(), WriteError> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let timed_out = || WriteError::Timeout {
        connection: config.name.clone(),
        timeout_ms: config.timeout_ms,
    };
    let refused = |error: String| WriteError::Refused {
        connection: config.name.clone(),
        error,
    };
    let data_type = match types.get(&i) {
        Some(t) => t.clone(),
        None => {
            let read = ReadValueId {
                node_id: tag.node.clone(),
                attribute_id: AttributeId::DataType as u32,
                ..Default::default()
            };
            let span = tracing::info_span!(
                "opcua.read",
                otel.kind = "client",
                opcua.service = "Read",
                opcua.attribute = "DataType",
                opcua.node_id = %tag.node,
            );
            let dv = tokio::time::timeout(
                timeout,
                session.read(&[read], TimestampsToReturn::Neither, 0.0),
            )
            .instrument(span)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| refused(format!("cannot read the data type: {e}")))?
            .into_iter()
            .next()
            .ok_or_else(|| refused("no data type in the answer".into()))?;
            let Some(Variant::NodeId(t)) = dv.value else {
                return Err(refused(format!(
                    "cannot read the data type: {}",
                    status_name(dv.status())
                )));
            };
            types.insert(i, (*t).clone());
            *t
        }
    };
    let variant = variant_for(&data_type, value).map_err(|why| WriteError::BadValue {
        asset: tag.target.asset.clone(),
        property: tag.target.property_name().to_owned(),
        value: value.to_string(),
        why,
    })?;
    let write = WriteValue {
        node_id: tag.node.clone(),
        attribute_id: AttributeId::Value as u32,
        index_range: NumericRange::None,
        value: DataValue::value_only(variant),
    };
    let span = tracing::info_span!(
        "opcua.write",
        otel.kind = "client",
        opcua.service = "Write",
        opcua.node_id = %tag.node,
        opcua.data_type = %data_type,
        opcua.status_code = tracing::field::Empty,
    );
    let results = tokio::time::timeout(timeout, session.write(&[write]))
        .instrument(span.clone())
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| refused(e.to_string()))?;
    if let Some(code) = results.first() {
        span.record(
            "opcua.status_code",
            tracing::field::display(status_name(*code)),
        );
    }
    match results.first() {
        Some(code) if code.is_good() => Ok(()),
        Some(code) => Err(refused(status_name(*code))),
        None => Err(refused("no result in the answer".into())),
    }
}

/// `value` as a Variant of the variable's data type, if it fits.
fn variant_for(data_type: &NodeId, value: Value) -> Result<Variant, String> {
    let int = || match value {
        Value::Int(n) => Ok(n),
        Value::Float(f) if f.is_finite() && f.fract() == 0.0 => Ok(f as i64),
        Value::Bool(b) => Ok(i64::from(b)),
        Value::Float(f) => Err(format!("{f} is not a whole number")),
    };
    let range = |t: &str| format!("out of the range of {t}");
    let Ok(t) = data_type.as_data_type_id() else {
        return Err(format!(
            "data type {data_type} is not a built-in numeric type"
        ));
    };
    Ok(match t {
        DataTypeId::Boolean => Variant::Boolean(value.as_f64() != 0.0),
        DataTypeId::Double => Variant::Double(value.as_f64()),
        DataTypeId::Float => Variant::Float(value.as_f64() as f32),
        DataTypeId::SByte => Variant::SByte(i8::try_from(int()?).map_err(|_| range("SByte"))?),
        DataTypeId::Byte => Variant::Byte(u8::try_from(int()?).map_err(|_| range("Byte"))?),
        DataTypeId::Int16 => Variant::Int16(i16::try_from(int()?).map_err(|_| range("Int16"))?),
        DataTypeId::UInt16 => Variant::UInt16(u16::try_from(int()?).map_err(|_| range("UInt16"))?),
        DataTypeId::Int32 => Variant::Int32(i32::try_from(int()?).map_err(|_| range("Int32"))?),
        DataTypeId::UInt32 => Variant::UInt32(u32::try_from(int()?).map_err(|_| range("UInt32"))?),
        DataTypeId::Int64 => Variant::Int64(int()?),
        DataTypeId::UInt64 => Variant::UInt64(u64::try_from(int()?).map_err(|_| range("UInt64"))?),
        other => return Err(format!("data type {other:?} is not numeric or boolean")),
    })
}

/// `HOST[:PORT]` of an `opc.tcp://` URL: a host a connect can use (IPv6 in brackets), and a
/// port, when given, of 1..=65535.
fn opc_host_port_ok(hp: &str) -> bool {
    let (host, port) = match hp.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, rest)) => (format!("[{h}]"), rest.strip_prefix(':')),
            None => return false,
        },
        None => match hp.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (hp.to_owned(), None),
        },
    };
    crate::valid_host(&host) && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

/// A variant as the value of `property`: numbers for a sensor `value` (floats stay floats,
/// integers ints, booleans bools); whole numbers for counters; for a machine state any of
/// them (its machine type says what a value means: `MachineType::state_code`).
fn value_of(v: &Variant, property: Property) -> Option<Value> {
    let value = match v {
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(n) => Value::Int(i64::from(*n)),
        Variant::Byte(n) => Value::Int(i64::from(*n)),
        Variant::Int16(n) => Value::Int(i64::from(*n)),
        Variant::UInt16(n) => Value::Int(i64::from(*n)),
        Variant::Int32(n) => Value::Int(i64::from(*n)),
        Variant::UInt32(n) => Value::Int(i64::from(*n)),
        Variant::Int64(n) => Value::Int(*n),
        Variant::UInt64(n) => Value::Int(i64::try_from(*n).ok()?),
        Variant::Float(f) => Value::Float(f64::from(*f)),
        Variant::Double(f) => Value::Float(*f),
        _ => return None,
    };
    match (property, value) {
        (Property::Value | Property::State, v) => Some(v),
        (_, Value::Int(n)) => Some(Value::Int(n)),
        (_, Value::Float(f)) if f.is_finite() && f.fract() == 0.0 => Some(Value::Int(f as i64)),
        _ => None,
    }
}

/// The code without its info bits (overflow, limits), for comparisons.
fn code_of(s: StatusCode) -> StatusCode {
    StatusCode::from(s.bits() & 0xFFFF_0000)
}

/// `BadOutOfRange`, ...: the name without the info bits.
fn status_name(s: StatusCode) -> String {
    code_of(s).to_string()
}

/// Why a Bad status makes a value unusable.
fn reason_of(s: StatusCode) -> QualityReason {
    let c = code_of(s);
    let is = |codes: &[StatusCode]| codes.contains(&c);
    if is(&[
        StatusCode::BadCommunicationError,
        StatusCode::BadNotConnected,
        StatusCode::BadNoCommunication,
        StatusCode::BadServerNotConnected,
        StatusCode::BadConnectionClosed,
        StatusCode::BadTimeout,
        StatusCode::BadDisconnect,
        StatusCode::BadServerHalted,
        StatusCode::BadShutdown,
    ]) {
        QualityReason::CommFailure
    } else if is(&[
        StatusCode::BadConfigurationError,
        StatusCode::BadNodeIdUnknown,
        StatusCode::BadNodeIdInvalid,
        StatusCode::BadAttributeIdInvalid,
        StatusCode::BadNotReadable,
        StatusCode::BadUserAccessDenied,
        StatusCode::BadTypeMismatch,
        StatusCode::BadDataEncodingInvalid,
        StatusCode::BadFilterNotAllowed,
        StatusCode::BadTooManyMonitoredItems,
        StatusCode::BadMonitoredItemFilterUnsupported,
        StatusCode::BadMonitoredItemFilterInvalid,
    ]) {
        QualityReason::ConfigError
    } else if c == StatusCode::BadOutOfRange {
        QualityReason::OutOfRange
    } else {
        // BadSensorFailure, BadDeviceFailure, BadOutOfService, and what the PLC does not
        // explain: the value is not trustworthy at the source.
        QualityReason::SensorFailure
    }
}

fn uncertain_reason(s: StatusCode) -> QualityReason {
    let c = code_of(s);
    if c == StatusCode::UncertainLastUsableValue
        || c == StatusCode::UncertainNoCommunicationLastUsableValue
    {
        QualityReason::Stale
    } else if c == StatusCode::UncertainEngineeringUnitsExceeded
        || c == StatusCode::UncertainSensorNotAccurate
    {
        QualityReason::OutOfRange
    } else {
        QualityReason::None
    }
}

/// Client handles are tag index + 1 (0 asks the crate to pick one).
fn handle_of(tag: usize) -> u32 {
    u32::try_from(tag + 1).unwrap_or(u32::MAX)
}

fn tag_of(handle: u32) -> Option<usize> {
    usize::try_from(handle).ok()?.checked_sub(1)
}

/// Ticks between 1601-01-01 (OPC UA's epoch) and 1970-01-01.
const UNIX_EPOCH_TICKS: i64 = 116_444_736_000_000_000;

/// A ferrotwin timestamp (µs since 1970) of an OPC UA time (100 ns ticks since 1601).
pub fn from_ua_time(t: DateTime) -> Timestamp {
    Timestamp(t.checked_ticks().saturating_sub(UNIX_EPOCH_TICKS) / 10)
}

async fn send_event(
    events: &mpsc::Sender<AdapterEvent>,
    connection: &str,
    asset: Option<ferrotwin_models::AssetPath>,
    kind: AdapterEventKind,
) {
    // Waits while the runtime is behind: events are never dropped. A closed channel means
    // the runtime is shutting down.
    let _ = events
        .send(AdapterEvent {
            connection: connection.to_owned(),
            asset,
            at: Timestamp::now(),
            kind,
        })
        .await;
}
