//! The site's PLC connections: starts one adapter per `[[connections]]` entry after the twin
//! tree is up, records what adapters report as events on the plant's assets, and routes
//! write-back requests to the adapter that maps the property.
//!
//! Every tag must name an asset of the plant spec with a property its level has: adapters
//! never create twins, and a tag that does not fit is a config error naming connection and
//! tag, at start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_adapters::{
    AdapterEvent, AdapterEventKind, AdapterHandle, ConnectionConfig, StatusSnapshot, TagKind,
    TagTarget, WriteAck, WriteError, WriteRequest,
};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetPath, Event, EventKind, IngestSink, Property, Severity};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::registry::Registry;
use crate::twin::TwinCtx;

/// How long shutdown waits for an adapter task to end after its token is cancelled.
const ADAPTER_STOP_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Config(#[from] ferrotwin_adapters::ConfigError),
    #[error("connection {connection:?}: tag {asset} {property}: {what}")]
    Tag {
        connection: String,
        asset: AssetPath,
        property: String,
        what: String,
    },
    #[error("connection name {0:?} is used twice")]
    DuplicateName(String),
    #[error("connection {0:?}: not started, the runtime is stopping")]
    Stopping(String),
    #[error(
        "{asset} {property} is written by two connections ({first:?} and {second:?}): a write \
         must have one way to the PLC"
    )]
    TwoWriters {
        asset: AssetPath,
        property: String,
        first: String,
        second: String,
    },
}

