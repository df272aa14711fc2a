//! Site → enterprise replication over gRPC (`ferrotwin.v1.ReplicationService`).
//!
//! A site's store stages what each flush made durable in its outbox (`store::outbox`);
//! `site::run_sender` streams the outbox to the enterprise and trims it up to each ack. The
//! enterprise (`enterprise::EnterpriseReceiver`) applies batches to its mirror twins (the same
//! paths and ids: they come from the same plant spec), dedupes by site seq and site event
//! seq, and acks a seq only once the flush holding its effects and its cursor is on disk.

pub mod enterprise;
pub mod site;

use serde::Deserialize;

pub use crate::store::outbox::HistoryPolicy;
use crate::store::outbox::HistorySettings;
use ferrotwin_models::spec::{AssetDef, AssetKind, PlantSpec};

/// Version of the replication protocol this build speaks (`SiteHello.protocol_version`).
/// 2: the hello says what the site has, batches say which one they follow, the welcome
/// says whether the enterprise rewound (cursors that cannot be poisoned).
pub const PROTOCOL_VERSION: u32 = 2;

/// `[replication]` of a site config: where this site replicates to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteReplication {
    /// The enterprise runtime's gRPC endpoint, e.g. `http://10.0.0.5:50051`.
    pub enterprise: String,
    /// The site of the plant spec this runtime runs (default: the spec's only site).
    #[serde(default)]
    pub site: Option<String>,
    /// Outbox limit; past it twin deltas are compacted into a full snapshot, then the oldest
    /// events are dropped (and reported).
    #[serde(default = "defaults::max_outbox_bytes")]
    pub max_outbox_bytes: u64,
    /// Batches in flight without an ack; the sender waits beyond.
    #[serde(default = "defaults::max_unacked_batches")]
    pub max_unacked_batches: usize,
    /// What of a sensor's history goes to the enterprise, by default. Twin state and events
    /// always go.
    #[serde(default)]
    pub history: HistoryPolicy,
    /// Per machine type (the types of the plant spec): its sensors' policy.
    #[serde(default)]
    pub history_by_type: std::collections::BTreeMap<String, HistoryPolicy>,
    /// Window of `aggregated`.
    #[serde(default = "defaults::aggregate_window_ms")]
    pub aggregate_window_ms: i64,
    /// Reconnect back-off, first and longest delay.
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// mTLS to the enterprise (`enterprise` then starts with `https://`). Read again at
    /// every connect, so renewed files apply without a restart.
    #[serde(default)]
    pub tls: Option<SiteTls>,
}

/// `[replication.tls]`: the site's certificate (its SAN URI `urn:ferrotwin:site:PATH` names
/// the site) and the CA the enterprise's certificate must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTls {
    /// PEM CA certificate(s) that sign the enterprise's certificate.
    pub ca: std::path::PathBuf,
    /// PEM certificate of this site.
    pub cert: std::path::PathBuf,
    /// PEM private key of this site.
    pub key: std::path::PathBuf,
    /// The name the enterprise's certificate must carry (default: the endpoint's host).
    #[serde(default)]
    pub domain: Option<String>,
}

impl SiteTls {
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// tonic's client TLS of these files (read now).
    pub fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
        };
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(&self.ca)?))
            .identity(tonic::transport::Identity::from_pem(
                read(&self.cert)?,
                read(&self.key)?,
            ));
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        Ok(c)
    }
}

/// `[enterprise]` of an enterprise config: which sites it accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnterpriseRole {
    /// Site paths (`acme/berlin`); a site not listed is refused with PERMISSION_DENIED.
    pub accept: Vec<String>,
}

mod defaults {
    pub fn aggregate_window_ms() -> i64 {
        60_000
    }
    pub fn max_outbox_bytes() -> u64 {
        1 << 30
    }
    pub fn max_unacked_batches() -> usize {
        64
    }
    pub fn reconnect_min_ms() -> u64 {
        200
    }
    pub fn reconnect_max_ms() -> u64 {
        10_000
    }
}

impl SiteReplication {
    /// The endpoint's scheme fits the TLS settings: `https://` needs `[replication.tls]`, and
    /// TLS settings need `https://` (never a silent plaintext link).
    pub fn check(&self) -> Result<(), String> {
        let e = &self.enterprise;
        match (e.split_once("://").map(|(s, _)| s), &self.tls) {
            (Some("https"), Some(_)) | (Some("http"), None) => Ok(()),
            (Some("https"), None) => Err(format!(
                "enterprise {e:?} is https:// but [replication.tls] (ca, cert, key) is missing"
            )),
            (Some("http"), Some(_)) => Err(format!(
                "[replication.tls] is set but enterprise {e:?} is http://; use https://"
            )),
            _ => Err(format!(
                "enterprise {e:?}: give http://HOST:PORT or https://HOST:PORT"
            )),
        }
    }

