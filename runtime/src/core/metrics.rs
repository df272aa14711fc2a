//! Hot-path counters of the runtime and the ingest credits. Counters come in the families
//! every component uses: received, rejected{reason}, errors{stage}, dropped{reason}; labels
//! are small fixed sets, never asset paths. The `/metrics` text of a whole runtime (these,
//! the connections', the outbox's) is `api::prometheus`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ferrotwin_models::EventKind;

#[derive(Debug, Default)]
pub struct Metrics {
    pub readings_received: AtomicU64,
    pub readings_applied: AtomicU64,
    pub batches_routed: AtomicU64,
    pub push_backs: AtomicU64,
    /// Readings for an asset id the registry does not know (refused, never create twins).
    pub unknown_asset: AtomicU64,
    /// Readings routed to a twin a live apply removed while they were on their way.
    pub removed_asset: AtomicU64,
    pub rejected_not_finite: AtomicU64,
    pub rejected_wrong_type: AtomicU64,
    pub rejected_future: AtomicU64,
    pub rejected_unknown_property: AtomicU64,
    pub restarts: AtomicU64,
    pub events: [AtomicU64; EventKind::ALL.len()],
    /// Calls refused for missing or bad credentials.
    pub auth_failures: AtomicU64,
    /// Calls refused because the caller's grants do not cover them.
    pub auth_denials: AtomicU64,
    /// Readings the router hands twins at most before it pushes back (set at start).
    pub ingest_limit: AtomicU64,
    /// Finished gRPC calls per service (`GRPC_SERVICES`) and status code.
    pub grpc_calls: [[AtomicU64; GRPC_CODES.len()]; GRPC_SERVICES.len()],
}

/// The gRPC services counted apart; a call to any other path counts as `other`.
pub const GRPC_SERVICES: [&str; 6] = [
    "ferrotwin.v1.TwinService",
    "ferrotwin.v1.ReplicationService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "other",
];

/// gRPC status codes by number, as the protocol names them.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The index in `GRPC_SERVICES` of the service a call's path (`/package.Service/Method`) names.
pub fn grpc_service_index(path: &str) -> usize {
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    GRPC_SERVICES
        .iter()
        .position(|s| *s == service)
        .unwrap_or(GRPC_SERVICES.len() - 1)
}

impl Metrics {
    /// Counts a finished gRPC call of service `service` (`grpc_service_index`) with status
    /// `code` (a code outside the protocol's counts as UNKNOWN).
    pub fn count_grpc_call(&self, service: usize, code: i64) {
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < GRPC_CODES.len())
            .unwrap_or(2);
        if let Some(row) = self.grpc_calls.get(service) {
            row[code].fetch_add(1, Ordering::Relaxed);
        }
    }

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
            ("removed_asset", &self.removed_asset),
        ] {
            let _ = writeln!(
                s,
                "ferrotwin_readings_rejected_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(s, "# TYPE ferrotwin_auth_refused_total counter");
        for (reason, c) in [
            ("unauthenticated", &self.auth_failures),
            ("denied", &self.auth_denials),
        ] {
            let _ = writeln!(
                s,
                "ferrotwin_auth_refused_total{{reason=\"{reason}\"}} {}",
                g(c)
            );
        }
        let _ = writeln!(s, "# TYPE ferrotwin_ingest_push_backs_total counter");
        let _ = writeln!(
            s,
            "ferrotwin_ingest_push_backs_total {}",
            g(&self.push_backs)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_ingest_inflight_limit_readings gauge");
        let _ = writeln!(
            s,
            "ferrotwin_ingest_inflight_limit_readings {}",
            g(&self.ingest_limit)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_twin_restarts_total counter");
        let _ = writeln!(s, "ferrotwin_twin_restarts_total {}", g(&self.restarts));
        // Codes a service never answered are left out (17 zeros a service); OK always shows.
        let _ = writeln!(s, "# TYPE ferrotwin_grpc_calls_total counter");
        for (service, row) in GRPC_SERVICES.iter().zip(&self.grpc_calls) {
            for (i, (code, c)) in GRPC_CODES.iter().zip(row).enumerate() {
                let n = g(c);
                if n > 0 || i == 0 {
                    let _ = writeln!(
                        s,
                        "ferrotwin_grpc_calls_total{{service=\"{service}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
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

/// The ingest budget: readings the router handed to twins and they have not handled yet.
/// The router takes credits, twins return them; a clone reads the same count.
#[derive(Clone)]
pub struct Credits(pub(crate) Arc<AtomicUsize>);

impl Credits {
    /// Readings in flight now (0: every twin handled everything it was sent).
    pub fn in_flight(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}
