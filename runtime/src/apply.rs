//! A changed plant applied to a running runtime, without a restart (`ferrotwin apply`).
//!
//! An apply is one versioned transaction: planned against the plant the runtime runs now
//! (`models::change::plan`), checked whole (a stale base version, the enterprise renamed, the
//! replicated site gone, a connection's tag on an asset the change removes or unfits: the
//! apply is refused and nothing changes), recorded durably (`Store::save_plant`, so a crash
//! mid-apply is completed by the restart, which starts from the record), then carried out on
//! the live tree:
//!
//! 1. the registry first: removed assets leave it, changed ones get a new entry (the old one
//!    is retired: `TwinEntry::retire`), added ones enter it; the router sends a reading on
//!    its way to a retired entry to its successor, or counts it `removed_asset`;
//! 2. the tree's shape (`TwinCtx::set_plant`);
//! 3. the twins of each top-most removed subtree and each changed sensor stop, leaves first,
//!    each first applying what its inbox holds and writing its history tail;
//! 4. the new entries of changed sensors take the final state of the old ones, fitted to the
//!    new kind by the rule a cold start uses (`codec::decode_snapshot`: alarms by name);
//! 5. changed machines, lines and areas are rebound (`TwinMsg::Rebind`): the running actor
//!    applies its old inbox, fits its own state (the machine detector kept only for the same
//!    sensors), takes the new entry; its children keep running and its sensors find the new
//!    sample board at their next reading;
//! 6. the parent of each top-most added subtree and each changed sensor starts it
//!    (`TwinMsg::Adopt`).
//!
//! Twins outside the change never stop, nor do the unchanged sensors of a changed machine.
//! A changed sensor restarts (a pause of milliseconds; its readings wait in its new inbox).
//! One `model` event per line of the plan records it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_models::change::{Change, ChangeOp, plan};
use ferrotwin_models::spec::{AssetDef, AssetKind, PlantSpec};
use ferrotwin_models::{AssetPath, Event, EventKind, Severity, Timestamp};
use ferrotwin_proto::store::v1 as rec;
use sha2::{Digest, Sha256};

use crate::connections::{ConnectionChanges, Connections, parse_connections};
use crate::core::{TwinMsg, TwinSnapshot, TwinState, ask};
use crate::inference::ModelCache;
use crate::registry::{Delivery, TwinEntry};
use crate::replication::SiteReplication;
use crate::store::codec;
use crate::twin::{Plant, STOP_REMOVED, TwinCtx};

/// How long one twin may take to drain, write its tail and stop, or to start a subtree.
const TWIN_WAIT: Duration = Duration::from_secs(30);

/// Most plan lines an answer carries (and `model` events an apply raises one by one; past
/// it one event sums up the rest).
pub const MAX_CHANGE_LINES: usize = 1_000;

/// What applies depend on besides the plant: the runtime's role.
#[derive(Clone, Default)]
pub struct ApplyRules {
    /// An enterprise: mirrors, no models, no detectors learning.
    pub enterprise: bool,
    /// A site that replicates: its site must stay, its outbox must fit the plant.
    pub replication: Option<SiteReplication>,
    /// Where machine types' model files are (the plant file's directory).
    pub plant_dir: Option<PathBuf>,
    /// Where relative paths of connections applied live are taken from.
    pub config_dir: Option<PathBuf>,
    /// An enterprise's accepted sites: one its plant has may not be dropped.
    pub accept: Vec<String>,
    /// A replicating site's sender: after an apply it sends the site's new plant.
    pub sender: Option<Arc<crate::replication::site::SenderStatus>>,
}

/// The plant a runtime runs.
#[derive(Clone)]
pub struct PlantVersion {
    pub version: u64,
    pub spec: Arc<PlantSpec>,
    pub assets: Arc<Vec<AssetDef>>,
    /// sha256 of the plant file's canonical text as the last start read it.
    pub file_digest: Vec<u8>,
    pub applied: Timestamp,
    pub applied_by: String,
    /// The connections that run, as canonical TOML (empty: as the runtime was given them).
    pub connections_toml: String,
    /// sha256 of the site file's connections as the last start read them.
    pub connections_file_digest: Vec<u8>,
}

