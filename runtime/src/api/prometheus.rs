//! The Prometheus page's text of a whole runtime: the hot-path counters (`core::Metrics`),
//! the PLC connections (labelled by connection name: a handful per site), a site's
//! replication outbox and the freshness of an enterprise's sites.

use std::fmt::Write;

use ferrotwin_models::Timestamp;

use crate::connections::Connections;
use crate::core::Metrics;
use crate::replication::enterprise::{EnterpriseReceiver, SiteMirror};
use crate::replication::site::SenderStatus;
use crate::security::conn::Listeners;
use crate::store::Store;
use crate::telemetry::{Discard, FamilyKind, MetricFamily};

/// The metric contract (ARCHITECTURE.md "Metrics"): every family a runtime's `/metrics` page
/// and its OTLP export carry, with its kind, unit, component, labels and whether it counts
/// discards. `tests/e2e/metrics.rs` checks the pages of a site and an enterprise against it.
pub const FAMILIES: &[MetricFamily] = &[
    MetricFamily {
        name: "ferrotwin_readings_received_total",
        kind: FamilyKind::Counter,
        unit: "{reading}",
        component: "ingest",
        labels: &[],
        discard: Discard::No,
        help: "readings taken by the router for a known asset",
    },
    MetricFamily {
        name: "ferrotwin_readings_applied_total",
        kind: FamilyKind::Counter,
        unit: "{reading}",
        component: "twins",
        labels: &[],
        discard: Discard::No,
        help: "readings applied by their twins",
    },
    MetricFamily {
        name: "ferrotwin_readings_rejected_total",
        kind: FamilyKind::Counter,
        unit: "{reading}",
        component: "ingest",
        labels: &["reason"],
        discard: Discard::Fault,
        help: "readings refused (not finite, wrong type, future timestamp, unknown property or asset)",
    },
    MetricFamily {
        name: "ferrotwin_ingest_push_backs_total",
        kind: FamilyKind::Counter,
        unit: "{batch}",
        component: "ingest",
        labels: &[],
        discard: Discard::No,
        help: "batches pushed back to their adapter while twins are behind (kept by the adapter, not lost)",
    },
    MetricFamily {
        name: "ferrotwin_ingest_inflight_readings",
        kind: FamilyKind::Gauge,
        unit: "{reading}",
        component: "ingest",
        labels: &[],
        discard: Discard::No,
        help: "queue depth: readings handed to twins and not handled yet",
    },
    MetricFamily {
        name: "ferrotwin_ingest_inflight_limit_readings",
        kind: FamilyKind::Gauge,
        unit: "{reading}",
        component: "ingest",
        labels: &[],
        discard: Discard::No,
        help: "queue limit: in-flight readings past which the router pushes back",
    },
    MetricFamily {
        name: "ferrotwin_twin_restarts_total",
        kind: FamilyKind::Counter,
        unit: "{restart}",
        component: "twins",
        labels: &[],
        discard: Discard::No,
        help: "twin actors restarted by their supervisor from their last state",
    },
    MetricFamily {
        name: "ferrotwin_events_total",
        kind: FamilyKind::Counter,
        unit: "{event}",
        component: "twins",
        labels: &["kind"],
        discard: Discard::No,
        help: "events raised, by kind",
    },
    MetricFamily {
        name: "ferrotwin_auth_refused_total",
        kind: FamilyKind::Counter,
        unit: "{call}",
        component: "security",
        labels: &["reason"],
        discard: Discard::Intentional,
        help: "calls refused: unauthenticated or denied by the caller's grants",
    },
    MetricFamily {
        name: "ferrotwin_adapter_values_total",
        kind: FamilyKind::Counter,
        unit: "{value}",
        component: "adapters",
        labels: &["connection", "protocol", "outcome"],
        discard: Discard::Fault,
        help: "values read from PLCs: received, rejected (bad value), errors (bad frames, unknown tags)",
    },
    MetricFamily {
        name: "ferrotwin_adapter_writes_total",
        kind: FamilyKind::Counter,
        unit: "{write}",
        component: "adapters",
        labels: &["connection", "protocol", "outcome"],
        discard: Discard::Fault,
        help: "writes to PLCs: ok (the PLC answered, or the device reported the value back), unconfirmed (only the broker took it), failed (refused, timed out, not connected)",
    },
    MetricFamily {
        name: "ferrotwin_adapter_connects_total",
        kind: FamilyKind::Counter,
        unit: "{connect}",
        component: "adapters",
        labels: &["connection", "protocol"],
        discard: Discard::No,
        help: "connections established to the PLC (reconnects included)",
    },
    MetricFamily {
        name: "ferrotwin_adapter_connected",
        kind: FamilyKind::Gauge,
        unit: "1",
        component: "adapters",
        labels: &["connection", "protocol"],
        discard: Discard::No,
        help: "1 while the connection to the PLC is up",
    },
    MetricFamily {
        name: "ferrotwin_store_flushes_total",
        kind: FamilyKind::Counter,
        unit: "{flush}",
        component: "store",
        labels: &[],
        discard: Discard::No,
        help: "store flushes to disk",
    },
    MetricFamily {
        name: "ferrotwin_store_written_total",
        kind: FamilyKind::Counter,
        unit: "{record}",
        component: "store",
        labels: &["what"],
        discard: Discard::No,
        help: "records written: snapshots, history chunks, events",
    },
    MetricFamily {
        name: "ferrotwin_store_errors_total",
        kind: FamilyKind::Counter,
        unit: "{error}",
        component: "store",
        labels: &["stage"],
        discard: Discard::No,
        help: "failed store writes (retried by the next flush: nothing is lost)",
    },
    MetricFamily {
        name: "ferrotwin_store_last_flush_seconds",
        kind: FamilyKind::Gauge,
        unit: "s",
        component: "store",
        labels: &[],
        discard: Discard::No,
        help: "duration of the last flush",
    },
    MetricFamily {
        name: "ferrotwin_outbox_batches",
        kind: FamilyKind::Gauge,
        unit: "{batch}",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "queue depth: outbox batches not acked by the enterprise",
    },
    MetricFamily {
        name: "ferrotwin_outbox_bytes",
        kind: FamilyKind::Gauge,
        unit: "By",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "queue depth: bytes of the batches not acked",
    },
    MetricFamily {
        name: "ferrotwin_outbox_limit_bytes",
        kind: FamilyKind::Gauge,
        unit: "By",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "queue limit: outbox bytes past which the oldest batches are compacted, then dropped",
    },
    MetricFamily {
        name: "ferrotwin_outbox_oldest_unacked_seconds",
        kind: FamilyKind::Gauge,
        unit: "s",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "age of the oldest batch not acked",
    },
    MetricFamily {
        name: "ferrotwin_outbox_compacted_total",
        kind: FamilyKind::Counter,
        unit: "{batch}",
        component: "replication",
        labels: &[],
        discard: Discard::Intentional,
        help: "batches that lost their twin deltas at the outbox limit (a full snapshot replaces them)",
    },
    MetricFamily {
        name: "ferrotwin_outbox_dropped_events_total",
        kind: FamilyKind::Counter,
        unit: "{event}",
        component: "replication",
        labels: &[],
        discard: Discard::Intentional,
        help: "events dropped at the outbox limit (reported to the enterprise as a gap)",
    },
    MetricFamily {
        name: "ferrotwin_replication_sent_batches_total",
        kind: FamilyKind::Counter,
        unit: "{batch}",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "batches sent to the enterprise (resends included)",
    },
    MetricFamily {
        name: "ferrotwin_replication_sent_bytes_total",
        kind: FamilyKind::Counter,
        unit: "By",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "bytes of the batches sent",
    },
    MetricFamily {
        name: "ferrotwin_replication_connects_total",
        kind: FamilyKind::Counter,
        unit: "{connect}",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "replication streams opened to the enterprise",
    },
    MetricFamily {
        name: "ferrotwin_replication_connected",
        kind: FamilyKind::Gauge,
        unit: "1",
        component: "replication",
        labels: &[],
        discard: Discard::No,
        help: "1 while the stream to the enterprise is up",
    },
    MetricFamily {
        name: "ferrotwin_site_sync_age_seconds",
        kind: FamilyKind::Gauge,
        unit: "s",
        component: "replication",
        labels: &["site"],
        discard: Discard::No,
        help: "enterprise: age of the newest state received from each site (+Inf: never)",
    },
    MetricFamily {
        name: "ferrotwin_replication_batches_total",
        kind: FamilyKind::Counter,
        unit: "{batch}",
        component: "replication",
        labels: &["site", "outcome"],
        discard: Discard::Fault,
        help: "enterprise: batches received, by outcome (applied, duplicate, refused, skipped by the site)",
    },
    MetricFamily {
        name: "ferrotwin_replication_events_total",
        kind: FamilyKind::Counter,
        unit: "{event}",
        component: "replication",
        labels: &["site", "outcome"],
        discard: Discard::Fault,
        help: "enterprise: events not applied, by outcome (duplicate, never arrived, outside the site)",
    },
    MetricFamily {
        name: "ferrotwin_replication_rewinds_total",
        kind: FamilyKind::Counter,
        unit: "{rewind}",
        component: "replication",
        labels: &["site"],
        discard: Discard::No,
        help: "enterprise: cursors rewound to what a site says it has",
    },
    MetricFamily {
        name: "ferrotwin_replication_streams_refused_total",
        kind: FamilyKind::Counter,
        unit: "{stream}",
        component: "replication",
        labels: &["site"],
        discard: Discard::Intentional,
        help: "enterprise: streams refused while the site's previous one is alive",
    },
    MetricFamily {
        name: "ferrotwin_listener_connections",
        kind: FamilyKind::Gauge,
        unit: "{connection}",
        component: "listeners",
        labels: &["listener"],
        discard: Discard::No,
        help: "open connections per listener",
    },
    MetricFamily {
        name: "ferrotwin_listener_connection_limit",
        kind: FamilyKind::Gauge,
        unit: "{connection}",
        component: "listeners",
        labels: &["listener"],
        discard: Discard::No,
        help: "connections a listener admits at most",
    },
    MetricFamily {
        name: "ferrotwin_listener_refused_total",
        kind: FamilyKind::Counter,
        unit: "{connection}",
        component: "listeners",
        labels: &["listener", "reason"],
        discard: Discard::Intentional,
        help: "connections refused at a cap",
    },
    MetricFamily {
        name: "ferrotwin_grpc_calls_total",
        kind: FamilyKind::Counter,
        unit: "{call}",
        component: "grpc",
        labels: &["service", "code"],
        discard: Discard::No,
        help: "finished gRPC calls by service and status code (a stream counts when it ends)",
    },
    MetricFamily {
        name: "ferrotwin_http_requests_total",
        kind: FamilyKind::Counter,
        unit: "{request}",
        component: "http",
        labels: &["route", "status"],
        discard: Discard::No,
        help: "HTTP requests by route class and status class",
    },
    MetricFamily {
        name: "ferrotwin_http_live_streams",
        kind: FamilyKind::Gauge,
        unit: "{stream}",
        component: "http",
        labels: &[],
        discard: Discard::No,
        help: "open live (server-sent events) streams",
    },
    MetricFamily {
        name: "ferrotwin_http_live_refused_total",
        kind: FamilyKind::Counter,
        unit: "{stream}",
        component: "http",
        labels: &[],
        discard: Discard::Intentional,
        help: "live streams refused at their cap",
    },
    MetricFamily {
        name: "ferrotwin_http_live_resyncs_total",
        kind: FamilyKind::Counter,
        unit: "{stream}",
        component: "http",
        labels: &[],
        discard: Discard::No,
        help: "live streams that lagged and were resent a snapshot",
    },
];

