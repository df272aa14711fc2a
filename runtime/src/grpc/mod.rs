//! The gRPC edge: `ferrotwin.v1.TwinService` over `TwinApi` (each call decodes, calls one
//! `TwinApi` method and encodes), plus `grpc.health.v1` and server reflection (v1 and
//! v1alpha, so every grpcurl lists our services without the .proto files). `ApiError`s
//! become a `Status` in one place: `status_of`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_models::AssetPath;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_server::ReplicationServiceServer;
use ferrotwin_proto::v1::twin_service_server::{TwinService, TwinServiceServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status};

use crate::api::{ApiError, ErrorCode, TwinApi, convert};
use crate::replication::enterprise::ReplicationApi;
use crate::security::conn::{ConnLimits, Guarded};
use crate::security::tls::{ServerTls, tls_incoming};
use crate::security::{Caller, Credentials};
use crate::watch::{Change, Watcher};

mod trace;

/// Largest request we decode.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The client's connection preface of HTTP/2, owed within `conn::FIRST_BYTES_TIMEOUT`.
const HTTP2_PREFACE_BYTES: usize = 24;
/// Largest replication message (one outbox batch: a full-snapshot chunk of 10,000 twins is
/// a few MB).
pub const MAX_BATCH_BYTES: usize = 64 << 20;
/// Messages buffered per Watch stream (besides the watcher's queue, at most as many).
const WATCH_STREAM_BUFFER: usize = 1024;
/// How long a shutdown waits for open gRPC connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// The gRPC code of each class of API error: the only place gRPC meets `ApiError`.
pub fn status_of(e: &ApiError) -> Status {
    let code = match e.code() {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::TooLarge | ErrorCode::Busy => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorCode::Internal => Code::Internal,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
    };
    Status::new(code, crate::api::error::bounded(e.to_string()))
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        status_of(&e)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TwinService for TwinApi {
    async fn get_twin(
        &self,
        req: Request<pb::GetTwinRequest>,
    ) -> Result<Response<pb::Twin>, Status> {
        Ok(Response::new(
            self.twin(&caller_of(self, &req)?, req.into_inner()).await?,
        ))
    }

    async fn browse(
        &self,
        req: Request<pb::BrowseRequest>,
    ) -> Result<Response<pb::BrowseResponse>, Status> {
        Ok(Response::new(
            self.browse_twins(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn query(
        &self,
        req: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        Ok(Response::new(
            self.query_twins(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = caller_of(self, &req)?;
        let req = req.into_inner();
        let (sub, prefix, slot) = self.open_watch(&caller, &req.path, req.events)?;
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER.min(self.watch_capacity()));
        let api = self.clone();
        let token = self.token();
        // A client that went away ends the stream at once (and gives its slot back), not
        // at the next change.
        let gone = tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = token.cancelled() => {}
                () = gone.closed() => {}
                _ = forward_changes(api, caller, sub, tx, prefix, !req.skip_snapshot) => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_history(
        &self,
        req: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        Ok(Response::new(
            self.history(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let caller = caller_of(self, &req)?;
        Ok(Response::new(
            self.list_events_page(&caller, req.into_inner()).await?,
        ))
    }

    async fn acknowledge_alarm(
        &self,
        req: Request<pb::AcknowledgeAlarmRequest>,
    ) -> Result<Response<pb::AcknowledgeAlarmResponse>, Status> {
        Ok(Response::new(
            self.acknowledge(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn list_rules(
        &self,
        req: Request<pb::ListRulesRequest>,
    ) -> Result<Response<pb::ListRulesResponse>, Status> {
        Ok(Response::new(
            self.list_rules(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn set_rule_mode(
        &self,
        req: Request<pb::SetRuleModeRequest>,
    ) -> Result<Response<pb::SetRuleModeResponse>, Status> {
        Ok(Response::new(
            self.set_rule_mode(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn get_plant(
        &self,
        req: Request<pb::GetPlantRequest>,
    ) -> Result<Response<pb::PlantVersion>, Status> {
        Ok(Response::new(
            self.plant(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn apply_plant(
        &self,
        req: Request<pb::ApplyPlantRequest>,
    ) -> Result<Response<pb::ApplyPlantResponse>, Status> {
        Ok(Response::new(
            self.apply_plant(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn push_template(
        &self,
        req: Request<pb::PushTemplateRequest>,
    ) -> Result<Response<pb::PushTemplateResponse>, Status> {
        Ok(Response::new(
            self.push_template(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn fleet_status(
        &self,
        req: Request<pb::FleetStatusRequest>,
    ) -> Result<Response<pb::FleetStatusResponse>, Status> {
        Ok(Response::new(
            self.fleet_status(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn rollback_template(
        &self,
        req: Request<pb::RollbackTemplateRequest>,
    ) -> Result<Response<pb::PushTemplateResponse>, Status> {
        Ok(Response::new(
            self.rollback_template(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn write_property(
        &self,
        req: Request<pb::WritePropertyRequest>,
    ) -> Result<Response<pb::WritePropertyResponse>, Status> {
        Ok(Response::new(
            self.write(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn get_replication_status(
        &self,
        req: Request<pb::GetReplicationStatusRequest>,
    ) -> Result<Response<pb::ReplicationStatus>, Status> {
        Ok(Response::new(
            self.replication_status(&caller_of(self, &req)?)?,
        ))
    }

    async fn list_connections(
        &self,
        req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        Ok(Response::new(
            self.connection_list(&caller_of(self, &req)?)?,
        ))
    }

    async fn shelve_alarm(
        &self,
        req: Request<pb::ShelveAlarmRequest>,
    ) -> Result<Response<pb::ShelveAlarmResponse>, Status> {
        Ok(Response::new(
            self.shelve(&caller_of(self, &req)?, req.into_inner())
                .await?,
        ))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        Ok(Response::new(self.who_am_i(&caller_of(self, &req)?)))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let caller = caller_of(self, &req)?;
        Ok(Response::new(
            self.list_audit(&caller, req.into_inner()).await?,
        ))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        Ok(Response::new(
            self.verify_audit(&caller_of(self, &req)?).await?,
        ))
    }
}

/// The caller of a request: its bearer token (`authorization` metadata), its verified
/// client certificate and its address, authenticated by `TwinApi::authenticate`.
pub fn caller_of<T>(api: &TwinApi, req: &Request<T>) -> Result<Caller, Status> {
    let addr = req.remote_addr();
    if !api.secured() {
        return Ok(Caller::open(addr));
    }
    let bearer = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::security::bearer_of);
    let certs = req.peer_certs();
    let peer_cert = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
    Ok(api.authenticate(Credentials {
        bearer,
        peer_cert,
        addr,
    })?)
}

/// Streams a snapshot of the subtree, then its changes. A watcher that falls behind its
/// queue is told so and gets a fresh snapshot: twins never wait for it.
async fn forward_changes(
    api: TwinApi,
    caller: Caller,
    mut sub: Watcher,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    prefix: Option<AssetPath>,
    snapshot: bool,
) {
    use pb::watch_response::Item;
    let send = |item: Item| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(pb::WatchResponse { item: Some(item) }))
                .await
                .is_ok()
        }
    };
    let mut last_event_seq = 0u64;
    let send_snapshot = || async {
        let entries = api.readable_below_entries(&caller, prefix.as_ref());
        let n = entries.len() as u32;
        for e in entries {
            if !send(Item::Snapshot(convert::twin(&e, &e.snapshot()))).await {
                return false;
            }
        }
        send(Item::SnapshotEnd(pb::SnapshotEnd { twins: n })).await
    };
    if snapshot && !send_snapshot().await {
        return;
    }
    loop {
        let missed = sub.take_missed();
        if missed > 0 {
            sub.clear();
            let lag = pb::Lagged {
                skipped: missed,
                events_after_seq: last_event_seq,
            };
            if !send(Item::Lagged(lag)).await || !send_snapshot().await {
                return;
            }
            continue;
        }
        let Some(change) = sub.rx.recv().await else {
            return;
        };
        let item = match change {
            Change::Twin(e, _) if !caller.can_read(e.path()) => continue,
            Change::Event(ev) if !caller.can_read(&ev.asset) => continue,
            Change::Twin(e, s) => Item::Change(convert::twin(&e, &s)),
            Change::Event(ev) => {
                last_event_seq = ev.seq;
                Item::Event(convert::event(&ev))
            }
            Change::Model(m) if !caller.can_read(&m.path) => continue,
            Change::Model(m) => Item::ModelChanged(pb::ModelChanged {
                version: m.version,
                path: m.path.to_string(),
                op: m.op.to_owned(),
                detail: m.detail.clone(),
            }),
        };
        if !send(item).await {
            return;
        }
    }
}

/// Serves the API, health and reflection on `listener` (over TLS with `tls`, whose files
/// are reloaded when they change) until `token` is cancelled, admitting connections by
/// `limits`.
pub async fn serve(
    mut api: TwinApi,
    replication: Option<ReplicationApi>,
    listener: TcpListener,
    token: CancellationToken,
    tls: Option<Arc<ServerTls>>,
    limits: Arc<ConnLimits>,
) -> Result<(), String> {
    api.set_token(token.clone());
    // Serving once started (a runtime serves only after its start: store open, twins
    // restored, roles running); NOT_SERVING as soon as the clean stop begins, so balancers
    // and probes stop sending before the listener closes.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TwinServiceServer<TwinApi>>().await;
    let receives = replication.is_some();
    if receives {
        health
            .set_serving::<ReplicationServiceServer<ReplicationApi>>()
            .await;
    }
    {
        let (health, token) = (health.clone(), token.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            health.set_not_serving::<TwinServiceServer<TwinApi>>().await;
            if receives {
                health
                    .set_not_serving::<ReplicationServiceServer<ReplicationApi>>()
                    .await;
            }
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        });
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferrotwin_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferrotwin_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    // Keep-alives end half-open connections (a site whose link died keeps no stream open).
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Every call counted, and a server span per call (OpenTelemetry RPC conventions),
        // child of a `traceparent`.
        .layer(trace::RpcSpanLayer(api.metrics_handle()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TwinServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_optional_service(replication.map(|r| {
            ReplicationServiceServer::new(r)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_BATCH_BYTES)
        }));
    // Fair admission (`limits`: per client address and in all) and a deadline on the HTTP/2
    // preface; idle connections are ended by the keep-alive pings above, not by a timer (a
    // Watch may be quiet for hours).
    let stop = token.clone().cancelled_owned();
    let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls {
            Some(tls) => {
                tls.spawn_reload(token.clone());
                let incoming = ReceiverStream::new(tls_incoming(
                    listener,
                    tls,
                    token.clone(),
                    limits,
                    HTTP2_PREFACE_BYTES,
                    None,
                ));
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
            }
            None => {
                let incoming = TcpListenerStream::new(listener).filter_map(move |s| {
                    let s = match s {
                        Ok(s) => s,
                        Err(e) => return Some(Err(e)),
                    };
                    // Past a cap: closed at once (dropped).
                    let permit = limits.admit(s.peer_addr().ok()?.ip()).ok()?;
                    // Small answers must not wait for the kernel (Nagle and delayed ACKs).
                    let _ = s.set_nodelay(true);
                    Some(Ok(Guarded::new(s, permit, HTTP2_PREFACE_BYTES, None)))
                });
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
            }
        };
    // Graceful shutdown waits for open connections; a client that stopped reading would
    // hold it forever. Give them a grace period, then drop them.
    tokio::select! {
        r = server => r.map_err(|e| e.to_string()),
        _ = async {
            token.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("grpc connections still open {SHUTDOWN_GRACE:?} after shutdown; dropping them");
            Ok(())
        }
    }
}
