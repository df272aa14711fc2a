//! A running site or enterprise: store, registry, twin tree, router, sweeper, replication
//! and the servers, wired together with one shutdown path. The library's entry point:
//! `Runtime::start`, then `serve_grpc` / `serve_http`, then `shutdown`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_models::spec::{AssetDef, PlantSpec};
use ferrotwin_models::{
    AssetPath, Event, EventKind, IngestSink, Level, QualityCode, QualityReason, Severity, Timestamp,
};
use ractor::ActorRef;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::TwinApi;
use crate::connections::{ConnectionError, Connections};
use crate::core::{ClockRules, Credits, Metrics, TwinMsg, TwinSettings, TwinSnapshot, TwinState};
use crate::inference::{ModelCache, OnnxModel};
use crate::registry::Registry;
use crate::replication::enterprise::{EnterpriseReceiver, ReplicationApi};
use crate::replication::site::{SenderStatus, run_sender};
use crate::replication::{EnterpriseRole, SiteReplication};
use crate::router::IngestRouter;
use crate::security::tls::ServerTls;
use crate::security::{Authenticator, SecurityConfig, check_listener};
use crate::store::outbox::OutboxLag;
use crate::store::{EventFilter, Store, StoreConfig, StoreError, StoreStats, codec};
use crate::twin::plant::{PlantMsg, PlantSupervisor};
use crate::twin::{Plant, TwinCtx};
use crate::watch::{WATCH_RING, WatchHub, Watcher};

/// Settings of a runtime that do not come from the plant spec. Read from a file as the
/// `[store]`, `[twins]`, `[ingest]` and `[[connections]]` sections of `config::SiteConfig`.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub store: StoreConfig,
    pub twins: TwinSettings,
    pub ingest: IngestOptions,
    /// PLC connections, started once every twin runs.
    pub connections: Vec<ConnectionConfig>,
    /// Directory of the plant spec file: machine types' model files are relative to it
    /// (`None`: the working directory).
    pub plant_dir: Option<PathBuf>,
    /// Site role: replicate to this enterprise.
    pub replication: Option<SiteReplication>,
    /// Enterprise role: accept these sites' replication (mirror twins, no stale sweep).
    pub enterprise: Option<EnterpriseRole>,
    /// TLS, authentication and grants (`None`: security off, loopback listeners only).
    pub security: Option<SecurityConfig>,
    /// Only check (`ferrotwin check`): PLC connections and the replication sender are
    /// checked against the plant but not started.
    pub check_only: bool,
    /// `connections` as the site file wrote them (canonical TOML, `parse_connections`): a
    /// start runs the connections a live apply recorded while the file's are unchanged
    /// since they were taken. `None`: `connections` always run as given.
    pub connections_toml: Option<String>,
    /// The config file's folder: relative paths of connections applied live are taken from
    /// it (`None`: the working directory).
    pub config_dir: Option<PathBuf>,
    /// The plant given is only the site itself (a config without a plant file): a plant the
    /// data dir recorded (from a fleet template) always wins over it.
    pub plant_from_enterprise: bool,
}

/// The `[ingest]` section.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestOptions {
    /// Readings in twin mailboxes, in all; the router pushes back beyond it.
    pub max_inflight_readings: usize,
    /// Staleness sweep period.
    pub stale_sweep_ms: u64,
    /// Changes buffered per watcher before it is told it lagged.
    pub watch_ring: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            max_inflight_readings: 1 << 20,
            stale_sweep_ms: 1000,
            watch_ring: WATCH_RING,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the twin tree: {0}")]
    Spawn(String),
    #[error("plant spec has no enterprise")]
    EmptyPlant,
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("replication: {0}")]
    Replication(String),
    /// A security setting or file that does not load, or a listener it forbids.
    #[error("security: {0}")]
    Security(String),
    /// Local action rules that cannot run as written (each problem names machine and rule).
    #[error("rules:\n  {}", .0.join("\n  "))]
    Rules(Vec<String>),
}

pub struct Runtime {
    router: Arc<IngestRouter>,
    /// Registry, store, watch hub and counters: what the twins share, and so does the rest.
    ctx: Arc<TwinCtx>,
    /// The plant this runtime runs, and live changes of it.
    applier: Arc<crate::apply::Applier>,
    connections: Arc<Connections>,
    /// Site role with replication: the sender's status.
    replication: Option<Arc<SenderStatus>>,
    /// Enterprise role: the receiver of the sites' streams.
    enterprise: Option<Arc<EnterpriseReceiver>>,
    /// Machine models that could not be loaded (each names its file, type and why).
    model_errors: Vec<String>,
    /// Supervisor of the enterprise twin (and so of the whole tree).
    root: ActorRef<PlantMsg>,
    writer: Option<std::thread::JoinHandle<()>>,
    token: CancellationToken,
    tracker: TaskTracker,
    security: Option<SecurityConfig>,
    auth: Arc<Authenticator>,
    /// Open streams per client, shared by every `TwinApi` this runtime hands out.
    streams: Arc<crate::api::StreamSlots>,
    /// Connection admission of the gRPC and HTTP listeners (and their metrics).
    listeners: Arc<crate::security::conn::Listeners>,
    /// What this runtime's OTLP metric callbacks render; cleared at the stop.
    metric_pages: std::sync::Mutex<Vec<crate::telemetry::MetricPage>>,
    /// The HTTP server's counters, one set for every HTTP listener of this runtime (their
    /// families are registered over OTLP once, by the first `serve_http`).
    http_metrics: Arc<crate::http::HttpMetrics>,
    http_metrics_exported: std::sync::atomic::AtomicBool,
}

