//! The site's sender: streams the outbox to the enterprise, resumes after the enterprise's
//! last applied seq on every (re)connect, trims the outbox up to each ack. The site's twins
//! and ingest never wait for it: a slow or absent enterprise only makes the outbox longer.
//!
//! The site never drops its own data on the enterprise's word: its hello says what it has
//! (last batch, last event), every batch says which one it follows, and an enterprise that
//! claims more than the site has is refused. Gaps (the enterprise lost batches this site
//! trimmed, or rewound its cursor) are reported as an event here and answered with a full
//! snapshot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_adapters::backoff::Backoff;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_client::ReplicationServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetPath, Event, EventKind, Severity, Timestamp};

use super::{MAX_TEMPLATE_ERROR_BYTES, PROTOCOL_VERSION, SiteReplication};
use crate::store::outbox::Outbox;
use crate::telemetry;
use crate::twin::TwinCtx;

/// Most bytes of outbox read per step of the sender.
const READ_BYTES: usize = 4 << 20;
/// How long the enterprise has to answer the hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A heartbeat goes out this often while the stream is up: the enterprise takes a stream it
/// has not heard from for 6 s for half-open and lets the site's next stream replace it.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// What the sender reports (API, metrics, tests).
#[derive(Debug, Default)]
pub struct SenderStatus {
    pub site: String,
    pub enterprise: String,
    pub connected: std::sync::atomic::AtomicBool,
    pub connects: AtomicU64,
    pub batches_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub acked_seq: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// This site's plant (version, TOML of its subset) as the next hello sends it.
    plant: Mutex<Option<(u64, String)>>,
    /// The plant changed: the stream ends and the next hello sends it.
    plant_changed: tokio::sync::Notify,
    /// Counts plant changes: a stream whose hello sent an older one ends before its next
    /// batch (the batches that hold what a change makes go after the hello that tells it).
    plant_gen: AtomicU64,
    /// The fleet template version last applied here, the last one's error (empty: none),
    /// and the version last refused (0: none).
    template: Mutex<(u64, String, u64)>,
    /// Applies a fleet template (the runtime's live apply), once set.
    template_hook: HookSlot,
}

/// The template hook's place (set once; shows as whether it is set).
#[derive(Default)]
struct HookSlot(std::sync::OnceLock<TemplateHook>);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}",
            if self.0.get().is_some() {
                "set"
            } else {
                "unset"
            }
        )
    }
}

