//! The enterprise's side of replication: one stream per site, applied to the mirror twins.
//!
//! Idempotent: a batch at or below the site's cursor is acked again and not applied; an
//! event at or below the site's event cursor is skipped (a site that crashed may stage an
//! event twice). Durable before ack: the mirror records, the events and the cursors go out
//! in one store flush, and a seq is acked once that flush is on disk.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetId, AssetPath, Event, EventKind, Property, Severity, Timestamp};
use ferrotwin_proto::store::v1 as rec;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_server::ReplicationService;
use prost::Message;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use super::{PROTOCOL_VERSION, cursor_key, event_cursor_key, u64_of};
use crate::core::TwinMsg;
use crate::store::codec;
use crate::twin::TwinCtx;

/// Applied batches whose ack waits for a flush, per stream.
const PENDING_ACKS: usize = 1024;
/// How far past the site's cursor a stream's first batch may start (the site's outbox may
/// have dropped batches at its limit). Within a stream, batches continue the cursor one by
/// one. A seq beyond is refused: one hostile or corrupt batch cannot move the cursor where
/// every later batch of the site would be dropped as a duplicate.
pub const MAX_SEQ_GAP: u64 = 1 << 20;

/// What the enterprise knows about one site it accepts.
#[derive(Debug, Default)]
pub struct SiteMirror {
    /// Highest seq applied (queued for the store).
    pub applied_seq: AtomicU64,
    /// Highest seq on the enterprise's disk: what a welcome reports, so a site never trims
    /// what a crash here could still lose.
    pub durable_seq: AtomicU64,
    /// Twin deltas, history chunks and events for assets outside the site: skipped.
    pub foreign: AtomicU64,
    /// The current stream's token: a new hello from the site ends the previous stream (a
    /// half-open connection must not hold the site off).
    current: std::sync::Mutex<Option<CancellationToken>>,
    pub event_seq: AtomicU64,
    /// When a batch of this site was last applied (µs since the epoch; 0 = never).
    pub synced_us: AtomicU64,
    pub batches: AtomicU64,
    pub duplicates: AtomicU64,
    /// Twin deltas for assets the enterprise's plant does not have.
    pub unknown_twins: AtomicU64,
    /// One stream per site at a time: a second waits for the first to end.
    stream: Arc<tokio::sync::Mutex<()>>,
}

pub struct EnterpriseReceiver {
    ctx: Arc<TwinCtx>,
    sites: HashMap<String, Arc<SiteMirror>>,
    /// Streams end when the runtime stops, and its shutdown waits for them.
    token: CancellationToken,
    tracker: TaskTracker,
}