impl Runtime {
    /// Opens the store in `data_dir`, restores every twin from its snapshot and starts the
    /// tree. When this returns, every twin runs and ingest may start.
    ///
    /// The phases, in order: the store (and a site's outbox), the registry restored from
    /// the snapshots, the users' models, the shared twin context and the router, the twin
    /// tree, the roles' tasks (enterprise receiver, stale sweeper, replication sender), and
    /// last the PLC connections, so no reading arrives before its twin is restored.
    pub async fn start(
        spec: &PlantSpec,
        data_dir: &Path,
        opts: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        let auth = Arc::new(match &opts.security {
            Some(s) => Authenticator::new(s).map_err(RuntimeError::Security)?,
            None => Authenticator::open(),
        });
        if let Some(r) = &opts.replication {
            r.check().map_err(RuntimeError::Replication)?;
        }
        // Sites authenticate with certificates: an enterprise that authenticates its callers
        // must be able to verify them, or it would refuse every site.
        if opts.enterprise.is_some()
            && !auth.is_open()
            && opts
                .security
                .as_ref()
                .and_then(|s| s.tls.as_ref())
                .and_then(|t| t.client_ca.as_ref())
                .is_none()
        {
            return Err(RuntimeError::Security(
                "an enterprise with [security] needs [security.tls] client_ca: sites authenticate with their certificates (mTLS)".into(),
            ));
        }
        let store = Arc::new(Store::open(data_dir, opts.store.clone())?);
        let mut opts = opts;
        let (running, edited) = running_plant(spec, &mut opts, &store)?;
        let spec = running.spec.as_ref();
        let assets = running.assets.clone();
        let replicate_as = match &opts.replication {
            Some(r) => Some(open_outbox(spec, &assets, &store, r)?),
            None => None,
        };
        let registry = restore_registry(&assets, &store, &opts)?;
        let plant = Arc::new(Plant::new(&assets));
        let root_def = plant.root.clone().ok_or(RuntimeError::EmptyPlant)?;
        let (models, model_errors) = load_models(spec, &opts).await?;
        let metrics = Arc::new(Metrics::default());
        metrics.ingest_limit.store(
            opts.ingest.max_inflight_readings as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let credits = Credits(Arc::new(AtomicUsize::new(0)));
        let router = Arc::new(
            IngestRouter::new(
                registry.clone(),
                metrics.clone(),
                credits.clone(),
                opts.ingest.max_inflight_readings,
            )
            .with_clock_rules(ClockRules::of(&opts.twins)),
        );
        // A site's rules act through the executor started below; an enterprise's mirrors and
        // a check never act.
        let (actions_tx, actions_rx) = if opts.enterprise.is_none() && !opts.check_only {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::twin::rules::ACTION_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let ctx = Arc::new(TwinCtx {
            registry: registry.clone(),
            store: store.clone(),
            hub: Arc::new(WatchHub::new(opts.ingest.watch_ring)),
            plant: std::sync::RwLock::new(plant.clone()),
            settings: opts.twins.clone(),
            metrics,
            credits,
            models: std::sync::RwLock::new(Arc::new(models)),
            actions: actions_tx,
        });
        let writer = store.start_writer(registry.clone());
        let root_entry = registry
            .by_path(&root_def.path)
            .expect("the root was inserted above");
        let root =
            match ractor::Actor::spawn(None, PlantSupervisor, (ctx.clone(), root_entry)).await {
                Ok((root, _)) => root,
                Err(e) => {
                    store.stop();
                    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                    return Err(RuntimeError::Spawn(e.to_string()));
                }
            };
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let apply_rules = crate::apply::ApplyRules {
            enterprise: opts.enterprise.is_some(),
            replication: opts.replication.clone(),
            plant_dir: opts.plant_dir.clone(),
            config_dir: opts.config_dir.clone(),
            accept: opts
                .enterprise
                .as_ref()
                .map(|e| e.accept.clone())
                .unwrap_or_default(),
            sender: None,
        };
        // Adapters start last: every twin is restored before the first reading arrives.
        let replicate_as = replicate_as.filter(|_| !opts.check_only);
        let site_plant = Some((running.version, running.spec.as_ref()));
        let started = start_roles(&opts, &ctx, replicate_as, site_plant, &token, &tracker)
            .and_then(|roles| {
                if opts.check_only {
                    let (_, writers) = Connections::check(&opts.connections, &registry)?;
                    crate::twin::rules::check_all(&registry, &|a, p| {
                        writers.contains_key(&(a.clone(), p.to_owned()))
                    })
                    .map_err(RuntimeError::Rules)?;
                    return Ok((roles, Connections::default()));
                }
                let connections = Connections::start(
                    opts.connections,
                    &registry,
                    router.clone(),
                    ctx.clone(),
                    &tracker,
                    &token,
                )?;
                crate::twin::rules::check_all(&registry, &|a, p| connections.writes(a, p))
                    .map_err(RuntimeError::Rules)?;
                Ok((roles, connections))
            });
        let (roles, connections) = match started {
            Ok(started) => started,
            Err(e) => {
                // Nothing is serving yet: stop what did start, in the clean stop's order.
                token.cancel();
                tracker.close();
                tracker.wait().await;
                let _ = root
                    .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(30)))
                    .await;
                store.stop();
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
                return Err(e);
            }
        };
        tracing::info!(twins = registry.len(), data_dir = %data_dir.display(),
            plant_version = running.version, "runtime started");
        // The plant this start runs is on record only now that it started.
        if !opts.check_only {
            let store = store.clone();
            let record = running.record();
            match tokio::task::spawn_blocking(move || store.save_plant(&record)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "the running plant is not on record"),
                Err(e) => tracing::error!(error = %e, "the running plant is not on record"),
            }
        }
        // An edited plant file replaced a recorded plant: said as an apply says it.
        for line in &edited {
            ctx.emit(Event::new(
                line.path.clone(),
                Timestamp::now(),
                EventKind::Model,
                Severity::Info,
                format!(
                    "plant v{} taken from the edited plant file at start: {} {}",
                    running.version,
                    line.op.as_str(),
                    line.detail
                ),
            ))
            .await;
        }
        let connections = Arc::new(connections);
        let mut apply_rules = apply_rules;
        apply_rules.sender = roles.sender.clone();
        let applier = Arc::new(crate::apply::Applier::new(
            ctx.clone(),
            connections.clone(),
            apply_rules,
            running,
        ));
        // A site applies the fleet templates its enterprise keeps for it.
        // (Weak: the applier holds the sender's status, which holds the hook.)
        if let Some(sender) = &roles.sender {
            let applier = Arc::downgrade(&applier);
            sender.set_template_hook(Arc::new(move |t| {
                let applier = applier.upgrade();
                Box::pin(async move {
                    let Some(applier) = applier else {
                        return Err("the runtime is stopping".to_owned());
                    };
                    applier
                        .apply(crate::apply::ApplyRequest {
                            plant_toml: t.plant_toml,
                            base_version: applier.current().version,
                            dry_run: false,
                            by: format!("fleet template v{}", t.version),
                            site_toml: (!t.site_toml.is_empty()).then_some(t.site_toml),
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            }));
        }
        // An enterprise's mirrors follow the plants its sites send.
        if let Some(receiver) = &roles.enterprise {
            let applier = Arc::downgrade(&applier);
            receiver.set_plant_hook(Arc::new(move |site, version, toml| {
                let applier = applier.upgrade();
                Box::pin(async move {
                    match applier {
                        Some(a) => a.apply_site(site, version, toml).await,
                        None => Err("the runtime is stopping".to_owned()),
                    }
                })
            }));
        }
        let rt = Runtime {
            model_errors,
            router,
            ctx,
            applier,
            connections,
            replication: roles.sender,
            enterprise: roles.enterprise,
            root,
            writer: Some(writer),
            token,
            tracker,
            security: opts.security,
            auth,
            streams: Arc::default(),
            listeners: Arc::default(),
            metric_pages: std::sync::Mutex::default(),
            http_metrics: Arc::default(),
            http_metrics_exported: std::sync::atomic::AtomicBool::new(false),
        };
        if let Some(rx) = actions_rx {
            rt.tracker
                .spawn(crate::api::actions::run(rt.api(), rx, rt.token.clone()));
        }
        if crate::telemetry::metrics_on() && !rt.token.is_cancelled() {
            // Everything `/metrics` shows but the HTTP server's families, over OTLP; nothing
            // once this runtime stops.
            let api = rt.api();
            let page = crate::telemetry::MetricPage::new(move || api.render_metrics());
            rt.keep_metric_page(page.clone());
            crate::telemetry::register_metrics(
                crate::api::prometheus::FAMILIES
                    .iter()
                    .filter(|f| f.component != "http"),
                &rt.node_name(),
                Arc::new(move || page.render()),
            );
        }
        Ok(rt)
    }

    /// What this runtime is in a process's OTLP metrics (`ferrotwin.node`): its role and,
    /// for a site, the site it replicates as.
    fn node_name(&self) -> String {
        match &self.replication {
            Some(s) => format!("site {}", s.site),
            None => self.api().role().to_owned(),
        }
    }

    fn keep_metric_page(&self, page: crate::telemetry::MetricPage) {
        self.metric_pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(page);
    }

    /// The API this runtime serves, in process: the same calls gRPC and HTTP answer through.
    pub fn api(&self) -> TwinApi {
        TwinApi::new(self.ctx.clone(), self.connections.clone())
            .with_replication(self.replication.clone(), self.enterprise.clone())
            .with_auth(self.auth.clone(), self.streams.clone())
            .with_listeners(self.listeners.clone())
            .with_applier(self.applier.clone())
    }

    /// Where readings go in: the ingest router. It pushes back (`PushBackReason::Busy`)
    /// while twins are behind and refuses (`Closed`) once the runtime stops.
    pub fn ingest(&self) -> Arc<dyn IngestSink> {
        self.router.clone()
    }

    /// Readings taken by the router and not yet handled by their twins.
    pub fn readings_in_flight(&self) -> usize {
        self.router.inflight()
    }

    /// A handle on the same count, for a thread that holds no `Runtime` (a driver loop).
    pub fn ingest_credits(&self) -> Credits {
        self.ctx.credits.clone()
    }

    /// The hot-path counters (ingest, rejections, restarts, events by kind).
    pub fn metrics(&self) -> &Metrics {
        &self.ctx.metrics
    }

    /// The store writer's counters (flushes, snapshots, chunks, events written).
    pub fn store_stats(&self) -> &StoreStats {
        &self.ctx.store.stats
    }

    /// A site's replication outbox: what is staged and not yet acked. `None` without
    /// replication.
    pub fn outbox_lag(&self) -> Option<OutboxLag> {
        self.ctx.store.outbox().map(|o| o.lag())
    }

    /// A watcher of the twins below `prefix` (everything when `None`), with events when
    /// `events`. It holds at most the watch ring; past it, it is told it lagged.
    pub fn watch(&self, prefix: Option<AssetPath>, events: bool) -> Watcher {
        self.ctx.hub.subscribe(prefix, events)
    }

    /// Stored events, oldest first, from `filter.after_seq`; with the seq to go on from.
    pub fn events(&self, filter: &EventFilter) -> Result<(Vec<Event>, u64), StoreError> {
        self.ctx.store.list_events(filter)
    }

    /// Waits until every reading taken so far is handled: none in flight, then each sensor
    /// twin and then each machine twin answered a question queued behind its messages
    /// (sensors first: their last drains may still send their machine an `Evaluate`), then
    /// one store flush after that, so their events and history are on disk.
    pub async fn settle(&self) {
        while self.router.inflight() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for level in [Level::Sensor, Level::Machine] {
            crate::twin::flush_all(&self.ctx.registry, level, Duration::from_secs(30)).await;
        }
        self.store_flushed().await;
    }

    /// Waits until everything queued for the store before the call is on disk.
    pub async fn store_flushed(&self) {
        let generation = self.ctx.store.queue_generation();
        self.ctx.store.wait_flushed(generation).await;
    }

    #[cfg(feature = "testing")]
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.ctx.registry
    }

    #[cfg(feature = "testing")]
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.ctx.store
    }

    #[cfg(feature = "testing")]
    pub(crate) fn sender(&self) -> Option<Arc<SenderStatus>> {
        self.replication.clone()
    }

    /// Machine models that could not be loaded (each names its file, type and why); their
    /// machines run without them.
    pub fn model_errors(&self) -> &[String] {
        &self.model_errors
    }

    /// Serves the gRPC API on `listener` until shutdown.
    pub fn serve_grpc(&self, listener: TcpListener) -> Result<(), RuntimeError> {
        let tls = self.listener_tls("grpc", &listener, b"h2")?;
        let service = self.api();
        let replication = self
            .enterprise
            .clone()
            .map(|r| ReplicationApi::new(r, !self.auth.is_open()));
        let token = self.token.child_token();
        let limits = self.listeners.grpc.clone();
        self.tracker.spawn(async move {
            if let Err(e) =
                crate::grpc::serve(service, replication, listener, token, tls, limits).await
            {
                tracing::error!(error = %e, "grpc server stopped");
            }
        });
        Ok(())
    }

    /// The TLS of a listener (`None`: plaintext), after refusing one the security config
    /// forbids (a non-loopback address without TLS and authentication).
    fn listener_tls(
        &self,
        what: &str,
        listener: &TcpListener,
        alpn: &[u8],
    ) -> Result<Option<Arc<ServerTls>>, RuntimeError> {
        let addr = listener
            .local_addr()
            .map_err(|e| RuntimeError::Security(format!("{what}: {e}")))?;
        check_listener(what, addr, self.security.as_ref()).map_err(RuntimeError::Security)?;
        match self.security.as_ref().and_then(|s| s.tls.as_ref()) {
            Some(t) => Ok(Some(
                ServerTls::load(t, &[alpn]).map_err(RuntimeError::Security)?,
            )),
            None => Ok(None),
        }
    }

    /// Serves the web browser, the JSON API, `/healthz` and `/metrics` on `listener` until
    /// shutdown.
    pub fn serve_http(&self, listener: TcpListener) -> Result<(), RuntimeError> {
        let tls = self.listener_tls("http", &listener, b"http/1.1")?;
        let token = self.token.child_token();
        let state = self.http_state(token.clone());
        if crate::telemetry::metrics_on()
            && !self
                .http_metrics_exported
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            // The HTTP server's families, over OTLP (the runtime's are registered at start),
            // once: every listener counts into the same `http_metrics`.
            let http = state.clone();
            let page = crate::telemetry::MetricPage::new(move || http.render_metrics());
            self.keep_metric_page(page.clone());
            crate::telemetry::register_metrics(
                crate::api::prometheus::FAMILIES
                    .iter()
                    .filter(|f| f.component == "http"),
                &self.node_name(),
                Arc::new(move || page.render()),
            );
        }
        let limits = self.listeners.http.clone();
        self.tracker.spawn(async move {
            if let Err(e) = crate::http::serve(listener, state, token, tls, limits).await {
                tracing::error!(error = %e, "http server stopped");
            }
        });
        Ok(())
    }

