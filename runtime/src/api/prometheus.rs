//! The Prometheus page's text of a whole runtime: the hot-path counters (`core::Metrics`),
//! the PLC connections (labelled by connection name: a handful per site), a site's
//! replication outbox and the freshness of an enterprise's sites.

use std::fmt::Write;

use ferrotwin_models::Timestamp;

use crate::connections::Connections;
use crate::core::Metrics;
use crate::replication::enterprise::{EnterpriseReceiver, SiteMirror};
use crate::security::conn::Listeners;
use crate::store::Store;

/// Prometheus text of everything a runtime counts: ingest and twins (`Metrics`), PLC
/// connections (labelled by connection name: a handful per site), the replication outbox
/// of a site and the freshness of an enterprise's sites. The HTTP server adds its own.
pub fn render_runtime(
    metrics: &Metrics,
    store: &Store,
    connections: &Connections,
    enterprise: Option<&EnterpriseReceiver>,
    listeners: &Listeners,
) -> String {
    let mut s = metrics.render();
    let _ = writeln!(s, "# TYPE ferrotwin_listener_connections gauge");
    for l in listeners.each() {
        let _ = writeln!(
            s,
            "ferrotwin_listener_connections{{listener=\"{}\"}} {}",
            l.what,
            l.open()
        );
    }
    let _ = writeln!(s, "# TYPE ferrotwin_listener_refused_total counter");
    for l in listeners.each() {
        let _ = writeln!(
            s,
            "ferrotwin_listener_refused_total{{listener=\"{}\",reason=\"connection cap\"}} {}",
            l.what,
            l.refused.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let statuses = connections.statuses();
    if !statuses.is_empty() {
        let _ = writeln!(s, "# TYPE ferrotwin_adapter_values_total counter");
        for (st, protocol, _, _) in &statuses {
            for (what, n) in [
                ("received", st.received),
                ("rejected", st.rejected),
                ("errors", st.errors),
            ] {
                let _ = writeln!(
                    s,
                    "ferrotwin_adapter_values_total{{connection=\"{}\",protocol=\"{protocol}\",outcome=\"{what}\"}} {n}",
                    st.name
                );
            }
        }
        let _ = writeln!(s, "# TYPE ferrotwin_adapter_connected gauge");
        for (st, protocol, _, _) in &statuses {
            let _ = writeln!(
                s,
                "ferrotwin_adapter_connected{{connection=\"{}\",protocol=\"{protocol}\"}} {}",
                st.name,
                u8::from(st.link == ferrotwin_adapters::LinkState::Connected)
            );
        }
    }
    if let Some(ob) = store.outbox() {
        let lag = ob.lag();
        let age_s = lag
            .oldest_unacked_us
            .map_or(0.0, |t| (Timestamp::now().0 - t).max(0) as f64 / 1e6);
        for (name, kind, v) in [
            ("ferrotwin_outbox_batches", "gauge", lag.count as f64),
            ("ferrotwin_outbox_bytes", "gauge", lag.bytes as f64),
            ("ferrotwin_outbox_oldest_unacked_seconds", "gauge", age_s),
            (
                "ferrotwin_outbox_compacted_total",
                "counter",
                lag.compacted as f64,
            ),
            (
                "ferrotwin_outbox_dropped_events_total",
                "counter",
                lag.dropped_events as f64,
            ),
        ] {
            let _ = writeln!(s, "# TYPE {name} {kind}\n{name} {v}");
        }
    }
    if let Some(e) = enterprise {
        let _ = writeln!(s, "# TYPE ferrotwin_site_sync_age_seconds gauge");
        for (site, m) in crate::replication::enterprise::sites(e) {
            let age = crate::replication::enterprise::freshness_ms(&m, Timestamp::now())
                .map_or(f64::INFINITY, |ms| ms as f64 / 1000.0);
            let _ = writeln!(
                s,
                "ferrotwin_site_sync_age_seconds{{site=\"{site}\"}} {age}"
            );
        }
        // What each site's stream brought, by outcome (refused: never applied nor acked).
        use std::sync::atomic::Ordering::Relaxed;
        let sites = crate::replication::enterprise::sites(e);
        let _ = writeln!(s, "# TYPE ferrotwin_replication_batches_total counter");
        for (site, m) in &sites {
            for (outcome, n) in [
                ("applied", m.batches.load(Relaxed)),
                ("duplicate", m.duplicates.load(Relaxed)),
                ("refused", m.refused.load(Relaxed)),
                ("skipped by the site", m.skipped_batches.load(Relaxed)),
            ] {
                let _ = writeln!(
                    s,
                    "ferrotwin_replication_batches_total{{site=\"{site}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        let _ = writeln!(s, "# TYPE ferrotwin_replication_events_total counter");
        for (site, m) in &sites {
            for (outcome, n) in [
                ("duplicate", m.duplicate_events.load(Relaxed)),
                ("never arrived", m.event_gaps.load(Relaxed)),
                ("outside the site", m.foreign.load(Relaxed)),
            ] {
                let _ = writeln!(
                    s,
                    "ferrotwin_replication_events_total{{site=\"{site}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        for (name, f) in [
            (
                "ferrotwin_replication_rewinds_total",
                (|m| m.rewinds.load(Relaxed)) as fn(&SiteMirror) -> u64,
            ),
            ("ferrotwin_replication_streams_refused_total", |m| {
                m.streams_refused.load(Relaxed)
            }),
        ] {
            let _ = writeln!(s, "# TYPE {name} counter");
            for (site, m) in &sites {
                let _ = writeln!(s, "{name}{{site=\"{site}\"}} {}", f(m));
            }
        }
    }
    s
}
