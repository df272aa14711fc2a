//! JSON shapes of the HTTP API, converted from the `ferrotwin.v1` protobuf answers the gRPC
//! service gives (one source of truth for what a twin holds): twin.proto's field names,
//! enums as lowercase strings without their prefix (`LEVEL_SENSOR` → `"sensor"`), times as
//! integer µs fields named like the proto's (`source_ts_us`).

use ferrotwin_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::api::names::{alarm_state, level, quality_code, severity};

/// A reading's value: a JSON number (float or integer) or boolean.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(untagged)]
pub enum ValueDto {
    Int(i64),
    Float(f64),
    Bool(bool),
}

fn value(v: &pb::Value) -> Option<ValueDto> {
    Some(match v.kind? {
        pb::value::Kind::Float(f) => ValueDto::Float(f),
        pb::value::Kind::Int(i) => ValueDto::Int(i),
        pb::value::Kind::Bool(b) => ValueDto::Bool(b),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QualityDto {
    /// "good", "uncertain" or "bad".
    pub code: String,
    /// Why the value is not good ("stale", ...); empty when good.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlarmDto {
    pub name: String,
    /// "normal", "active_unacked", "active_acked" or "returned_unacked".
    pub state: String,
    /// "info", "low", "medium", "high" or "critical".
    pub severity: String,
    /// "high" or "low".
    pub kind: String,
    pub limit: f64,
    pub deadband: f64,
    pub since_us: i64,
    /// Zero when not shelved.
    pub shelved_until_us: i64,
    pub on_delay_ms: u64,
    pub off_delay_ms: u64,
}

pub fn alarm(a: &pb::Alarm) -> AlarmDto {
    AlarmDto {
        name: a.name.clone(),
        state: alarm_state(a.state),
        severity: severity(a.severity),
        kind: a.kind.clone(),
        limit: a.limit,
        deadband: a.deadband,
        since_us: a.since_us,
        shelved_until_us: a.shelved_until_us,
        on_delay_ms: a.on_delay_ms,
        off_delay_ms: a.off_delay_ms,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatsDto {
    pub count: u64,
    pub mean: f64,
    pub stddev: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SensorStateDto {
    /// Absent (null) until the first reading.
    pub value: Option<ValueDto>,
    pub has_value: bool,
    pub quality: Option<QualityDto>,
    pub source_ts_us: i64,
    pub server_ts_us: i64,
    pub unit: String,
    pub kind: String,
    pub stats: Option<StatsDto>,
    pub alarms: Vec<AlarmDto>,
    pub rejected: u64,
    /// Local inference: the anomaly score (alarm line at the detector's threshold, 3 by
    /// default); absent while the detectors are off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    /// An anomaly episode of the sensor is open.
    pub anomalous: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OeeDto {
    pub availability: f64,
    pub performance: f64,
    pub quality: f64,
    pub oee: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachineStateDto {
    /// "idle", "running", "setup" or "down".
    pub state: String,
    pub state_since_us: i64,
    pub oee: Option<OeeDto>,
    pub good_count: u64,
    pub scrap_count: u64,
    pub ideal_cycle_ms: f64,
    /// Local inference, each absent while off or learning: multivariate anomaly score,
    /// health 0..100, remaining useful life and its band (hours; until the health index
    /// reaches 0, i.e. the worst sensor its high alarm limit), the ONNX model's output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rul_hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rul_low_hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rul_high_hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_score: Option<f64>,
    /// An anomaly episode of the machine is open.
    pub anomalous: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RollUpDto {
    pub machines: u32,
    pub running: u32,
    pub sensors: u32,
    pub throughput_per_h: f64,
    /// Absent when no machine below reported an OEE.
    pub mean_oee: Option<f64>,
    /// Active alarms by severity, indexed info, low, medium, high, critical.
    pub alarms_by_severity: Vec<u32>,
    pub active_alarms: u32,
    pub unacked_alarms: u32,
    pub worst_quality: String,
    /// Lowest machine health below; absent when no machine reports one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_health: Option<f64>,
    /// Sensors and machines below with an open anomaly episode.
    pub anomalies: u32,
}

/// One twin: `sensor` for sensors, `machine` (and `rollup`) for machines, `rollup` above.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TwinDto {
    /// UUID v5 of the path.
    pub id: String,
    pub path: String,
    /// "enterprise", "site", "area", "line", "machine" or "sensor".
    pub level: String,
    /// Machine type ("press"), sensor type ("press.temp") or the level name.
    #[serde(rename = "type")]
    pub r#type: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensor: Option<SensorStateDto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineStateDto>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollup: Option<RollUpDto>,
    pub restarts: u32,
    pub updated_us: i64,
    /// Enterprise role: ms since this mirror's site last delivered a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror_age_ms: Option<i64>,
}

pub fn twin(t: &pb::Twin) -> TwinDto {
    TwinDto {
        id: t.id.clone(),
        path: t.path.clone(),
        level: level(t.level),
        r#type: t.r#type.clone(),
        name: t.name.clone(),
        sensor: t.sensor.as_ref().map(|s| SensorStateDto {
            value: s.value.as_ref().and_then(value),
            has_value: s.has_value,
            quality: s.quality.as_ref().map(|q| QualityDto {
                code: quality_code(q.code),
                reason: q.reason.clone(),
            }),
            source_ts_us: s.source_ts_us,
            server_ts_us: s.server_ts_us,
            unit: s.unit.clone(),
            kind: s.kind.clone(),
            stats: s.stats.as_ref().map(|st| StatsDto {
                count: st.count,
                mean: st.mean,
                stddev: st.stddev,
                min: st.min,
                max: st.max,
            }),
            alarms: s.alarms.iter().map(alarm).collect(),
            rejected: s.rejected,
            anomaly_score: s.anomaly_score,
            anomalous: s.anomalous,
        }),
        machine: t.machine.as_ref().map(|m| MachineStateDto {
            state: m.state.clone(),
            state_since_us: m.state_since_us,
            oee: m.oee.as_ref().map(|o| OeeDto {
                availability: o.availability,
                performance: o.performance,
                quality: o.quality,
                oee: o.oee,
            }),
            good_count: m.good_count,
            scrap_count: m.scrap_count,
            ideal_cycle_ms: m.ideal_cycle_ms,
            anomaly_score: m.anomaly_score,
            health: m.health,
            rul_hours: m.rul_hours,
            rul_low_hours: m.rul_low_hours,
            rul_high_hours: m.rul_high_hours,
            model_score: m.model_score,
            anomalous: m.anomalous,
        }),
        rollup: t.rollup.as_ref().map(|r| RollUpDto {
            machines: r.machines,
            running: r.running,
            sensors: r.sensors,
            throughput_per_h: r.throughput_per_h,
            mean_oee: r.mean_oee,
            alarms_by_severity: r.alarms_by_severity.clone(),
            active_alarms: r.active_alarms,
            unacked_alarms: r.unacked_alarms,
            worst_quality: quality_code(r.worst_quality),
            worst_health: r.worst_health,
            anomalies: r.anomalies,
        }),
        restarts: t.restarts,
        updated_us: t.updated_us,
        mirror_age_ms: t.mirror_age_ms,
    }
}

/// A page of twins (browse, query).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TwinPage {
    /// Depth-first, parents before children.
    pub twins: Vec<TwinDto>,
    /// Pass as `page_token` for the next page; empty at the end.
    pub next_page_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventDto {
    pub seq: u64,
    pub path: String,
    pub ts_us: i64,
    /// "alarm", "quality", "state", "rejected", "lifecycle", "connection" or "write".
    pub kind: String,
    pub severity: String,
    pub alarm: String,
    pub message: String,
    /// Anomaly events: "start" or "end" of an episode of the detector in `alarm`; absent
    /// for every other event.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub episode: String,
}

pub fn event(e: &pb::Event) -> EventDto {
    EventDto {
        seq: e.seq,
        path: e.path.clone(),
        ts_us: e.ts_us,
        kind: e.kind.clone(),
        severity: severity(e.severity),
        alarm: e.alarm.clone(),
        message: e.message.clone(),
        episode: e.episode.clone(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub events: Vec<EventDto>,
    /// Pass as `after_seq` to continue; 0 when there is nothing more.
    pub next_after_seq: u64,
}

/// A machine's local action rule: what it watches, what it does, where it is in its life.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RuleDto {
    /// The machine it runs on.
    pub path: String,
    pub name: String,
    /// `enabled`, `dry-run` or `disabled`.
    pub mode: String,
    /// `armed`, `pending`, `firing`, `latched`, `cooling-down` or `limited`.
    pub phase: String,
    /// The condition, the action and the re-arm, in words.
    pub when: String,
    pub then: String,
    pub rearm: String,
    /// Firings since the twin started (dry-run ones too), and those `max_firings` held back.
    pub firings: u64,
    pub limited: u64,
    pub last_fired_us: Option<i64>,
    /// What the last firing did (or would have), with the PLC's answer.
    pub last_result: String,
    /// The last firing's action failed: the machine's alarm `rule:NAME` is up.
    pub failed: bool,
}

pub fn rule(r: &pb::Rule) -> RuleDto {
    RuleDto {
        path: r.path.clone(),
        name: r.name.clone(),
        mode: r.mode.clone(),
        phase: r.phase.clone(),
        when: r.when.clone(),
        then: r.then.clone(),
        rearm: r.rearm.clone(),
        firings: r.firings,
        limited: r.limited,
        last_fired_us: r.last_fired_us,
        last_result: r.last_result.clone(),
        failed: r.failed,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RulePage {
    pub rules: Vec<RuleDto>,
    /// More rules matched than `limit`.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryPointDto {
    pub ts_us: i64,
    /// The bucket mean when downsampled.
    pub value: f64,
    pub min: f64,
    pub max: f64,
    pub count: u32,
    pub quality: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryDto {
    pub points: Vec<HistoryPointDto>,
    pub downsampled: bool,
    pub raw_points: u64,
    /// The range read, after `range`/`from`/`to` were resolved.
    pub from_us: i64,
    pub to_us: i64,
}

pub fn history(h: &pb::GetHistoryResponse, from_us: i64, to_us: i64) -> HistoryDto {
    HistoryDto {
        points: h
            .points
            .iter()
            .map(|p| HistoryPointDto {
                ts_us: p.ts_us,
                value: p.value,
                min: p.min,
                max: p.max,
                count: p.count,
                quality: quality_code(p.quality),
            })
            .collect(),
        downsampled: h.downsampled,
        raw_points: h.raw_points,
        from_us,
        to_us,
    }
}

/// One alarm of the alarm summary.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActiveAlarmDto {
    /// The sensor holding the alarm.
    pub path: String,
    pub name: String,
    pub state: String,
    pub severity: String,
    pub since_us: i64,
    /// The sensor's current value.
    pub value: Option<ValueDto>,
    pub unit: String,
    pub message: String,
}

/// Count of listed alarms per severity.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SeverityCounts {
    pub info: u32,
    pub low: u32,
    pub medium: u32,
    pub high: u32,
    pub critical: u32,
}

impl SeverityCounts {
    pub fn add(&mut self, severity: &str) {
        match severity {
            "critical" => self.critical += 1,
            "high" => self.high += 1,
            "medium" => self.medium += 1,
            "low" => self.low += 1,
            _ => self.info += 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AlarmSummary {
    /// Most severe first, then newest first.
    pub alarms: Vec<ActiveAlarmDto>,
    pub counts: SeverityCounts,
    /// More alarms matched than the list holds (`limit`).
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AckRequest {
    /// Sensor path.
    pub path: String,
    pub alarm: String,
    /// Who acknowledges (recorded in the event).
    pub by: String,
    #[serde(default)]
    pub comment: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchHit {
    pub path: String,
    pub name: String,
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SearchResult {
    pub hits: Vec<SearchHit>,
    /// More assets matched than `limit`.
    pub truncated: bool,
}

/// Every error answer: what is wrong, and where it helps, where to go instead.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDto {
    pub error: String,
    /// 404 for an asset: the nearest existing parent (absent when none exists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nearest_parent: Option<String>,
    /// 400 for a query: the byte offset in the query text where parsing failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

/// `/readyz`: whether this runtime takes traffic.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ready {
    /// True once the store is open, the twins are restored and every role's task (PLC
    /// connections, the replication sender or receiver) is started; false while it stops.
    pub ready: bool,
    pub stopping: bool,
    pub twins: usize,
    /// "standalone", "site" or "enterprise".
    pub role: String,
    /// PLC connections started, and how many are connected now (a PLC that is down does not
    /// make the runtime unready: its twins show it).
    pub connections: usize,
    pub connections_up: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// "ok".
    pub status: String,
    pub twins: usize,
    /// "standalone", "site" or "enterprise".
    pub role: String,
}