    pub fn new(enterprise: impl Into<String>) -> SiteReplication {
        SiteReplication {
            enterprise: enterprise.into(),
            site: None,
            max_outbox_bytes: defaults::max_outbox_bytes(),
            max_unacked_batches: defaults::max_unacked_batches(),
            history: HistoryPolicy::default(),
            history_by_type: Default::default(),
            aggregate_window_ms: defaults::aggregate_window_ms(),
            reconnect_min_ms: defaults::reconnect_min_ms(),
            reconnect_max_ms: defaults::reconnect_max_ms(),
            tls: None,
        }
    }
}

/// Most bytes of a template's error a hello carries (a site cuts it, an enterprise keeps no
/// more).
pub const MAX_TEMPLATE_ERROR_BYTES: usize = 1024;

/// `meta` keys of the enterprise's per-site cursors.
pub(crate) fn cursor_key(site: &str) -> Vec<u8> {
    format!("repl/{site}/seq").into_bytes()
}

pub(crate) fn event_cursor_key(site: &str) -> Vec<u8> {
    format!("repl/{site}/event").into_bytes()
}

pub(crate) fn u64_of(v: Option<Vec<u8>>) -> u64 {
    v.as_deref().and_then(crate::store::seq_of).unwrap_or(0)
}

impl SiteReplication {
    /// Which history of each sensor this site sends, by the plant's machine types
    /// (`assets`: the plant's expansion).
    pub(crate) fn history_settings(
        &self,
        spec: &PlantSpec,
        assets: &[AssetDef],
    ) -> Result<HistorySettings, String> {
        let r = self;
        for t in r.history_by_type.keys() {
            if !spec.machine_types.contains_key(t) {
                return Err(format!(
                    "replication.history_by_type: {t:?} is not a machine type of the plant (types: {})",
                    spec.machine_types
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let type_of: std::collections::HashMap<_, _> = assets
            .iter()
            .filter_map(|a| match &a.kind {
                AssetKind::Machine { type_name, .. } => {
                    Some((a.path.clone(), type_name.to_string()))
                }
                _ => None,
            })
            .collect();
        let mut by_sensor = std::collections::HashMap::new();
        for a in assets {
            if !matches!(a.kind, AssetKind::Sensor { .. }) {
                continue;
            }
            let policy = a
                .path
                .parent()
                .and_then(|m| type_of.get(&m))
                .and_then(|t| r.history_by_type.get(t))
                .copied()
                .unwrap_or(r.history);
            if policy != r.history {
                by_sensor.insert(a.path.id(), policy);
            }
        }
        Ok(HistorySettings {
            default: r.history,
            by_sensor,
            window_ms: r.aggregate_window_ms,
        })
    }

    /// The site this runtime replicates as: the configured one, else the spec's only site.
    pub(crate) fn site_of(&self, spec: &PlantSpec) -> Result<String, String> {
        let r = self;
        // A site's path is the enterprise's and its name (no expansion of the plant).
        let sites: Vec<String> = spec
            .sites
            .iter()
            .map(|s| format!("{}/{}", spec.enterprise, s.name))
            .collect();
        match &r.site {
            Some(s) if sites.contains(s) => Ok(s.clone()),
            Some(s) => Err(format!(
                "replication.site {s:?} is not a site of the plant spec (sites: {})",
                sites.join(", ")
            )),
            None if sites.len() == 1 => Ok(sites[0].clone()),
            None => Err(format!(
                "the plant has {} sites: say which one this runtime is with replication.site",
                sites.len()
            )),
        }
    }

    /// The outbox must have room for a few full snapshots of the plant (~200 B per stored
    /// twin), or every round would compact the last one away.
    pub(crate) fn check_outbox_size(&self, assets: &[AssetDef]) -> Result<(), String> {
        let stored = assets
            .iter()
            .filter(|a| matches!(a.kind, AssetKind::Sensor { .. } | AssetKind::Machine { .. }))
            .count() as u64;
        let min = (stored * 200 * 4).max(1 << 20);
        if self.max_outbox_bytes < min {
            return Err(format!(
                "replication.max_outbox_bytes {} is too small for {stored} twins: at least {min}",
                self.max_outbox_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod scheme_tests {
    use super::*;

    #[test]
    fn the_scheme_must_fit_the_tls_settings() {
        let mut r = SiteReplication::new("https://10.0.0.5:50051");
        let e = r.check().expect_err("https without tls");
        assert!(e.contains("[replication.tls]"), "{e}");
        r.tls = Some(SiteTls {
            ca: "ca.pem".into(),
            cert: "c.pem".into(),
            key: "k.pem".into(),
            domain: None,
        });
        assert!(r.check().is_ok());
        r.enterprise = "http://10.0.0.5:50051".into();
        assert!(r.check().expect_err("tls over http").contains("https://"));
        r.tls = None;
        assert!(r.check().is_ok());
        r.enterprise = "10.0.0.5:50051".into();
        assert!(r.check().is_err());
    }
}