impl PlantVersion {
    pub fn record(&self) -> rec::PlantRecord {
        rec::PlantRecord {
            version: self.version,
            plant_toml: self.spec.to_toml(),
            file_digest: self.file_digest.clone(),
            applied_us: self.applied.0,
            applied_by: self.applied_by.clone(),
            connections_toml: self.connections_toml.clone(),
            connections_file_digest: self.connections_file_digest.clone(),
        }
    }
}

/// sha256 of a plant's canonical TOML: a file edited in its comments only is not changed.
pub fn digest(spec: &PlantSpec) -> Vec<u8> {
    text_digest(&spec.to_toml())
}

/// sha256 of a canonical text.
pub fn text_digest(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApplyError {
    /// The new plant or the request is wrong; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// Made against another version than the one running.
    #[error(
        "the plant is at version {current}, this change was made against version {base}: \
         run `ferrotwin apply --dry-run` again and check the changes"
    )]
    Stale { current: u64, base: u64 },
    /// The change was recorded but carrying it out failed (a restart completes it).
    #[error("{0}")]
    Failed(String),
}

pub struct ApplyRequest {
    pub plant_toml: String,
    /// The version the change was made against (0: not said, refused).
    pub base_version: u64,
    pub dry_run: bool,
    /// Who applies it (for the record and the events).
    pub by: String,
    /// A site config whose `[[connections]]` run from now on (`None`: the running ones stay).
    pub site_toml: Option<String>,
}

#[derive(Debug)]
pub struct ApplyOutcome {
    /// The version running after the call.
    pub version: u64,
    /// Whether this call changed the plant (false for a dry run or an empty change).
    pub applied: bool,
    /// The plan's lines, at most `MAX_CHANGE_LINES`.
    pub changes: Vec<Change>,
    pub changes_total: usize,
    /// `+3 −1 ~12`: assets added, removed, changed.
    pub summary: String,
    /// Models that did not load (their machines run without them), and the like.
    pub warnings: Vec<String>,
    /// Connections added, changed or removed (with `site_toml`).
    pub connections: ConnectionChanges,
}

/// Applies changed plants to a running runtime, one at a time.
pub struct Applier {
    ctx: Arc<TwinCtx>,
    connections: Arc<Connections>,
    rules: ApplyRules,
    /// Held for a whole apply: two applies serialise, and the second sees the first's version.
    running: tokio::sync::Mutex<PlantVersion>,
    /// A copy for readers that must not wait for an apply.
    current: std::sync::RwLock<PlantVersion>,
}

impl Applier {
    pub fn new(
        ctx: Arc<TwinCtx>,
        connections: Arc<Connections>,
        rules: ApplyRules,
        running: PlantVersion,
    ) -> Applier {
        Applier {
            ctx,
            connections,
            rules,
            current: std::sync::RwLock::new(running.clone()),
            running: tokio::sync::Mutex::new(running),
        }
    }