/// What applies a fleet template at the site: Ok, or why not (every problem named).
pub type TemplateHook = Arc<
    dyn Fn(
            pb::FleetTemplate,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// `meta` keys of the fleet template state.
const TEMPLATE_APPLIED_KEY: &[u8] = b"fleet/applied";
const TEMPLATE_ERROR_KEY: &[u8] = b"fleet/error";
const TEMPLATE_REFUSED_KEY: &[u8] = b"fleet/refused";

impl SenderStatus {
    pub fn new(site: &str, enterprise: &str) -> SenderStatus {
        SenderStatus {
            site: site.to_owned(),
            enterprise: enterprise.to_owned(),
            ..SenderStatus::default()
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .expect("status lock is never poisoned")
            .clone()
    }

    /// After a live apply: this site's part of `spec` goes with the next hello, and the open
    /// stream ends before its next batch.
    pub fn set_plant(&self, version: u64, spec: &PlantSpec) {
        if !self.init_plant(version, spec) {
            return;
        }
        self.plant_gen.fetch_add(1, Ordering::AcqRel);
        // Wakes an idle stream; a busy one sees the generation before its next batch.
        self.plant_changed.notify_waiters();
    }

    /// How fleet templates are applied (once, at start).
    pub fn set_template_hook(&self, hook: TemplateHook) {
        let _ = self.template_hook.0.set(hook);
    }

    /// The fleet template state the data dir records (at start).
    pub fn load_template_state(&self, store: &crate::store::Store) {
        let number = |key: &[u8]| {
            store
                .meta_value(key)
                .ok()
                .flatten()
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_be_bytes)
        };
        let applied = number(TEMPLATE_APPLIED_KEY);
        let refused = number(TEMPLATE_REFUSED_KEY);
        let error = store
            .meta_value(TEMPLATE_ERROR_KEY)
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        *self.template.lock().expect("status lock is never poisoned") = (applied, error, refused);
    }

    /// This site's part of `spec` (its site and the machine types it uses), as the first
    /// hello sends it (at start: no stream to end yet).
    /// False when `spec` lacks this site (nothing to send).
    pub fn init_plant(&self, version: u64, spec: &PlantSpec) -> bool {
        let name = self.site.rsplit('/').next().unwrap_or_default();
        let Some(own) = spec.site_subset(name) else {
            return false;
        };
        *self.plant.lock().expect("status lock is never poisoned") = Some((version, own.to_toml()));
        true
    }

    fn plant(&self) -> Option<(u64, String)> {
        self.plant
            .lock()
            .expect("status lock is never poisoned")
            .clone()
    }

    fn failed(&self, e: &str) {
        self.connected.store(false, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .expect("status lock is never poisoned") = Some(e.to_owned());
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("enterprise refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("replication TLS: {0}")]
    Tls(String),
    #[error("stream broke: {0}")]
    Stream(tonic::Status),
    #[error("enterprise closed the stream")]
    Closed,
    #[error("no welcome from the enterprise within {WELCOME_TIMEOUT:?}")]
    NoWelcome,
    #[error("enterprise speaks protocol {0}, this site {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("outbox: {0}")]
    Outbox(String),
    #[error(
        "the enterprise claims batch {claimed} of this site, whose last batch is {last}; not trimming on its word"
    )]
    ClaimsMore { claimed: u64, last: u64 },
    #[error("the site's plant changed: a new hello sends it")]
    PlantChanged,
}

/// Runs until `token` is cancelled: connect, stream, on any failure back off and reconnect.
pub async fn run_sender(
    ctx: Arc<TwinCtx>,
    site: String,
    cfg: SiteReplication,
    status: Arc<SenderStatus>,
    token: CancellationToken,
) {
    let Some(outbox) = ctx.store.outbox() else {
        tracing::error!("replication sender started without an outbox");
        return;
    };
    let mut backoff = Backoff::new(cfg.reconnect_min_ms, cfg.reconnect_max_ms);
    loop {
        let acked_before = status.acked_seq.load(Ordering::Relaxed);
        let result = tokio::select! {
            () = token.cancelled() => return,
            r = stream_once(&ctx, outbox, &site, &cfg, &status, &token) => r,
        };
        match result {
            Ok(()) => return,
            // At once, without backing off: the next hello carries the new plant.
            Err(SendError::PlantChanged) => {
                status.connected.store(false, Ordering::Relaxed);
                tracing::info!(site, "the site's plant changed: saying hello again with it");
                continue;
            }
            Err(e) => {
                // Only a stream that got something acked resets the back-off: one refused
                // right after its welcome backs off like one that never connected.
                if status.acked_seq.load(Ordering::Relaxed) > acked_before {
                    backoff.reset();
                }
                tracing::warn!(error = %e, enterprise = %cfg.enterprise, "replication stream down");
                status.failed(&e.to_string());
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// The enterprise said no (its answer), or the link failed before it could answer.
fn refused_or_broken(s: tonic::Status) -> SendError {
    use tonic::Code;
    match s.code() {
        Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::InvalidArgument
        | Code::Unimplemented
        | Code::Unauthenticated => SendError::Refused(s),
        _ => SendError::Stream(s),
    }
}

/// One connection: hello, welcome, then batches out and acks in until something breaks.
async fn stream_once(
    ctx: &TwinCtx,
    outbox: &Outbox,
    site: &str,
    cfg: &SiteReplication,
    status: &SenderStatus,
    token: &CancellationToken,
) -> Result<(), SendError> {
    let endpoint = cfg.enterprise.clone();
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.clone()).map_err(|source| {
        SendError::Connect {
            endpoint: endpoint.clone(),
            source,
        }
    })?;
    if let Some(tls) = &cfg.tls {
        // Read at every connect: renewed certificates apply without a restart.
        ep = ep
            .tls_config(tls.client_config().map_err(SendError::Tls)?)
            .map_err(|source| SendError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
    }
    let channel = ep
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // A half-open link (a dead enterprise, a silent firewall) ends the stream within
        // about 30 s instead of leaving the site waiting for acks forever.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|source| SendError::Connect { endpoint, source })?;
    let mut client = ReplicationServiceClient::new(channel)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
    let window = cfg.max_unacked_batches.max(1);
    let (tx, rx) = mpsc::channel::<pb::ReplicateRequest>(window);
    let plant_gen = status.plant_gen.load(Ordering::Acquire);
    let (plant_version, plant_toml) = status.plant().unwrap_or_default();
    let (template_applied, template_error, template_refused) = status
        .template
        .lock()
        .expect("status lock is never poisoned")
        .clone();
    let hello = pb::ReplicateRequest {
        msg: Some(pb::replicate_request::Msg::Hello(pb::SiteHello {
            protocol_version: PROTOCOL_VERSION,
            site: site.to_owned(),
            agent: format!("ferrotwin {}", env!("CARGO_PKG_VERSION")),
            last_seq: outbox.committed(),
            event_hwm: outbox.event_hwm(),
            plant_toml,
            plant_version,
            template_applied,
            template_error,
            template_refused,
        })),
    };
    tx.send(hello).await.map_err(|_| SendError::Closed)?;
    let mut responses = client
        .replicate(ReceiverStream::new(rx))
        .await
        .map_err(refused_or_broken)?
        .into_inner();
    let welcome = tokio::time::timeout(WELCOME_TIMEOUT, responses.message())
        .await
        .map_err(|_| SendError::NoWelcome)?
        .map_err(refused_or_broken)?
        .ok_or(SendError::Closed)?;
    let Some(pb::replicate_response::Msg::Welcome(w)) = welcome.msg else {
        return Err(SendError::NoWelcome);
    };
    if w.protocol_version != PROTOCOL_VERSION {
        return Err(SendError::Version(w.protocol_version));
    }
    // A fleet template this site has not applied: applied live now (or refused, with its
    // error), then a new hello reports it.
    // (The hook is set a moment after the sender starts: a first welcome may come before.)
    let mut waited = 0;
    while w.template.is_some() && status.template_hook.0.get().is_none() && waited < 250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    if let Some(t) = w.template
        && let Some(hook) = status.template_hook.0.get()
    {
        let version = t.version;
        tracing::info!(site, version, "fleet template received; applying it");
        let (applied, error, refused) = match hook(t).await {
            Ok(()) => (version, String::new(), 0),
            Err(e) => {
                let mut e = e;
                e.truncate(crate::core::char_floor(&e, MAX_TEMPLATE_ERROR_BYTES));
                tracing::warn!(site, version, error = %e, "fleet template refused");
                let applied = status
                    .template
                    .lock()
                    .expect("status lock is never poisoned")
                    .0;
                (applied, format!("v{version}: {e}"), version)
            }
        };
        let store = ctx.store.clone();
        let (a, e, r) = (applied, error.clone(), refused);
        let _ = tokio::task::spawn_blocking(move || {
            store.put_meta(TEMPLATE_APPLIED_KEY, &a.to_be_bytes())?;
            store.put_meta(TEMPLATE_ERROR_KEY, e.as_bytes())?;
            store.put_meta(TEMPLATE_REFUSED_KEY, &r.to_be_bytes())
        })
        .await;
        *status
            .template
            .lock()
            .expect("status lock is never poisoned") = (applied, error, refused);
        return Err(SendError::PlantChanged);
    }
    let last = outbox.committed();
    if w.last_applied_seq > last {
        return Err(SendError::ClaimsMore {
            claimed: w.last_applied_seq,
            last,
        });
    }
    // What the outbox no longer holds (acked, or dropped at its limit), and what the
    // enterprise acked to this process before (0 after a restart: nothing to compare).
    let acked = outbox.lag().acked_seq;
    let enterprise_had = status.acked_seq.load(Ordering::Relaxed);
    if w.rewound || w.last_applied_seq < enterprise_had {
        // The enterprise lost batches this site had trimmed on its ack (it was restored),
        // or had a cursor past this site's (forged batches it rewound): what those batches
        // carried goes again as a full snapshot.
        outbox.set_full_pending();
        let text = if w.rewound {
            format!(
                "the enterprise's replication cursor was past this site's last batch {last}: it rewound to {}; a full snapshot follows",
                w.last_applied_seq
            )
        } else {
            format!(
                "the enterprise has batches up to {} but acked up to {enterprise_had} before: batches {}..={enterprise_had} are lost there (their events too); a full snapshot follows",
                w.last_applied_seq,
                w.last_applied_seq + 1
            )
        };
        tracing::warn!(site, "{text}");
        if let Ok(path) = AssetPath::parse(site) {
            ctx.emit(Event::new(
                path,
                Timestamp::now(),
                EventKind::Lifecycle,
                Severity::High,
                text,
            ))
            .await;
        }
    }
    outbox
        .trim_to(w.last_applied_seq)
        .map_err(|e| SendError::Outbox(e.to_string()))?;
    status.connected.store(true, Ordering::Relaxed);
    status.connects.fetch_add(1, Ordering::Relaxed);
    status
        .acked_seq
        .store(w.last_applied_seq, Ordering::Relaxed);
    tracing::info!(
        site,
        resume_after = w.last_applied_seq,
        "replication stream up"
    );
    // Resume after what the enterprise has, or after what the outbox no longer holds; each
    // batch says which one it follows (`after`), so the enterprise sees every gap.
    let mut sent = w.last_applied_seq.max(acked);
    let mut after = w.last_applied_seq;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if status.plant_gen.load(Ordering::Acquire) != plant_gen {
            return Err(SendError::PlantChanged);
        }
        let room = window.saturating_sub(in_flight.len());
        if room > 0 {
            let batches = outbox
                .read_after(sent, READ_BYTES)
                .map_err(|e| SendError::Outbox(e.to_string()))?;
            if !batches.is_empty() {
                for (seq, bytes) in batches.into_iter().take(room) {
                    let n = bytes.len() as u64;
                    let span = send_span(seq, after, n);
                    let req = pb::ReplicateRequest {
                        msg: Some(pb::replicate_request::Msg::Batch(pb::SiteBatch {
                            seq,
                            batch: bytes,
                            after,
                            traceparent: telemetry::traceparent_of(&span),
                        })),
                    };
                    tokio::select! {
                        () = token.cancelled() => return Ok(()),
                        r = tx.send(req).instrument(span) => r.map_err(|_| SendError::Closed)?,
                    }
                    sent = seq;
                    after = seq;
                    in_flight.push_back(seq);
                    status.batches_sent.fetch_add(1, Ordering::Relaxed);
                    status.bytes_sent.fetch_add(n, Ordering::Relaxed);
                }
                continue;
            }
            // Nothing left up to what is durable (the outbox may have dropped batches at its
            // limit): do not wait for those seqs again.
            sent = sent.max(outbox.committed());
        }
        // Nothing to send (or the window is full): wait for an ack or a new batch.
        tokio::select! {
            () = token.cancelled() => return Ok(()),
            () = status.plant_changed.notified() => return Err(SendError::PlantChanged),
            () = outbox.wait_after(sent), if room > 0 => {}
            _ = heartbeat.tick() => {
                // Batches in the queue say the same: a full queue skips it.
                let _ = tx.try_send(pb::ReplicateRequest {
                    msg: Some(pb::replicate_request::Msg::Heartbeat(pb::SiteHeartbeat {
                        committed_seq: outbox.committed(),
                    })),
                });
            }
            m = responses.message() => {
                let m = m.map_err(SendError::Stream)?.ok_or(SendError::Closed)?;
                if let Some(pb::replicate_response::Msg::Ack(seq)) = m.msg {
                    // Never trim what was not sent (a confused or hostile peer).
                    let seq = seq.min(sent);
                    outbox.trim_to(seq).map_err(|e| SendError::Outbox(e.to_string()))?;
                    status.acked_seq.fetch_max(seq, Ordering::Relaxed);
                    while in_flight.front().is_some_and(|s| *s <= seq) {
                        in_flight.pop_front();
                    }
                }
            }
        }
    }
}

/// The span of one batch's send (when spans are exported): its `traceparent` travels in the
/// batch, so the enterprise's `replication.apply` is its child.
fn send_span(seq: u64, after: u64, bytes: u64) -> tracing::Span {
    if !telemetry::tracing_on() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        parent: None,
        "replication.send",
        otel.kind = "producer",
        messaging.system = "ferrotwin",
        messaging.operation.type = "send",
        ferrotwin.seq = seq as i64,
        ferrotwin.after = after as i64,
        messaging.message.body.size = bytes as i64,
    )
}
