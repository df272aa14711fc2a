//! Counters of the runtime, in the families every component uses: received, rejected{reason},
//! errors{stage}, dropped{reason}. Labels are small fixed sets, never asset paths.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrotwin_models::EventKind;

use crate::connections::Connections;
use crate::replication::enterprise::EnterpriseReceiver;
use crate::store::Store;
use crate::twin::now;

#[derive(Debug, Default)]
pub struct Metrics {
    pub readings_received: AtomicU64,
    pub readings_applied: AtomicU64,
    pub batches_routed: AtomicU64,
    pub push_backs: AtomicU64,
    /// Readings for an asset id the registry does not know (refused, never create twins).
    pub unknown_asset: AtomicU64,
    pub rejected_not_finite: AtomicU64,
    pub rejected_wrong_type: AtomicU64,
    pub rejected_future: AtomicU64,
    pub rejected_unknown_property: AtomicU64,
    pub restarts: AtomicU64,
    pub events: [AtomicU64; EventKind::ALL.len()],
}

impl Metrics {
    pub fn count_reject(&self, label: &str) {
        let c = match label {
            "not_finite" => &self.rejected_not_finite,
            "wrong_type" => &self.rejected_wrong_type,
            "future_timestamp" => &self.rejected_future,
            _ => &self.rejected_unknown_property,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_event(&self, kind: EventKind) {
        let i = EventKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.events[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected_not_finite.load(Ordering::Relaxed)
            + self.rejected_wrong_type.load(Ordering::Relaxed)
            + self.rejected_future.load(Ordering::Relaxed)
            + self.rejected_unknown_property.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE ferrotwin_readings_received_total counter");
        let _ = writeln!(
            s,
            "ferrotwin_readings_received_total {}",
            g(&self.readings_received)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_readings_applied_total counter");
        let _ = writeln!(
            s,
            "ferrotwin_readings_applied_total {}",
            g(&self.readings_applied)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_readings_rejected_total counter");
        for (reason, c) in [
            ("not_finite", &self.rejected_not_finite),
            ("wrong_type", &self.rejected_wrong_type),
            ("future_timestamp", &self.rejected_future),
            ("unknown_property", &self.rejected_unknown_property),
            ("unknown_asset", &self.unknown_asset),
        ] {
            let _ = writeln!(
                s,
                "ferrotwin_readings_rejected_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(s, "# TYPE ferrotwin_ingest_push_backs_total counter");
        let _ = writeln!(
            s,
            "ferrotwin_ingest_push_backs_total {}",
            g(&self.push_backs)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_twin_restarts_total counter");
        let _ = writeln!(s, "ferrotwin_twin_restarts_total {}", g(&self.restarts));
        let _ = writeln!(s, "# TYPE ferrotwin_events_total counter");
        for (k, c) in EventKind::ALL.iter().zip(&self.events) {
            let _ = writeln!(
                s,
                "ferrotwin_events_total{{kind=\"{}\"}} {}",
                k.as_str(),
                g(c)
            );
        }
        s
    }
}

/// Prometheus text of everything a runtime counts: ingest and twins (`Metrics`), PLC
/// connections (labelled by connection name: a handful per site), the replication outbox
/// of a site and the freshness of an enterprise's sites. The HTTP server adds its own.
pub fn render_runtime(
    metrics: &Metrics,
    store: &Store,
    connections: &Connections,
    enterprise: Option<&EnterpriseReceiver>,
) -> String {
    let mut s = metrics.render();
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
            .map_or(0.0, |t| (now().0 - t).max(0) as f64 / 1e6);
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
            let age = crate::replication::enterprise::freshness_ms(&m, now())
                .map_or(f64::INFINITY, |ms| ms as f64 / 1000.0);
            let _ = writeln!(
                s,
                "ferrotwin_site_sync_age_seconds{{site=\"{site}\"}} {age}"
            );
        }
    }
    s
}