/// What a runtime's page is rendered from.
pub struct Sources<'a> {
    pub metrics: &'a Metrics,
    /// Readings handed to twins and not handled yet.
    pub inflight: usize,
    pub store: &'a Store,
    pub connections: &'a Connections,
    /// A site's replication sender.
    pub sender: Option<&'a SenderStatus>,
    pub enterprise: Option<&'a EnterpriseReceiver>,
    pub listeners: &'a Listeners,
}

/// Prometheus text of everything a runtime counts: ingest and twins (`Metrics`), PLC
/// connections (labelled by connection name: a handful per site), the store, the
/// replication outbox and sender of a site and the freshness of an enterprise's sites. The
/// HTTP server adds its own. Every family is in `FAMILIES`.
pub fn render_runtime(src: &Sources<'_>) -> String {
    let Sources {
        metrics,
        inflight,
        store,
        connections,
        sender,
        enterprise,
        listeners,
    } = *src;
    let mut s = metrics.render();
    let _ = writeln!(
        s,
        "# TYPE ferrotwin_ingest_inflight_readings gauge\nferrotwin_ingest_inflight_readings {inflight}"
    );
    let st = &store.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        s,
        "# TYPE ferrotwin_store_flushes_total counter\nferrotwin_store_flushes_total {}",
        load(&st.flushes)
    );
    let _ = writeln!(s, "# TYPE ferrotwin_store_written_total counter");
    for (what, c) in [
        ("snapshots", &st.snapshots_written),
        ("history_chunks", &st.chunks_written),
        ("events", &st.events_written),
    ] {
        let _ = writeln!(
            s,
            "ferrotwin_store_written_total{{what=\"{what}\"}} {}",
            load(c)
        );
    }
    let _ = writeln!(
        s,
        "# TYPE ferrotwin_store_errors_total counter\nferrotwin_store_errors_total{{stage=\"write\"}} {}",
        load(&st.write_errors)
    );
    let _ = writeln!(
        s,
        "# TYPE ferrotwin_store_last_flush_seconds gauge\nferrotwin_store_last_flush_seconds {}",
        load(&st.last_flush_us) as f64 / 1e6
    );
    let _ = writeln!(s, "# TYPE ferrotwin_listener_connection_limit gauge");
    for l in listeners.each() {
        let _ = writeln!(
            s,
            "ferrotwin_listener_connection_limit{{listener=\"{}\"}} {}",
            l.what,
            l.max_total()
        );
    }
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
        let _ = writeln!(s, "# TYPE ferrotwin_adapter_writes_total counter");
        for (st, protocol, _, _) in &statuses {
            for (what, n) in [
                ("ok", st.writes_ok),
                ("unconfirmed", st.writes_unconfirmed),
                ("failed", st.writes_failed),
            ] {
                let _ = writeln!(
                    s,
                    "ferrotwin_adapter_writes_total{{connection=\"{}\",protocol=\"{protocol}\",outcome=\"{what}\"}} {n}",
                    st.name
                );
            }
        }
        let _ = writeln!(s, "# TYPE ferrotwin_adapter_connects_total counter");
        for (st, protocol, _, _) in &statuses {
            let _ = writeln!(
                s,
                "ferrotwin_adapter_connects_total{{connection=\"{}\",protocol=\"{protocol}\"}} {}",
                st.name, st.connects
            );
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
            (
                "ferrotwin_outbox_limit_bytes",
                "gauge",
                lag.limit_bytes as f64,
            ),
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
    if let Some(snd) = sender {
        for (name, v) in [
            (
                "ferrotwin_replication_sent_batches_total",
                load(&snd.batches_sent),
            ),
            (
                "ferrotwin_replication_sent_bytes_total",
                load(&snd.bytes_sent),
            ),
            ("ferrotwin_replication_connects_total", load(&snd.connects)),
        ] {
            let _ = writeln!(s, "# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            s,
            "# TYPE ferrotwin_replication_connected gauge\nferrotwin_replication_connected {}",
            u8::from(snd.connected.load(std::sync::atomic::Ordering::Relaxed))
        );
    }
    if let Some(e) = enterprise {
        let _ = writeln!(s, "# TYPE ferrotwin_site_sync_age_seconds gauge");
        for (site, m) in crate::replication::enterprise::sites(e) {
            // Never synced: +Inf, as the text format spells it.
            let age = crate::replication::enterprise::freshness_ms(&m, Timestamp::now())
                .map_or_else(|| "+Inf".to_owned(), |ms| (ms as f64 / 1000.0).to_string());
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