/// One running adapter, the asset its connection-wide events go to, the config it runs and
/// what stops it.
struct Connection {
    handle: AdapterHandle,
    home: AssetPath,
    config: ConnectionConfig,
    token: CancellationToken,
    /// Ends when the adapter's task has ended (or was given up on).
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// Each connection's home (the common ancestor of its tags) and, per written (asset,
/// property), the index of the connection that writes it.
pub type ConnectionPlan = (Vec<Option<AssetPath>>, HashMap<(AssetPath, String), usize>);

/// The connections running now.
#[derive(Default)]
struct ConnectionSet {
    all: Vec<Arc<Connection>>,
    /// (asset, property) → index in `all` of the connection that writes it.
    writers: HashMap<(AssetPath, String), usize>,
}

/// What starts an adapter (kept for connections added by a live apply).
struct Starter {
    sink: Arc<dyn IngestSink>,
    /// Taken at the stop, so the event recorder ends once the adapters' own senders are gone.
    events: Arc<std::sync::Mutex<Option<mpsc::Sender<AdapterEvent>>>>,
    ctx: Arc<TwinCtx>,
    tracker: TaskTracker,
    token: CancellationToken,
    /// Each connection's home, read by the event recorder.
    homes: Arc<std::sync::RwLock<HashMap<String, AssetPath>>>,
}

/// What a reload of the connections did, by connection name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ConnectionChanges {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl ConnectionChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The running adapters of a site. A live apply may add, change (stop, then start) and remove
/// connections; the others keep running untouched.
#[derive(Default)]
pub struct Connections {
    set: std::sync::RwLock<ConnectionSet>,
    /// `None` for a runtime that runs no adapters (`check`).
    starter: Option<Starter>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl Connections {
    /// Checks every connection against the plant without starting anything: unique names,
    /// every tag on an asset and property the plant has, one writer per property. Returns
    /// each connection's home (the common ancestor of its tags) and the writers.
    pub fn check(
        configs: &[ConnectionConfig],
        registry: &Registry,
    ) -> Result<ConnectionPlan, ConnectionError> {
        let kind_of = |p: &AssetPath| registry.by_path(p).map(|e| e.def.kind.clone());
        Self::check_against(configs, &kind_of)
    }

    /// `check` against a plant `kind_of` describes (`None`: no such asset).
    pub fn check_against(
        configs: &[ConnectionConfig],
        kind_of: &(dyn Fn(&AssetPath) -> Option<AssetKind> + Sync),
    ) -> Result<ConnectionPlan, ConnectionError> {
        let mut homes = Vec::with_capacity(configs.len());
        let mut writers = HashMap::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        for (i, c) in configs.iter().enumerate() {
            if names.insert(c.name().to_owned(), ()).is_some() {
                return Err(ConnectionError::DuplicateName(c.name().to_owned()));
            }
            let targets = c.targets()?;
            for t in &targets {
                check_target(c.name(), kind_of, t)?;
                if t.writable {
                    let key = (t.asset.clone(), t.property_name().to_owned());
                    if let Some(&first) = writers.get(&key) {
                        let first: &ConnectionConfig = &configs[first];
                        return Err(ConnectionError::TwoWriters {
                            asset: key.0,
                            property: key.1,
                            first: first.name().to_owned(),
                            second: c.name().to_owned(),
                        });
                    }
                    writers.insert(key, i);
                }
            }
            homes.push(common_ancestor(targets.iter().map(|t| &t.asset)));
        }
        Ok((homes, writers))
    }

    /// Checks every connection against the plant (`registry`), then starts the adapters,
    /// pushing into `sink` and reporting to `ctx`'s event log. Nothing starts if any
    /// connection is wrong.
    pub fn start(
        configs: Vec<ConnectionConfig>,
        registry: &Registry,
        sink: Arc<dyn IngestSink>,
        ctx: Arc<TwinCtx>,
        tracker: &TaskTracker,
        token: &CancellationToken,
    ) -> Result<Connections, ConnectionError> {
        let (homes, writers) = Connections::check(&configs, registry)?;
        let (events_tx, events_rx) = mpsc::channel(ferrotwin_adapters::EVENT_QUEUE);
        let events = Arc::new(std::sync::Mutex::new(Some(events_tx)));
        let starter = Starter {
            sink,
            events: events.clone(),
            ctx: ctx.clone(),
            tracker: tracker.clone(),
            token: token.clone(),
            homes: Arc::default(),
        };
        let mut all = Vec::with_capacity(configs.len());
        for (config, home) in configs.into_iter().zip(homes) {
            all.push(Arc::new(starter.start_one(config, home)?));
        }
        {
            let token = token.clone();
            tracker.spawn(async move {
                token.cancelled().await;
                events.lock().unwrap_or_else(|p| p.into_inner()).take();
            });
        }
        tracker.spawn(record_events(
            events_rx,
            starter.homes.clone(),
            ctx,
            token.clone(),
        ));
        Ok(Connections {
            set: std::sync::RwLock::new(ConnectionSet { all, writers }),
            starter: Some(starter),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The configs running now, in order.
    pub fn configs(&self) -> Vec<ConnectionConfig> {
        self.set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .all
            .iter()
            .map(|c| c.config.clone())
            .collect()
    }

    /// What `reload` with `configs` would do (names), checked against the plant `kind_of`
    /// describes; nothing changes.
    pub fn plan_reload(
        &self,
        configs: &[ConnectionConfig],
        kind_of: &(dyn Fn(&AssetPath) -> Option<AssetKind> + Sync),
    ) -> Result<ConnectionChanges, ConnectionError> {
        Self::check_against(configs, kind_of)?;
        let running = self.configs();
        let mut c = ConnectionChanges::default();
        for new in configs {
            match running.iter().find(|r| r.name() == new.name()) {
                None => c.added.push(new.name().to_owned()),
                Some(r) if r == new => c.unchanged.push(new.name().to_owned()),
                Some(_) => c.changed.push(new.name().to_owned()),
            }
        }
        for r in &running {
            if !configs.iter().any(|n| n.name() == r.name()) {
                c.removed.push(r.name().to_owned());
            }
        }
        Ok(c)
    }

    /// Runs `configs` from now on: stops the removed and changed connections (each within
    /// `ADAPTER_STOP_WAIT`), starts the changed and added ones; unchanged ones keep running
    /// untouched. The caller checked them (`plan_reload`) against the plant that runs.
    pub async fn reload(
        &self,
        configs: Vec<ConnectionConfig>,
        kind_of: &(dyn Fn(&AssetPath) -> Option<AssetKind> + Sync),
    ) -> Result<ConnectionChanges, ConnectionError> {
        let _one = self.reloading.lock().await;
        let changes = self.plan_reload(&configs, kind_of)?;
        let Some(starter) = &self.starter else {
            return Ok(changes);
        };
        let (homes, writers) = Self::check_against(&configs, kind_of)?;
        let running: Vec<Arc<Connection>> = self
            .set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .all
            .clone();
        // Stop what goes away or changes, first: two versions of one connection never poll
        // the same PLC at once.
        let goes = |c: &Connection| {
            changes.removed.iter().any(|n| n == c.config.name())
                || changes.changed.iter().any(|n| n == c.config.name())
        };
        for c in running.iter().filter(|c| goes(c)) {
            c.token.cancel();
            let mut stopped = c.stopped.clone();
            let _ = tokio::time::timeout(
                ADAPTER_STOP_WAIT + Duration::from_secs(1),
                stopped.wait_for(|s| *s),
            )
            .await;
            tracing::info!(connection = c.config.name(), "adapter stopped (reload)");
        }
        let writer_names: Vec<((AssetPath, String), String)> = writers
            .into_iter()
            .map(|(k, i)| (k, configs[i].name().to_owned()))
            .collect();
        let mut all = Vec::with_capacity(configs.len());
        let mut problem = None;
        for (config, home) in configs.into_iter().zip(homes) {
            if let Some(keep) = running
                .iter()
                .find(|c| c.config.name() == config.name() && !goes(c))
            {
                all.push(keep.clone());
                continue;
            }
            match starter.start_one(config, home) {
                Ok(c) => all.push(Arc::new(c)),
                Err(e) => problem = Some(e),
            }
        }
        {
            let mut homes = starter.homes.write().unwrap_or_else(|p| p.into_inner());
            homes.clear();
            for c in &all {
                homes.insert(c.config.name().to_owned(), c.home.clone());
            }
        }
        // Writers by index into the new list (a connection that failed to start is left out,
        // and so are its writes).
        let writers = writer_names
            .into_iter()
            .filter_map(|(k, name)| {
                all.iter()
                    .position(|c: &Arc<Connection>| c.config.name() == name)
                    .map(|i| (k, i))
            })
            .collect();
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = ConnectionSet { all, writers };
        match problem {
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    /// Whether a running connection writes `property` of `asset`.
    pub fn writes(&self, asset: &AssetPath, property: &str) -> bool {
        let set = self.set.read().unwrap_or_else(|p| p.into_inner());
        set.writers
            .contains_key(&(asset.clone(), property.to_owned()))
    }

    /// Sends a write to the PLC through the connection that maps it; the connection's name
    /// on success.
    pub async fn write(&self, req: WriteRequest) -> Result<(String, WriteAck), WriteError> {
        let c = {
            let set = self.set.read().unwrap_or_else(|p| p.into_inner());
            let Some(&i) = set.writers.get(&(req.asset.clone(), req.property.clone())) else {
                return Err(WriteError::NotWritable {
                    asset: req.asset,
                    property: req.property,
                });
            };
            set.all[i].clone()
        };
        c.handle
            .write(req)
            .await
            .map(|ack| (c.handle.name().to_owned(), ack))
    }

    /// Checks the running connections' tags against another plant (`kind_of` says what each
    /// asset is in it, `None` if it has none): a live apply may not remove or change an
    /// asset under a tag that still maps it.
    pub fn recheck(
        &self,
        kind_of: &(dyn Fn(&AssetPath) -> Option<AssetKind> + Sync),
    ) -> Result<(), ConnectionError> {
        let set = self.set.read().unwrap_or_else(|p| p.into_inner());
        for c in &set.all {
            for t in c.handle.targets() {
                check_target(c.handle.name(), kind_of, t)?;
            }
        }
        Ok(())
    }

    /// Name, protocol, endpoint, tag count and status of every connection.
    pub fn statuses(&self) -> Vec<(StatusSnapshot, &'static str, String, usize)> {
        self.set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .all
            .iter()
            .map(|c| {
                (
                    c.handle.status().snapshot(),
                    c.handle.protocol(),
                    c.handle.endpoint().to_owned(),
                    c.handle.targets().len(),
                )
            })
            .collect()
    }
}

impl Starter {
    /// Starts one adapter under a token of its own (a child of the runtime's).
    fn start_one(
        &self,
        config: ConnectionConfig,
        home: Option<AssetPath>,
    ) -> Result<Connection, ConnectionError> {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| ConnectionError::Stopping(config.name().to_owned()))?;
        let token = self.token.child_token();
        let mut handle =
            ferrotwin_adapters::start(config.clone(), self.sink.clone(), events, token.clone())?;
        let home = home.unwrap_or_else(|| {
            self.ctx
                .plant()
                .root
                .as_ref()
                .map(|r| r.path.clone())
                .expect("a started runtime has a root")
        });
        tracing::info!(
            connection = handle.name(),
            protocol = handle.protocol(),
            endpoint = handle.endpoint(),
            tags = handle.targets().len(),
            "adapter started"
        );
        let (done, stopped) = tokio::sync::watch::channel(false);
        match handle.take_join() {
            Some(join) => {
                let name = handle.name().to_owned();
                let stop = token.clone();
                // The runtime's shutdown waits on the tracker: a bounded wait per adapter
                // once its token is cancelled.
                self.tracker.spawn(async move {
                    tokio::pin!(join);
                    tokio::select! {
                        _ = &mut join => {}
                        () = stop.cancelled() => {
                            if tokio::time::timeout(ADAPTER_STOP_WAIT, join).await.is_err() {
                                tracing::warn!(connection = name, "adapter did not stop in time");
                            }
                        }
                    }
                    let _ = done.send(true);
                });
            }
            None => {
                let _ = done.send(true);
            }
        }
        self.homes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.name().to_owned(), home.clone());
        Ok(Connection {
            handle,
            home,
            config,
            token,
            stopped,
        })
    }
}

/// The `[[connections]]` of a site config's text (its other sections are not read), their
/// paths taken from `base`, and their canonical TOML (what a plant record keeps).
pub fn parse_connections(
    text: &str,
    base: Option<&std::path::Path>,
) -> Result<(Vec<ConnectionConfig>, String), String> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| format!("site config: {e}"))?;
    let list = table
        .remove("connections")
        .unwrap_or_else(|| toml::Value::Array(Vec::new()));
    let mut canonical = toml::Table::new();
    canonical.insert("connections".into(), list.clone());
    let mut configs: Vec<ConnectionConfig> = list
        .try_into()
        .map_err(|e: toml::de::Error| format!("site config: connections: {e}"))?;
    if let Some(base) = base {
        for c in &mut configs {
            c.resolve_paths(base);
        }
    }
    let canonical = toml::to_string(&canonical).map_err(|e| format!("site config: {e}"))?;
    Ok((configs, canonical))
}

/// The tag's asset exists, its level has the property, and a write to it could be taken.
fn check_target(
    connection: &str,
    kind_of: &(dyn Fn(&AssetPath) -> Option<AssetKind> + Sync),
    target: &TagTarget,
) -> Result<(), ConnectionError> {
    let (asset, kind) = (&target.asset, &target.kind);
    let err = |what: String| ConnectionError::Tag {
        connection: connection.to_owned(),
        asset: asset.clone(),
        property: match kind {
            TagKind::Reading(p) => p.as_str().to_owned(),
            TagKind::Setpoint(s) => s.clone(),
        },
        what,
    };
    let Some(asset_kind) = kind_of(asset) else {
        return Err(err("no such asset in the plant spec".into()));
    };
    match (kind, &asset_kind) {
        (TagKind::Reading(Property::Value), AssetKind::Sensor { .. }) => Ok(()),
        (
            TagKind::Reading(p @ (Property::State | Property::GoodCount | Property::ScrapCount)),
            AssetKind::Machine { .. },
        ) if target.writable => Err(err(format!(
            "{p} is what the machine reports, not a setpoint: drop writable, and write through a setpoint tag of its own name (run_enable, a counter reset)"
        ))),
        (
            TagKind::Reading(Property::State | Property::GoodCount | Property::ScrapCount),
            AssetKind::Machine { .. },
        ) => Ok(()),
        // A machine type, a line or an area that lists setpoints takes writes to these only.
        (
            TagKind::Setpoint(name),
            k @ (AssetKind::Machine { .. } | AssetKind::Line { .. } | AssetKind::Area { .. }),
        ) => match k.unlisted_setpoint(asset, name) {
            Some(why) => Err(err(why)),
            None => Ok(()),
        },
        (TagKind::Reading(p), AssetKind::Line { .. } | AssetKind::Area { .. }) => {
            Err(err(format!(
                "a {} holds no readings ({p}): its setpoints take writes; put its own signals on a machine of it (a line controller)",
                asset.level().as_str()
            )))
        }
        // Its writes would all be refused (`TwinApi::refused_by_spec`): say so at start.
        (TagKind::Setpoint(_), AssetKind::Sensor { .. }) => Err(err(
            "a sensor is written through its value: property = \"value\" with writable = true"
                .into(),
        )),
        (_, other) => Err(err(format!(
            "a {} has no such property",
            other.level().as_str()
        ))),
    }
}

/// The deepest asset that holds all of `paths` (`None` for no paths).
fn common_ancestor<'a>(mut paths: impl Iterator<Item = &'a AssetPath>) -> Option<AssetPath> {
    let mut common = paths.next()?.clone();
    for p in paths {
        while !p.starts_with(&common) {
            common = common.parent()?;
        }
    }
    Some(common)
}

/// Turns adapter events into events on the plant's assets. Ends when every adapter is gone.
async fn record_events(
    mut rx: mpsc::Receiver<AdapterEvent>,
    homes: Arc<std::sync::RwLock<HashMap<String, AssetPath>>>,
    ctx: Arc<TwinCtx>,
    token: CancellationToken,
) {
    loop {
        // At shutdown: what the stopping adapters still report, for a bounded while.
        let next = if token.is_cancelled() {
            tokio::time::timeout(ADAPTER_STOP_WAIT, rx.recv())
                .await
                .ok()
                .flatten()
        } else {
            tokio::select! {
                ev = rx.recv() => ev,
                () = token.cancelled() => continue,
            }
        };
        let Some(ev) = next else { break };
        let Some(asset) = ev.asset.clone().or_else(|| {
            homes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ev.connection)
                .cloned()
        }) else {
            continue;
        };
        let c = &ev.connection;
        let (kind, severity, message) = match ev.kind {
            AdapterEventKind::Connected { endpoint } => (
                EventKind::Connection,
                Severity::Info,
                format!("connection {c}: connected to {endpoint}"),
            ),
            AdapterEventKind::Disconnected { reason } => (
                EventKind::Connection,
                Severity::Medium,
                format!("connection {c}: disconnected: {reason}"),
            ),
            AdapterEventKind::TagFailed { tag, error } => (
                EventKind::Connection,
                Severity::Low,
                format!("connection {c}: tag {tag} failing: {error}"),
            ),
            AdapterEventKind::TagRecovered { tag } => (
                EventKind::Connection,
                Severity::Info,
                format!("connection {c}: tag {tag} reads again"),
            ),
            AdapterEventKind::Unmapped { source, count } => (
                EventKind::Connection,
                Severity::Low,
                format!("connection {c}: {count} values from {source} refused: no tag maps it"),
            ),
            AdapterEventKind::Written {
                property,
                value,
                by,
                outcome,
            } => match outcome {
                Ok(WriteAck::Confirmed) => (
                    EventKind::Write,
                    Severity::Info,
                    format!("{property} = {value} written by {by} through {c}: confirmed"),
                ),
                Ok(WriteAck::Unconfirmed) => (
                    EventKind::Write,
                    Severity::Low,
                    format!(
                        "{property} = {value} sent by {by} through {c}: unconfirmed (the broker took it; the device reported nothing back)"
                    ),
                ),
                Err(e) => (
                    EventKind::Write,
                    Severity::Low,
                    format!("{property} = {value} by {by} through {c} refused: {e}"),
                ),
            },
        };
        ctx.emit(Event::new(asset, ev.at, kind, severity, message))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> AssetPath {
        AssetPath::parse(s).expect("valid")
    }

    #[test]
    fn common_ancestor_is_the_deepest_shared_asset() {
        let a = [p("e/s/a/l1/m1/t"), p("e/s/a/l1/m2"), p("e/s/a/l1/m1")];
        assert_eq!(common_ancestor(a.iter()), Some(p("e/s/a/l1")));
        let b = [p("e/s/a/l1/m1"), p("e/s2")];
        assert_eq!(common_ancestor(b.iter()), Some(p("e")));
        let c = [p("e/s/a/l1/m1")];
        assert_eq!(common_ancestor(c.iter()), Some(p("e/s/a/l1/m1")));
        assert_eq!(common_ancestor([].iter()), None);
    }
}