    /// The plant running now.
    pub fn current(&self) -> PlantVersion {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Plans `req`'s plant against the running one and, unless it is a dry run or changes
    /// nothing, applies it.
    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyOutcome, ApplyError> {
        let mut running = self.running.lock().await;
        self.apply_locked(&mut running, req, None).await
    }

    /// `apply`, with the running plant's lock held by the caller; `given`: the plant itself
    /// (then `req.plant_toml` is not read), checked as its text would be.
    async fn apply_locked(
        &self,
        running: &mut PlantVersion,
        req: ApplyRequest,
        given: Option<PlantSpec>,
    ) -> Result<ApplyOutcome, ApplyError> {
        if req.base_version == 0 {
            return Err(ApplyError::Invalid(
                "base_version: say which plant version the change was made against \
                 (`ferrotwin plant` or a dry run shows it)"
                    .into(),
            ));
        }
        if req.base_version != running.version {
            return Err(ApplyError::Stale {
                current: running.version,
                base: req.base_version,
            });
        }
        let spec = match given {
            Some(spec) => spec.validate("plant").map(|()| spec),
            None => PlantSpec::from_toml(&req.plant_toml, "plant"),
        }
        .map_err(|e| ApplyError::Invalid(e.to_string()))?;
        let connections = match &req.site_toml {
            Some(text) => Some(
                parse_connections(text, self.rules.config_dir.as_deref())
                    .map_err(ApplyError::Invalid)?,
            ),
            None => None,
        };
        let old = running.assets.clone();
        let rules = self.rules.clone();
        // A dry run reads no model file (an engineer's plan must not probe the host's files).
        let dry_run = req.dry_run;
        let (spec, new, changes, models, mut warnings) = tokio::task::spawn_blocking(move || {
            let new = spec.assets();
            let changes = plan(&old, &new);
            let (models, errors) = if rules.enterprise || dry_run {
                (HashMap::new(), Vec::new())
            } else {
                ModelCache::load_for_spec(&spec, &rules.plant_dir.clone().unwrap_or_default())
            };
            let warnings: Vec<String> = errors.iter().map(ToString::to_string).collect();
            (spec, new, changes, models, warnings)
        })
        .await
        .map_err(|e| ApplyError::Failed(format!("planning: {e}")))?;
        let conn_changes = self.check(running, &spec, &new, connections.as_ref().map(|c| &c.0))?;
        let mut outcome = ApplyOutcome {
            version: running.version,
            applied: false,
            changes_total: changes.lines.len(),
            changes: changes
                .lines
                .iter()
                .take(MAX_CHANGE_LINES)
                .cloned()
                .collect(),
            summary: changes.summary(),
            warnings: Vec::new(),
            connections: conn_changes.clone(),
        };
        if req.dry_run || (changes.is_empty() && conn_changes.is_empty()) {
            outcome.warnings = warnings;
            return Ok(outcome);
        }
        // The commit point: on disk before any twin changes.
        let next = PlantVersion {
            version: running.version + 1,
            spec: Arc::new(spec),
            assets: Arc::new(new),
            file_digest: running.file_digest.clone(),
            applied: Timestamp::now(),
            applied_by: req.by.clone(),
            connections_toml: match &connections {
                Some((_, text)) => text.clone(),
                None => running.connections_toml.clone(),
            },
            connections_file_digest: running.connections_file_digest.clone(),
        };
        let store = self.ctx.store.clone();
        let record = next.record();
        tokio::task::spawn_blocking(move || store.save_plant(&record))
            .await
            .map_err(|e| ApplyError::Failed(format!("recording the plant: {e}")))?
            .map_err(|e| ApplyError::Failed(format!("recording the plant: {e}")))?;
        if let (Some(r), Some(outbox)) = (&self.rules.replication, self.ctx.store.outbox())
            && let Ok(h) = r.history_settings(&next.spec, &next.assets)
        {
            outbox.set_history(h);
        }
        // A replicating site sends its new plant to its enterprise before any batch that holds
        // what the change makes (the sender says hello again before its next batch).
        if let Some(sender) = &self.rules.sender {
            sender.set_plant(next.version, &next.spec);
        }
        let span = tracing::info_span!(
            parent: None,
            "plant.apply",
            ferrotwin.version = next.version as i64,
            ferrotwin.changes = %changes.summary(),
        );
        let _enter = span.enter();
        let mut live = if changes.is_empty() {
            Live::default()
        } else {
            self.carry_out(&running.assets, &next, &changes.diff, models)
                .await
        };
        // The connections once the twins they map exist.
        if let Some((configs, _)) = connections {
            let kinds: HashMap<&AssetPath, &AssetKind> =
                next.assets.iter().map(|a| (&a.path, &a.kind)).collect();
            if let Err(e) = self
                .connections
                .reload(configs, &|p: &AssetPath| kinds.get(p).map(|k| (*k).clone()))
                .await
            {
                live.problems.push(e.to_string());
            }
            for (names, op) in [
                (&conn_changes.added, "added"),
                (&conn_changes.changed, "changed (restarted)"),
                (&conn_changes.removed, "removed"),
            ] {
                for n in names {
                    let Some(root) = next.assets.first() else {
                        continue;
                    };
                    self.ctx
                        .emit(Event::new(
                            root.path.clone(),
                            Timestamp::now(),
                            EventKind::Model,
                            Severity::Info,
                            format!("plant v{} by {}: connection {n} {op}", next.version, req.by),
                        ))
                        .await;
                }
            }
        }
        drop(_enter);
        let at = Timestamp::now();
        let mut events = changes.lines.iter();
        for c in events.by_ref().take(MAX_CHANGE_LINES) {
            self.ctx
                .emit(model_event(
                    c,
                    next.version,
                    &req.by,
                    live.removed_alarms.get(&c.path),
                    at,
                ))
                .await;
            // Watchers (gRPC Watch, the web pages) re-browse what changed.
            self.ctx.hub.model(Arc::new(crate::watch::ModelChange {
                version: next.version,
                path: c.path.clone(),
                op: c.op.as_str(),
                detail: c.detail.clone(),
            }));
        }
        let rest = events.count();
        if rest > 0
            && let Some(root) = next.assets.first()
        {
            let ev = Event::new(
                root.path.clone(),
                at,
                EventKind::Model,
                Severity::Info,
                format!(
                    "plant v{} by {}: {rest} more changes (the plan has {})",
                    next.version,
                    req.by,
                    changes.lines.len()
                ),
            );
            self.ctx.emit(ev).await;
        }
        warnings.extend(live.problems.iter().cloned());
        tracing::info!(version = next.version, by = %req.by, changes = %changes.summary(),
            problems = live.problems.len(), "plant applied");
        *running = next.clone();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        outcome.version = running.version;
        outcome.applied = true;
        outcome.warnings = warnings;
        if !live.problems.is_empty() {
            return Err(ApplyError::Failed(format!(
                "plant v{} is recorded but not every twin followed (a restart completes it): {}",
                running.version,
                live.problems.join("; ")
            )));
        }
        Ok(outcome)
    }

    /// A site's plant, as its hello brings it (an enterprise): the enterprise's plant with
    /// the site's put in, applied as any change (`by` names the site). Answers what changed.
    pub async fn apply_site(
        &self,
        site: AssetPath,
        site_version: u64,
        toml: String,
    ) -> Result<String, String> {
        let sent = PlantSpec::from_toml(&toml, &format!("the plant of {site}"))
            .map_err(|e| e.to_string())?;
        if sent.sites.first().map(|s| s.name.as_str()) != Some(site.name())
            || sent.enterprise != site.parent().map(|p| p.to_string()).unwrap_or_default()
        {
            return Err(format!("{site} may send only its own site's plant"));
        }
        // Merged under the lock: sites connecting at once apply one after the other.
        let mut running = self.running.lock().await;
        let merged = running.spec.with_site(&sent)?;
        if merged == *running.spec {
            return Ok(format!(
                "{site}'s plant v{site_version} is the enterprise's already"
            ));
        }
        let base_version = running.version;
        match self
            .apply_locked(
                &mut running,
                ApplyRequest {
                    plant_toml: String::new(),
                    base_version,
                    dry_run: false,
                    by: format!("site {site} (its plant v{site_version})"),
                    site_toml: None,
                },
                Some(merged),
            )
            .await
        {
            Ok(o) => Ok(format!(
                "{site}'s plant v{site_version} applied: enterprise plant v{}, {}",
                o.version, o.summary
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Everything that would refuse the change, whole, before anything changes.
    fn check(
        &self,
        running: &PlantVersion,
        spec: &PlantSpec,
        new: &[AssetDef],
        connections: Option<&Vec<ferrotwin_adapters::ConnectionConfig>>,
    ) -> Result<ConnectionChanges, ApplyError> {
        let mut problems = Vec::new();
        if spec.enterprise != running.spec.enterprise {
            problems.push(format!(
                "enterprise: {:?} → {:?}: an enterprise is not renamed by an apply",
                running.spec.enterprise, spec.enterprise
            ));
        }
        for site in &self.rules.accept {
            let is_site =
                |a: &AssetDef| matches!(a.kind, AssetKind::Site) && a.path.as_str() == site;
            if running.assets.iter().any(is_site) && !new.iter().any(is_site) {
                problems.push(format!(
                    "enterprise.accept names {site}, which the new plant no longer has: change the accepted sites and restart first"
                ));
            }
        }
        if let Some(r) = &self.rules.replication {
            match (r.site_of(&running.spec), r.site_of(spec)) {
                (Ok(was), Ok(now)) if was != now => problems.push(format!(
                    "this runtime replicates as {was}; the new plant makes it {now}: change replication.site and restart"
                )),
                (_, Err(e)) => problems.push(e),
                _ => {}
            }
            if let Err(e) = r.check_outbox_size(new) {
                problems.push(e);
            }
            if let Err(e) = r.history_settings(spec, new) {
                problems.push(e);
            }
        }
        let kinds: HashMap<&AssetPath, &AssetKind> =
            new.iter().map(|a| (&a.path, &a.kind)).collect();
        let kind_of = |p: &AssetPath| kinds.get(p).map(|k| (*k).clone());
        let mut conn_changes = ConnectionChanges::default();
        match connections {
            Some(configs) => match self.connections.plan_reload(configs, &kind_of) {
                Ok(c) => conn_changes = c,
                Err(e) => problems.push(format!("{e} (in the new site config)")),
            },
            None => {
                if let Err(e) = self.connections.recheck(&kind_of) {
                    problems.push(format!(
                        "{e} (in the new plant); change the connection's tags in the same apply (a site config)"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(conn_changes)
        } else {
            Err(ApplyError::Invalid(format!(
                "the change is refused, nothing was applied: {}",
                problems.join("; ")
            )))
        }
    }

    /// The live phase (see the module's steps). Problems are collected, never stop it
    /// half-way: the record is written already and a restart converges on it.
    async fn carry_out(
        &self,
        old: &[AssetDef],
        next: &PlantVersion,
        diff: &ferrotwin_models::spec::PlantDiff,
        models: HashMap<String, Arc<crate::inference::OnnxModel>>,
    ) -> Live {
        let ctx = &self.ctx;
        let learn = !self.rules.enterprise;
        let mut live = Live::default();
        let now_us = Timestamp::now().0;
        // Changed sensors restart on a new entry; changed machines, lines and above are
        // rebound: the same actor takes the new entry, its children keep running.
        let restarted: HashSet<&AssetPath> = diff
            .changed
            .iter()
            .filter(|a| matches!(a.kind, AssetKind::Sensor { .. }))
            .map(|a| &a.path)
            .collect();
        let mut rebound: Vec<&AssetPath> = diff
            .changed
            .iter()
            .filter(|a| !matches!(a.kind, AssetKind::Sensor { .. }))
            .map(|a| &a.path)
            .collect();
        rebound.sort_by_key(|p| p.depth());
        let removed: HashSet<&AssetPath> = diff.removed.iter().collect();
        let added: HashSet<&AssetPath> = diff.added.iter().map(|a| &a.path).collect();
        let stop_roots = top_most(
            old.iter()
                .map(|a| &a.path)
                .filter(|p| restarted.contains(p) || removed.contains(p)),
        );
        let start_roots = top_most(
            next.assets
                .iter()
                .map(|a| &a.path)
                .filter(|p| restarted.contains(p) || added.contains(p)),
        );
        // Every running entry of the subtrees that stop, deepest first.
        let mut stopping: Vec<Arc<TwinEntry>> = Vec::new();
        for root in &stop_roots {
            let (entries, _) = ctx.registry.scan(Some(root), None, usize::MAX, |_| true);
            stopping.extend(entries);
        }
        stopping.sort_by_key(|e| std::cmp::Reverse(e.path().depth()));
        for e in &stopping {
            if removed.contains(e.path())
                && let TwinState::Sensor(s) = &e.snapshot().state
                && let AssetKind::Sensor { spec, .. } = &e.def.kind
            {
                let active: Vec<String> = spec
                    .alarms
                    .iter()
                    .zip(&s.alarms)
                    .filter(|(_, st)| st.state.is_active())
                    .map(|(a, st)| format!("{} {}", a.name, st.state.as_str()))
                    .collect();
                if !active.is_empty() {
                    let top = stop_roots
                        .iter()
                        .find(|r| e.path().starts_with(r))
                        .cloned()
                        .unwrap_or_else(|| e.path().clone());
                    live.removed_alarms.entry(top).or_default().push(format!(
                        "{}: {}",
                        e.path().name(),
                        active.join(", ")
                    ));
                }
            }
        }
        // 1. The registry (per-asset work, off the async workers).
        let (replaced, gone, problems) = {
            let ctx = self.ctx.clone();
            let (removed_paths, changed_defs, added_defs) = (
                diff.removed.clone(),
                diff.changed.clone(),
                diff.added.clone(),
            );
            tokio::task::spawn_blocking(move || {
                registry_step(
                    &ctx,
                    &removed_paths,
                    &changed_defs,
                    &added_defs,
                    learn,
                    now_us,
                )
            })
            .await
            .unwrap_or_else(|e| {
                (
                    Vec::new(),
                    Vec::new(),
                    vec![format!("the registry step failed: {e}")],
                )
            })
        };
        live.problems.extend(problems);
        // 2. The shape.
        let assets = next.assets.clone();
        match tokio::task::spawn_blocking(move || Plant::new(&assets)).await {
            Ok(plant) => ctx.set_plant(Arc::new(plant), models),
            Err(e) => live
                .problems
                .push(format!("the tree's new shape was not built: {e}")),
        }
        // 3. Stop, leaves first, one depth at a time, many twins at once.
        let mut at = 0;
        while at < stopping.len() {
            let depth = stopping[at].path().depth();
            let end = stopping[at..]
                .iter()
                .position(|e| e.path().depth() != depth)
                .map_or(stopping.len(), |n| at + n);
            let mut set = tokio::task::JoinSet::new();
            for e in &stopping[at..end] {
                let e = e.clone();
                set.spawn(async move { stop_twin(&e).await });
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Err(problem)) = r {
                    live.problems.push(problem);
                }
            }
            at = end;
        }
        // 4. Leftovers and the final state of the restarted ones; the rebound ones fit
        //    their own state (they still run).
        for (old_entry, new_entry) in &replaced {
            if !matches!(new_entry.def.kind, AssetKind::Sensor { .. }) {
                continue;
            }
            write_tail(ctx, old_entry).await;
            let left = old_entry.take_inbox();
            if !left.is_empty()
                && new_entry.deliver(&left) == Delivery::Tell
                && !new_entry.send(TwinMsg::Drain)
            {
                new_entry.unschedule();
            }
            // Not over a fresher state (an enterprise's receiver publishes mirrors straight
            // into the new entry).
            if let Some(r) = codec::snapshot_record(old_entry, true)
                && new_entry.snapshot().updated <= old_entry.snapshot().updated
            {
                let snap = codec::decode_snapshot(&new_entry.def.kind, &r, learn);
                ctx.registry.publish(new_entry, Arc::new(snap));
            }
        }
        for e in &gone {
            write_tail(ctx, e).await;
            let left = e.take_inbox();
            if !left.is_empty() {
                ctx.credits
                    .0
                    .fetch_sub(left.len(), std::sync::atomic::Ordering::AcqRel);
                ctx.metrics
                    .removed_asset
                    .fetch_add(left.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        // 5. Rebind, parents first, a depth at a time, many at once. One without an actor
        //    (restarting) is restarted by its parent from the new entry.
        let mut at = 0;
        while at < rebound.len() {
            let depth = rebound[at].depth();
            let end = rebound[at..]
                .iter()
                .position(|p| p.depth() != depth)
                .map_or(rebound.len(), |n| at + n);
            let mut set = tokio::task::JoinSet::new();
            for path in &rebound[at..end] {
                let Some(actor) = replaced
                    .iter()
                    .find(|(o, _)| o.path() == *path)
                    .and_then(|(o, _)| o.actor())
                else {
                    continue;
                };
                let path = (*path).clone();
                set.spawn(async move {
                    match ask(&actor, TwinMsg::Rebind, TWIN_WAIT).await {
                        Some(Ok(())) => None,
                        Some(Err(e)) => Some(e),
                        None => Some(format!("{path}: did not take its new settings in time")),
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Some(problem)) = r {
                    live.problems.push(problem);
                }
            }
            at = end;
        }
        // 6. Start, parents first.
        let mut roots = start_roots;
        roots.sort_by_key(AssetPath::depth);
        for root in roots {
            let Some(parent) = root.parent().and_then(|p| ctx.registry.by_path(&p)) else {
                live.problems
                    .push(format!("{root}: its parent is not running; not started"));
                continue;
            };
            // A parent whose rebind failed still runs on its old entry.
            let actor = parent.actor().or_else(|| {
                replaced
                    .iter()
                    .find(|(o, _)| o.path() == parent.path())
                    .and_then(|(o, _)| o.actor())
            });
            let Some(actor) = actor else {
                live.problems.push(format!(
                    "{root}: its parent {} is restarting; it starts the child itself",
                    parent.path()
                ));
                continue;
            };
            let path = root.clone();
            match ask(
                &actor,
                move |reply| TwinMsg::Adopt { path, reply },
                TWIN_WAIT,
            )
            .await
            {
                Some(Ok(())) => {}
                Some(Err(e)) => live.problems.push(e),
                None => live.problems.push(format!(
                    "{root}: its parent did not answer the start in time"
                )),
            }
        }
        live
    }
}

/// Replaced entries (old, new), removed entries and problems of the live phase's first step:
/// removed assets leave the registry (retired), changed ones get a new entry with the old
/// state fitted (a machine's board taken over by sensor name), added ones enter it with
/// their stored snapshot if they had one.
#[allow(clippy::type_complexity)]
fn registry_step(
    ctx: &TwinCtx,
    removed: &[AssetPath],
    changed: &[AssetDef],
    added: &[AssetDef],
    learn: bool,
    now_us: i64,
) -> (
    Vec<(Arc<TwinEntry>, Arc<TwinEntry>)>,
    Vec<Arc<TwinEntry>>,
    Vec<String>,
) {
    let mut replaced = Vec::new();
    let mut gone = Vec::new();
    let mut problems = Vec::new();
    for path in removed {
        if let Some(e) = ctx.registry.remove(path) {
            e.retire();
            gone.push(e);
        }
    }
    for def in changed {
        let Some(old_entry) = ctx.registry.by_path(&def.path) else {
            continue;
        };
        let snap = fit(&old_entry, &def.kind, learn);
        let new_entry = ctx.registry.insert(def.clone(), snap, now_us);
        if let (Some(old_board), Some(new_board)) = (&old_entry.board, &new_entry.board)
            && let (AssetKind::Machine { spec: o, .. }, AssetKind::Machine { spec: n, .. }) =
                (&old_entry.def.kind, &def.kind)
        {
            // Values by sensor name, the state log and the evaluation schedule.
            let map: Vec<(usize, usize)> = o
                .sensors
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    n.sensors
                        .iter()
                        .position(|t| t.name == s.name)
                        .map(|j| (i, j))
                })
                .collect();
            new_board.take_over(old_board, &map);
        }
        old_entry.retire();
        replaced.push((old_entry, new_entry));
    }
    for def in added {
        let snap = match ctx.store.snapshot_record(&def.path.id()) {
            Ok(Some(r)) => codec::decode_snapshot(&def.kind, &r, learn),
            Ok(None) => TwinSnapshot::initial(&def.kind),
            Err(e) => {
                problems.push(format!("{}: stored snapshot: {e}", def.path));
                TwinSnapshot::initial(&def.kind)
            }
        };
        ctx.registry.insert(def.clone(), snap, now_us);
    }
    (replaced, gone, problems)
}

/// What the live phase met.
#[derive(Default)]
struct Live {
    /// Alarms active on removed sensors, by the top-most removed path they went with.
    removed_alarms: HashMap<AssetPath, Vec<String>>,
    problems: Vec<String>,
}

/// The paths of `paths` none of whose ancestors is among them.
fn top_most<'a>(paths: impl Iterator<Item = &'a AssetPath>) -> Vec<AssetPath> {
    let all: Vec<&AssetPath> = paths.collect();
    let set: HashSet<&AssetPath> = all.iter().copied().collect();
    all.into_iter()
        .filter(|p| {
            let mut up = p.parent();
            while let Some(a) = up {
                if set.contains(&a) {
                    return false;
                }
                up = a.parent();
            }
            true
        })
        .cloned()
        .collect()
}

/// `old`'s latest state under the new kind, as a cold start would restore it.
fn fit(old: &TwinEntry, kind: &AssetKind, learn: bool) -> TwinSnapshot {
    match codec::snapshot_record(old, true) {
        Some(r) => codec::decode_snapshot(kind, &r, learn),
        None => TwinSnapshot::initial(kind),
    }
}

/// Stops one twin of a subtree that stops. A retired one (removed or replaced) first
/// applies its inbox and writes its history tail; the stop itself lets the message in hand
/// finish (an unchanged sensor keeps its inbox in its entry for the new actor).
async fn stop_twin(e: &TwinEntry) -> Result<(), String> {
    let Some(actor) = e.actor() else {
        return Ok(());
    };
    let mut problem = None;
    if e.is_retired()
        && matches!(
            e.def.kind,
            AssetKind::Sensor { .. } | AssetKind::Machine { .. }
        )
    {
        let _ = actor.cast(TwinMsg::Drain);
        if ask(&actor, TwinMsg::FlushHistory, TWIN_WAIT)
            .await
            .is_none()
        {
            problem = Some(format!(
                "{}: did not drain and write its history in time",
                e.path()
            ));
        }
    }
    if let Err(err) = actor
        .stop_and_wait(Some(STOP_REMOVED.into()), Some(TWIN_WAIT))
        .await
    {
        // Never left running on a retired entry (it would publish an old state over its
        // successor's).
        actor.kill();
        problem = Some(format!(
            "{}: did not stop in time ({err}); killed",
            e.path()
        ));
    }
    problem.map_or(Ok(()), Err)
}

/// Writes what `e`'s history tail still holds (a twin that died before its last drain).
async fn write_tail(ctx: &TwinCtx, e: &TwinEntry) {
    if !matches!(e.def.kind, AssetKind::Sensor { .. }) {
        return;
    }
    let points = std::mem::take(&mut e.tail.lock().unwrap_or_else(|p| p.into_inner()).points);
    if !points.is_empty() {
        ctx.store
            .append_history(e.id, ferrotwin_models::Property::Value, &points)
            .await;
    }
}

/// The `model` event of one plan line.
fn model_event(
    c: &Change,
    version: u64,
    by: &str,
    alarms: Option<&Vec<String>>,
    at: Timestamp,
) -> Event {
    let mut message = format!("plant v{version} by {by}: {} {}", c.op.as_str(), c.detail);
    if let Some(a) = alarms {
        message.push_str(&format!(
            "; active alarms that went with it: {}",
            a.join("; ")
        ));
    }
    let severity = match (c.op, alarms.is_some()) {
        (ChangeOp::Removed, true) => Severity::Medium,
        _ => Severity::Info,
    };
    Event::new(c.path.clone(), at, EventKind::Model, severity, message)
}