impl EnterpriseReceiver {
    /// Accepts the sites of `accept` (each must be a site of the plant), with their cursors
    /// from the store.
    pub fn new(
        ctx: Arc<TwinCtx>,
        accept: &[String],
        token: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<EnterpriseReceiver, String> {
        let mut sites = HashMap::new();
        for s in accept {
            let path = AssetPath::parse(s).map_err(|e| format!("enterprise.accept: {s:?}: {e}"))?;
            if ctx
                .registry
                .by_path(&path)
                .is_none_or(|e| !matches!(e.def.kind, AssetKind::Site))
            {
                return Err(format!(
                    "enterprise.accept: {s:?} is not a site of the plant spec"
                ));
            }
            let m = SiteMirror::default();
            let read = |k: Vec<u8>| ctx.store.meta_value(&k).map(u64_of);
            let cursor = read(cursor_key(s)).map_err(|e| e.to_string())?;
            m.applied_seq.store(cursor, Ordering::Relaxed);
            m.durable_seq.store(cursor, Ordering::Relaxed);
            m.event_seq.store(
                read(event_cursor_key(s)).map_err(|e| e.to_string())?,
                Ordering::Relaxed,
            );
            sites.insert(path.as_str().to_owned(), Arc::new(m));
        }
        Ok(EnterpriseReceiver {
            ctx,
            sites,
            token,
            tracker,
        })
    }

    /// The accepted site `path` lies in, with its mirror state.
    pub fn site_of(&self, path: &AssetPath) -> Option<&Arc<SiteMirror>> {
        let site: String = path.segments().take(2).collect::<Vec<_>>().join("/");
        self.sites.get(&site)
    }

    /// The mirror twin `id` of `site`; `None` (counted) for an asset this enterprise's plant
    /// does not have or one outside the site.
    fn mirror_of(
        &self,
        id: AssetId,
        site: &AssetPath,
        mirror: &SiteMirror,
    ) -> Option<Arc<crate::registry::TwinEntry>> {
        let Some(entry) = self.ctx.registry.get(&id) else {
            mirror.unknown_twins.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if !entry.path().starts_with(site) {
            mirror.foreign.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(entry)
    }

    /// Applies one batch of `site`; returns the store flush its effects go out with, or
    /// `None` for a duplicate.
    async fn apply(
        &self,
        site: &AssetPath,
        mirror: &SiteMirror,
        seq: u64,
        bytes: &[u8],
        first: bool,
    ) -> Result<Option<u64>, Status> {
        let applied = mirror.applied_seq.load(Ordering::Acquire);
        if seq <= applied {
            mirror.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let max = if first {
            applied.saturating_add(MAX_SEQ_GAP)
        } else {
            applied + 1
        };
        if seq > max {
            return Err(Status::failed_precondition(format!(
                "batch {seq} does not continue the site's cursor {applied} (at most {max} here); refused"
            )));
        }
        let batch = rec::OutboxBatch::decode(bytes).map_err(|e| {
            Status::invalid_argument(format!("batch {seq}: not an outbox batch: {e}"))
        })?;
        if batch.seq != seq {
            return Err(Status::invalid_argument(format!(
                "batch {seq}: carries outbox seq {}",
                batch.seq
            )));
        }
        let mut records = Vec::with_capacity(batch.twins.len());
        for d in &batch.twins {
            let (Ok(id), Some(r)) = (<[u8; 16]>::try_from(d.id.as_slice()), &d.record) else {
                return Err(Status::invalid_argument(format!(
                    "batch {seq}: a twin delta without a 16-byte id or a record"
                )));
            };
            let id = AssetId::from_bytes(id);
            let Some(entry) = self.mirror_of(id, site, mirror) else {
                continue;
            };
            let snap = Arc::new(codec::decode_snapshot(&entry.def.kind, r, false));
            match entry.actor() {
                Some(a) => {
                    let _ = a.cast(TwinMsg::Mirror(snap));
                }
                // Restarting: it starts from the registry's snapshot.
                None => self.ctx.publish(&entry, (*snap).clone()),
            }
            records.push((id, r.encode_to_vec()));
        }
        let mut history = Vec::with_capacity(batch.history.len());
        for h in &batch.history {
            let bad = |what: &str| {
                Status::invalid_argument(format!("batch {seq}: history chunk: {what}"))
            };
            let id = <[u8; 16]>::try_from(h.id.as_slice())
                .map(AssetId::from_bytes)
                .map_err(|_| bad("id is not 16 bytes"))?;
            let property = u8::try_from(h.property)
                .ok()
                .and_then(Property::from_code)
                .ok_or_else(|| bad("unknown property"))?;
            if self.mirror_of(id, site, mirror).is_none() {
                continue;
            }
            let first = codec::decode_chunk(&h.chunk)
                .map_err(|e| bad(&e))?
                .first()
                .map(|p| p.ts);
            if let Some(first) = first {
                history.push((id, property, first, h.chunk.clone()));
            }
        }
        let mut event_seq = mirror.event_seq.load(Ordering::Acquire);
        for e in &batch.events {
            if e.seq <= event_seq {
                continue;
            }
            let Some(r) = &e.event else { continue };
            match codec::decode_event(e.seq, &r.encode_to_vec()) {
                Ok(ev) if ev.asset.starts_with(site) => {
                    let mut ev = ev;
                    ev.seq = 0;
                    self.ctx.emit(ev).await;
                }
                Ok(_) => {
                    mirror.foreign.fetch_add(1, Ordering::Relaxed);
                }
                Err(what) => {
                    return Err(Status::invalid_argument(format!(
                        "batch {seq}: event {}: {what}",
                        e.seq
                    )));
                }
            }
            event_seq = e.seq;
        }
        if batch.dropped_events_from > 0 {
            self.ctx
                .emit(Event::new(
                    site.clone(),
                    Timestamp::now(),
                    EventKind::Lifecycle,
                    Severity::High,
                    format!(
                        "site outbox was full: events {}..={} were dropped before reaching the enterprise",
                        batch.dropped_events_from, batch.dropped_events_to
                    ),
                ))
                .await;
        }
        let key = site.as_str();
        let generation = self
            .ctx
            .store
            .put_records(
                records,
                history,
                vec![
                    (cursor_key(key), seq.to_be_bytes().to_vec()),
                    (event_cursor_key(key), event_seq.to_be_bytes().to_vec()),
                ],
            )
            .await;
        mirror.applied_seq.store(seq, Ordering::Release);
        mirror.event_seq.store(event_seq, Ordering::Release);
        mirror.batches.fetch_add(1, Ordering::Relaxed);
        mirror.synced_us.store(
            u64::try_from(Timestamp::now().0).unwrap_or(0),
            Ordering::Relaxed,
        );
        Ok(Some(generation))
    }

    /// The hello a stream must open with, checked: a protocol this build can serve and a
    /// site this enterprise accepts (a refusal is logged). Returns the site, its mirror
    /// state and the site's agent (for the log).
    async fn check_hello(
        &self,
        incoming: &mut Streaming<pb::ReplicateRequest>,
        identity: &SiteIdentity,
    ) -> Result<(AssetPath, Arc<SiteMirror>, String), Status> {
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before the hello"))?;
        let Some(pb::replicate_request::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        if hello.protocol_version < PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "site speaks replication protocol {}, the enterprise needs {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        let site = AssetPath::parse(&hello.site)
            .map_err(|e| Status::invalid_argument(format!("hello.site: {e}")))?;
        if let SiteIdentity::Certified(sites) = identity
            && !sites.iter().any(|s| s == site.as_str())
        {
            tracing::warn!(site = %site, certified = ?sites, "replication refused: the certificate names other sites");
            return Err(Status::permission_denied(format!(
                "the client certificate names {} (SAN URI {}PATH), not {site}",
                if sites.is_empty() {
                    "no site".to_owned()
                } else {
                    sites.join(", ")
                },
                crate::security::authn::SITE_URI_PREFIX
            )));
        }
        let Some(mirror) = self.sites.get(site.as_str()).cloned() else {
            tracing::warn!(site = %site, "replication refused: site not accepted");
            return Err(Status::permission_denied(format!(
                "site {site} is not accepted by this enterprise"
            )));
        };
        Ok((site, mirror, hello.agent))
    }
}

type ReplicateStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicateResponse, Status>> + Send>>;

/// The enterprise's half of one stream: the welcome, acks and the error that ends it.
type ResponseSender = mpsc::Sender<Result<pb::ReplicateResponse, Status>>;

/// Who opened a replication stream.
#[derive(Debug)]
enum SiteIdentity {
    /// Security off: the hello's word is taken (loopback only).
    Unchecked,
    /// The sites the verified client certificate names (SAN URIs `urn:ferrotwin:site:PATH`).
    Certified(Vec<String>),
}

/// The gRPC face of an `EnterpriseReceiver`. With `require_cert`, a stream is accepted only
/// from a verified client certificate that names the site its hello claims.
#[derive(Clone)]
pub struct ReplicationApi {
    receiver: Arc<EnterpriseReceiver>,
    require_cert: bool,
}

impl ReplicationApi {
    pub fn new(receiver: Arc<EnterpriseReceiver>, require_cert: bool) -> ReplicationApi {
        ReplicationApi {
            receiver,
            require_cert,
        }
    }
}

#[tonic::async_trait]
impl ReplicationService for ReplicationApi {
    type ReplicateStream = ReplicateStream;

    /// One site's stream: the handshake answers it; then, on the runtime's tracker, the
    /// receive loop applies its batches and the acker acks them once durable.
    async fn replicate(
        &self,
        req: Request<Streaming<pb::ReplicateRequest>>,
    ) -> Result<Response<ReplicateStream>, Status> {
        let identity = if self.require_cert {
            let certs = req.peer_certs().ok_or_else(|| {
                tracing::warn!(addr = ?req.remote_addr(), "replication refused: no client certificate");
                Status::unauthenticated(
                    "replication needs the site's client certificate (mTLS)",
                )
            })?;
            let der = certs.first().ok_or_else(|| {
                Status::unauthenticated("replication needs the site's client certificate")
            })?;
            SiteIdentity::Certified(
                crate::security::authn::site_uris(der).map_err(Status::unauthenticated)?,
            )
        } else {
            SiteIdentity::Unchecked
        };
        let mut incoming = req.into_inner();
        let (stream, one_stream, responses) =
            SiteStream::handshake(&self.receiver, &mut incoming, &identity).await?;
        self.receiver
            .tracker
            .spawn(stream.run(incoming, one_stream));
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}

/// One accepted stream of a site: what its receive loop and its acker share.
#[derive(Clone)]
struct SiteStream {
    receiver: Arc<EnterpriseReceiver>,
    site: AssetPath,
    mirror: Arc<SiteMirror>,
    /// Cancelled when the runtime stops or a newer stream of the site takes over.
    token: CancellationToken,
    responses: ResponseSender,
}

impl SiteStream {
    /// The handshake: reads the hello, checks it (protocol version, a site this enterprise
    /// accepts), ends any previous stream of the site and waits for it to let go (one stream
    /// per site; a half-open one must not hold the site off), then sends the welcome with the
    /// site's highest durable seq, so the site never resumes past what a crash here could
    /// lose. Any failure is the stream's error and nothing was applied. Returns the stream,
    /// the site's one-stream guard (held until the stream ends) and the responses' receiver.
    async fn handshake(
        receiver: &Arc<EnterpriseReceiver>,
        incoming: &mut Streaming<pb::ReplicateRequest>,
        identity: &SiteIdentity,
    ) -> Result<
        (
            SiteStream,
            OwnedMutexGuard<()>,
            mpsc::Receiver<Result<pb::ReplicateResponse, Status>>,
        ),
        Status,
    > {
        let (site, mirror, agent) = receiver.check_hello(incoming, identity).await?;
        // A new stream of the site replaces the previous one (which may be half-open).
        let token = receiver.token.child_token();
        if let Some(old) = mirror
            .current
            .lock()
            .expect("stream lock is never poisoned")
            .replace(token.clone())
        {
            old.cancel();
        }
        let one_stream = tokio::select! {
            g = mirror.stream.clone().lock_owned() => g,
            () = token.cancelled() => {
                return Err(Status::aborted("replaced by a newer stream of the site"));
            }
        };
        let (responses, rx) = mpsc::channel(16);
        let welcome = pb::ReplicateResponse {
            msg: Some(pb::replicate_response::Msg::Welcome(
                pb::EnterpriseWelcome {
                    protocol_version: PROTOCOL_VERSION,
                    last_applied_seq: mirror.durable_seq.load(Ordering::Acquire),
                },
            )),
        };
        responses
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("site went away"))?;
        tracing::info!(site = %site, agent, "replication stream accepted");
        let stream = SiteStream {
            receiver: receiver.clone(),
            site,
            mirror,
            token,
            responses,
        };
        Ok((stream, one_stream, rx))
    }

    /// The stream after the handshake: the receive loop, with the acker beside it. Ends
    /// when the receive loop does and the acker has sent what it can; only then does the
    /// site's next stream start (`_one_stream`), and the response stream end.
    async fn run(
        self,
        mut incoming: Streaming<pb::ReplicateRequest>,
        _one_stream: OwnedMutexGuard<()>,
    ) {
        // (seq, the store flush that makes it durable), in the order the batches came.
        let (acks, pending) = mpsc::channel::<(u64, u64)>(PENDING_ACKS);
        let acker = self
            .receiver
            .tracker
            .spawn(self.clone().ack_when_durable(pending));
        self.receive_batches(&mut incoming, acks).await;
        let _ = acker.await;
    }

    /// The acker: acks each seq of `pending`, in arrival order, once the store flush holding
    /// its effects and cursors is on disk (`Store::wait_flushed`), raising the site's durable
    /// seq (what a later welcome reports) just before. A duplicate comes with the flush after
    /// its arrival, so its ack also waits for its first application to be durable. An ack is
    /// never sent ahead of its flush nor out of order. After the receive loop ends it still
    /// acks what it was handed; a stop, a newer stream of the site or a site that is gone
    /// (the send fails) ends it at once, and the seqs it did not ack are resent by the site
    /// and acked then as duplicates.
    async fn ack_when_durable(self, mut pending: mpsc::Receiver<(u64, u64)>) {
        let store = &self.receiver.ctx.store;
        while let Some((seq, generation)) = pending.recv().await {
            tokio::select! {
                () = self.token.cancelled() => return,
                () = store.wait_flushed(generation) => {}
            }
            self.mirror.durable_seq.fetch_max(seq, Ordering::AcqRel);
            let ack = pb::ReplicateResponse {
                msg: Some(pb::replicate_response::Msg::Ack(seq)),
            };
            tokio::select! {
                () = self.token.cancelled() => return,
                sent = self.responses.send(Ok(ack)) => if sent.is_err() { return },
            }
        }
    }

    /// The receive loop: applies each batch in arrival order (`EnterpriseReceiver::apply`:
    /// a seq at or below the site's cursor is a duplicate, counted and not applied; events
    /// at or below its event cursor are skipped) and hands its seq to the acker with the
    /// flush to wait for. A message other than a batch, or a batch that does not decode, ends
    /// the stream with that error; a disconnect, a stop or a newer stream of the site ends it
    /// quietly. A batch applied but not acked before the end is resent by the site and acked
    /// then as a duplicate.
    async fn receive_batches(
        &self,
        incoming: &mut Streaming<pb::ReplicateRequest>,
        acks: mpsc::Sender<(u64, u64)>,
    ) {
        let site = &self.site;
        let mut first = true;
        loop {
            let next = tokio::select! {
                () = self.token.cancelled() => return,
                m = incoming.message() => m,
            };
            let m = match next {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::info!(site = %site, error = %e, "replication stream ended");
                    return;
                }
            };
            let Some(pb::replicate_request::Msg::Batch(b)) = m.msg else {
                let _ = self.responses.try_send(Err(Status::invalid_argument(
                    "only batches after the hello",
                )));
                return;
            };
            match self
                .receiver
                .apply(site, &self.mirror, b.seq, &b.batch, first)
                .await
            {
                Ok(generation) => {
                    if generation.is_some() {
                        first = false;
                    }
                    // A duplicate is acked once the flush after now is on disk: its
                    // first application may still be on its way there.
                    let g =
                        generation.unwrap_or_else(|| self.receiver.ctx.store.queue_generation());
                    tokio::select! {
                        () = self.token.cancelled() => return,
                        sent = acks.send((b.seq, g)) => if sent.is_err() { return },
                    }
                }
                Err(status) => {
                    tracing::warn!(site = %site, error = %status, "replication batch refused");
                    let _ = self.responses.try_send(Err(status));
                    return;
                }
            }
        }
    }
}

/// Freshness of a site's mirrors: ms since its last applied batch (`None`: never synced).
pub fn freshness_ms(mirror: &SiteMirror, at: Timestamp) -> Option<i64> {
    let synced = mirror.synced_us.load(Ordering::Relaxed);
    (synced > 0).then(|| (at.0 - synced as i64) / 1000)
}

/// Mirrors of every site, for status output.
pub fn sites(rx: &EnterpriseReceiver) -> Vec<(String, Arc<SiteMirror>)> {
    let mut v: Vec<_> = rx
        .sites
        .iter()
        .map(|(k, m)| (k.clone(), m.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