    /// What the HTTP server reads.
    fn http_state(&self, token: CancellationToken) -> crate::http::HttpState {
        crate::http::HttpState::new(self.api(), token).with_metrics(self.http_metrics.clone())
    }

    /// Prometheus text of everything this runtime counts: ingest and twins (`Metrics`), PLC
    /// connections (labelled by connection name: a handful per site), the replication outbox
    /// of a site and the freshness of an enterprise's sites.
    pub fn render_metrics(&self) -> String {
        self.api().render_metrics()
    }

    /// Clean stop: refuse new readings, write every history tail, stop the tree, flush.
    pub async fn shutdown(mut self) {
        self.router.close();
        self.token.cancel();
        // The OTLP callbacks let go of this runtime (its store, its twins).
        for page in self
            .metric_pages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            page.clear();
        }
        self.tracker.close();
        self.tracker.wait().await;
        // Let queued readings drain (bounded wait), then write every history tail.
        for _ in 0..200 {
            if self.router.inflight() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Each sensor finishes what it is applying, then queues its tail; many at a time.
        crate::twin::flush_all(
            &self.ctx.registry,
            ferrotwin_models::Level::Sensor,
            Duration::from_secs(5),
        )
        .await;
        let _ = self
            .root
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(30)))
            .await;
        self.ctx.store.stop();
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        tracing::info!("runtime stopped");
    }

    /// Stops without any flush, as a power cut would (tests of crash recovery): actors are
    /// killed, the writer ends without writing what it holds, and every handle on the store
    /// is released so the data dir can be opened again.
    pub async fn abort(mut self) {
        self.router.close();
        self.token.cancel();
        self.ctx.store.abort();
        self.root.kill();
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let ctx = self.ctx.clone();
        drop(self);
        for _ in 0..1000 {
            if Arc::strong_count(&ctx) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The plant a start runs: the plant file, unless the data dir records a plant taken from
/// this same file since (a live apply changed it: a restart never undoes an apply). A file
/// edited since it was last taken is the next version. The connections follow the same
/// rule (`opts.connections` are replaced by the recorded ones while the site file's are
/// unchanged). The record is written before any twin starts (not for `check`, whose data dir
/// is thrown away).
fn running_plant(
    file: &PlantSpec,
    opts: &mut RuntimeOptions,
    store: &Store,
) -> Result<
    (
        crate::apply::PlantVersion,
        Vec<ferrotwin_models::change::Change>,
    ),
    RuntimeError,
> {
    use crate::apply::{PlantVersion, digest, text_digest};
    let file_digest = digest(file);
    let conns_digest = opts.connections_toml.as_deref().map(text_digest);
    // One expansion of the plant that runs (`assets`, when the caller has it already).
    let running =
        |spec: PlantSpec, assets: Option<Vec<AssetDef>>, version: u64, applied, by| PlantVersion {
            version,
            assets: Arc::new(assets.unwrap_or_else(|| spec.assets())),
            spec: Arc::new(spec),
            file_digest: file_digest.clone(),
            applied,
            applied_by: by,
            connections_toml: opts.connections_toml.clone().unwrap_or_default(),
            connections_file_digest: conns_digest.clone().unwrap_or_default(),
        };
    let corrupt = |what: String| StoreError::Corrupt {
        dir: PathBuf::new(),
        tree: "meta",
        key: "plant".into(),
        what,
    };
    let Some(r) = store.load_plant()? else {
        return Ok((
            running(file.clone(), None, 1, Timestamp::now(), "plant file".into()),
            Vec::new(),
        ));
    };
    let recorded = PlantSpec::from_toml(&r.plant_toml, "the recorded plant");
    let mut edited = Vec::new();
    // A bare site (no plant file) never replaces what it recorded.
    let file_unchanged = r.file_digest == file_digest || opts.plant_from_enterprise;
    let applied = Timestamp(r.applied_us);
    let mut running = match recorded {
        // The file is as the last start took it: the record (maybe applied since).
        Ok(recorded) if file_unchanged => {
            running(recorded, None, r.version, applied, r.applied_by.clone())
        }
        Err(e) if file_unchanged => return Err(corrupt(e.to_string()).into()),
        Ok(recorded) if recorded == *file => {
            running(file.clone(), None, r.version, applied, r.applied_by.clone())
        }
        recorded => {
            // The file was edited since it was taken: it runs, as the next version. What it
            // changes against the record is logged and evented (it may undo live applies).
            let file_assets = file.assets();
            if let Ok(recorded) = &recorded {
                let plan = ferrotwin_models::change::plan(&recorded.assets(), &file_assets);
                tracing::warn!(
                    version = r.version + 1,
                    changes = %plan.summary(),
                    recorded_by = %r.applied_by,
                    "the plant file was edited since the last start: taking it as the next version"
                );
                edited = plan.lines;
            } else {
                tracing::warn!(
                    version = r.version + 1,
                    "the recorded plant does not read; taking the plant file as the next version"
                );
            }
            running(
                file.clone(),
                Some(file_assets),
                r.version + 1,
                Timestamp::now(),
                "plant file".into(),
            )
        }
    };
    // The connections: the record's while the site file's are as last taken.
    if let Some(d) = &conns_digest
        && *d == r.connections_file_digest
        && !r.connections_toml.is_empty()
    {
        let (configs, text) =
            crate::connections::parse_connections(&r.connections_toml, opts.config_dir.as_deref())
                .map_err(corrupt)?;
        opts.connections = configs;
        running.connections_toml = text;
    }
    Ok((running, edited))
}

/// A site's outbox, sized for the plant: the site it replicates as and its settings.
fn open_outbox(
    spec: &PlantSpec,
    assets: &[AssetDef],
    store: &Store,
    r: &SiteReplication,
) -> Result<(String, SiteReplication), RuntimeError> {
    let site = r.site_of(spec).map_err(RuntimeError::Replication)?;
    r.check_outbox_size(assets)
        .map_err(RuntimeError::Replication)?;
    let outbox = store.enable_outbox(r.max_outbox_bytes, AssetPath::parse(&site).ok())?;
    outbox.set_history(
        r.history_settings(spec, assets)
            .map_err(RuntimeError::Replication)?,
    );
    Ok((site, r.clone()))
}

/// A registry entry for every asset of the spec, each with its stored snapshot (a fresh
/// one for an asset never seen). Snapshots of assets no longer in the spec stay on disk.
fn restore_registry(
    assets: &[AssetDef],
    store: &Store,
    opts: &RuntimeOptions,
) -> Result<Arc<Registry>, RuntimeError> {
    let mut records = store.load_snapshots()?;
    let registry = Arc::new(Registry::default());
    if opts.enterprise.is_some() {
        registry.set_mirrors_only();
    }
    let start_us = Timestamp::now().0;
    for def in assets {
        let snap = match records.remove(&def.path.id()) {
            Some(r) => codec::decode_snapshot(&def.kind, &r, opts.enterprise.is_none()),
            None => TwinSnapshot::initial(&def.kind),
        };
        registry.insert(def.clone(), snap, start_us);
    }
    if !records.is_empty() {
        tracing::info!(
            count = records.len(),
            "snapshots of assets no longer in the plant spec kept on disk"
        );
    }
    Ok(registry)
}

/// The users' ONNX models by machine type, and an error for each that cannot be used
/// (naming its file, type and shapes): the machines of that type run without it (their
/// detectors still do). An enterprise runs no models: its mirrors take their site's scores.
async fn load_models(
    spec: &PlantSpec,
    opts: &RuntimeOptions,
) -> Result<(HashMap<String, Arc<OnnxModel>>, Vec<String>), RuntimeError> {
    if opts.enterprise.is_some() {
        return Ok((HashMap::new(), Vec::new()));
    }
    let spec = spec.clone();
    let dir = opts.plant_dir.clone().unwrap_or_default();
    let (models, errors) =
        tokio::task::spawn_blocking(move || ModelCache::load_for_spec(&spec, &dir))
            .await
            .map_err(|e| RuntimeError::Spawn(format!("loading models: {e}")))?;
    for e in &errors {
        tracing::error!(error = %e, "machine model not loaded; the type runs without it");
    }
    Ok((models, errors.iter().map(ToString::to_string).collect()))
}

/// The tasks of this runtime's role: an enterprise's receiver of its sites' streams, or a
/// site's stale sweeper (mirrors take their quality from their site: staleness is the site's
/// to judge) and, when it replicates, its sender.
struct Roles {
    enterprise: Option<Arc<EnterpriseReceiver>>,
    sender: Option<Arc<SenderStatus>>,
}

fn start_roles(
    opts: &RuntimeOptions,
    ctx: &Arc<TwinCtx>,
    replicate_as: Option<(String, SiteReplication)>,
    site_plant: Option<(u64, &PlantSpec)>,
    token: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Roles, RuntimeError> {
    let enterprise = match &opts.enterprise {
        Some(role) => Some(Arc::new(
            EnterpriseReceiver::new(
                ctx.clone(),
                &role.accept,
                token.child_token(),
                tracker.clone(),
            )
            .map_err(RuntimeError::Replication)?,
        )),
        None => None,
    };
    if enterprise.is_none() {
        tracker.spawn(sweep_stale(
            ctx.registry.clone(),
            opts.ingest.stale_sweep_ms,
            token.child_token(),
        ));
    }
    let sender = replicate_as.map(|(site, cfg)| {
        let status = Arc::new(SenderStatus::new(&site, &cfg.enterprise));
        status.load_template_state(&ctx.store);
        // Its own plant goes with every hello, the first included.
        if let Some((version, spec)) = site_plant {
            let _ = status.init_plant(version, spec);
        }
        tracker.spawn(run_sender(
            ctx.clone(),
            site,
            cfg,
            status.clone(),
            token.child_token(),
        ));
        status
    });
    Ok(Roles { enterprise, sender })
}

/// Each sensor's history policy from its machine's type.
/// Turns sensors stale when no reading came within their threshold. One scan of the
/// registry per period; a message only to the twins that turned stale.
async fn sweep_stale(registry: Arc<Registry>, period_ms: u64, token: CancellationToken) {
    // Staleness counts from when the tree is up (a restored twin has had no chance to hear
    // from its source yet), not from when its registry entry was made.
    let start_us = Timestamp::now().0;
    for e in registry.all() {
        e.last_seen_us.fetch_max(start_us, Ordering::Relaxed);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(period_ms.max(10)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let at = Timestamp::now();
        for e in registry.all() {
            let stale_ms = i64::try_from(e.stale_after_ms()).unwrap_or(i64::MAX / 1000);
            if stale_ms == 0 || e.stale.load(Ordering::Relaxed) {
                continue;
            }
            if at.0.saturating_sub(e.last_seen_us.load(Ordering::Relaxed))
                < stale_ms.saturating_mul(1000)
            {
                continue;
            }
            let snap = e.snapshot();
            if let TwinState::Sensor(s) = &snap.state
                && (s.quality.reason == QualityReason::Stale || s.quality.code == QualityCode::Bad)
            {
                continue;
            }
            e.stale.store(true, Ordering::Relaxed);
            if !e.send(TwinMsg::CheckStale(at)) {
                // Restarting: look again at the next sweep.
                e.stale.store(false, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ractor::{Actor, ActorProcessingErr};
    use tokio::sync::mpsc;
    use tokio::time::{Instant, timeout};

    use super::*;

    /// The plant and connections a start runs: the file's at first; the record's after an
    /// apply while the files are unchanged; an edited file's as the next version.
    #[test]
    fn a_start_runs_the_recorded_plant_and_connections_until_a_file_is_edited() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("store");
        let plant = |limit: u32| {
            PlantSpec::from_toml(
                &format!(
                    "version = 1\nenterprise = \"e\"\n[machine_types.m]\nideal_cycle_ms = {limit}\n[[machine_types.m.sensors]]\nname = \"t\"\n[[sites]]\nname = \"s\"\n[[sites.areas]]\nname = \"a\"\n[[sites.areas.lines]]\nname = \"l\"\nmachines = [{{ name = \"m1\", type = \"m\" }}]\n"
                ),
                "p",
            )
            .expect("plant")
        };
        let conns = |endpoint: &str| {
            let text = format!(
                "[[connections]]\nprotocol = \"modbus\"\nname = \"plc\"\nendpoint = \"{endpoint}\"\n[[connections.tags]]\nasset = \"e/s/a/l/m1/t\"\nproperty = \"value\"\nregister = \"holding\"\naddress = 1\ndata_type = \"u16\"\n"
            );
            crate::connections::parse_connections(&text, None).expect("connections")
        };
        let endpoint = |o: &RuntimeOptions| match &o.connections[0] {
            ConnectionConfig::Modbus(m) => m.endpoint.clone(),
            _ => unreachable!("modbus"),
        };
        let opts = |text: &str| {
            let (connections, text) = conns(text);
            RuntimeOptions {
                connections,
                connections_toml: Some(text),
                ..RuntimeOptions::default()
            }
        };
        // First start: the files, version 1.
        let run = |file: &PlantSpec, o: &mut RuntimeOptions| {
            let (v, _) = running_plant(file, o, &store).expect("runs");
            store.save_plant(&v.record()).expect("saved");
            v
        };
        let mut o = opts("10.0.0.1:502");
        let v = run(&plant(1000), &mut o);
        assert_eq!((v.version, endpoint(&o).as_str()), (1, "10.0.0.1:502"));
        // A live apply: plant and connections recorded as version 2.
        let mut applied = v.clone();
        applied.version = 2;
        applied.spec = Arc::new(plant(800));
        applied.connections_toml = conns("10.0.0.2:502").1;
        store.save_plant(&applied.record()).expect("saved");
        // Unchanged files: the record runs.
        let mut o = opts("10.0.0.1:502");
        let v = run(&plant(1000), &mut o);
        assert_eq!(v.version, 2);
        assert_eq!(v.spec.machine_types["m"].ideal_cycle_ms, 800.0);
        assert_eq!(endpoint(&o), "10.0.0.2:502");
        // An edited site file: its connections run; the plant stays the record's.
        let mut o = opts("10.0.0.3:502");
        let v = run(&plant(1000), &mut o);
        assert_eq!((v.version, endpoint(&o).as_str()), (2, "10.0.0.3:502"));
        // A bare site (no plant file) never replaces its record, whatever it is given.
        let bare = PlantSpec::from_toml(
            "version = 1\nenterprise = \"e\"\n[[sites]]\nname = \"s\"\n",
            "bare",
        )
        .expect("bare");
        let mut o = opts("10.0.0.3:502");
        o.plant_from_enterprise = true;
        let (v, _) = running_plant(&bare, &mut o, &store).expect("runs");
        assert_eq!(v.version, 2);
        assert_eq!(v.spec.machine_types["m"].ideal_cycle_ms, 800.0);
        // An edited plant file: the next version.
        let mut o = opts("10.0.0.3:502");
        let (v, edited) = running_plant(&plant(600), &mut o, &store).expect("runs");
        assert_eq!(v.version, 3);
        assert_eq!(
            edited.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["~ e/s/a/l/m1  ideal cycle 800 ms → 600 ms"],
            "what the edited file changes against the record is said"
        );
        assert_eq!(v.spec.machine_types["m"].ideal_cycle_ms, 600.0);
    }

    /// Stands in for a sensor twin: passes on the `CheckStale` it is sent.
    struct Probe;

    impl Actor for Probe {
        type Msg = TwinMsg;
        type State = mpsc::UnboundedSender<Timestamp>;
        type Arguments = mpsc::UnboundedSender<Timestamp>;

        async fn pre_start(
            &self,
            _: ActorRef<TwinMsg>,
            told: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(told)
        }

        async fn handle(
            &self,
            _: ActorRef<TwinMsg>,
            msg: TwinMsg,
            told: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let TwinMsg::CheckStale(at) = msg {
                let _ = told.send(at);
            }
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_tells_a_silent_sensor_at_its_next_sweep_and_only_once() {
        // One sensor, stale after 3 periods of 1 s.
        let (_, registry) = crate::registry::fixture::one_machine(&["a"]);
        let sensor = registry
            .by_path(&AssetPath::parse("e/s/a/l/m1/a").expect("path"))
            .expect("sensor");
        assert_eq!(sensor.stale_after_ms(), 3_000);
        let (tx, mut told) = mpsc::unbounded_channel();
        let (probe, _) = Actor::spawn(None, Probe, tx).await.expect("probe");
        sensor.set_actor(Some(probe.clone()));

        let period = Duration::from_millis(500);
        let token = CancellationToken::new();
        let sweeper = tokio::spawn(sweep_stale(
            registry.clone(),
            period.as_millis() as u64,
            token.clone(),
        ));
        // The sweeper starts counting from now (wall clock): wait until it has, then make
        // the sensor's last reading ten seconds old.
        while sensor.last_seen_us.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        sensor
            .last_seen_us
            .store(Timestamp::now().0 - 10_000_000, Ordering::Relaxed);

        assert_eq!(
            timeout(period - Duration::from_millis(1), told.recv())
                .await
                .ok(),
            None,
            "not before the next sweep"
        );
        timeout(Duration::from_millis(2), told.recv())
            .await
            .expect("told at the next sweep")
            .expect("probe runs");
        assert_eq!(Instant::now() - started, period);
        assert!(sensor.stale.load(Ordering::Relaxed));
        assert_eq!(
            timeout(period * 10, told.recv()).await.ok(),
            None,
            "a sensor already told is not told again at every sweep"
        );

        token.cancel();
        sweeper.await.expect("the sweeper ends when cancelled");
        probe.stop(None);
    }
}
