//! Events: what happened to an asset, persisted, streamed to watchers and replicated.

use std::fmt;

use crate::asset::AssetPath;
use crate::value::Timestamp;

/// Severity of events and alarms, ordered from least to most severe.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of thing happened. A small closed set: it is a filter and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// An alarm changed state (raised, acked, returned, cleared, shelved).
    Alarm,
    /// A twin's quality changed (e.g. turned stale).
    Quality,
    /// A machine changed state (running, idle, ...).
    State,
    /// A reading was rejected (NaN, wrong type, future timestamp).
    Rejected,
    /// Twin lifecycle: restarted after a crash, restored, removed.
    Lifecycle,
    /// A PLC connection changed: connected, disconnected, a tag failing or recovered, values
    /// from a source no tag maps.
    Connection,
    /// A write-back to a PLC, with who asked and the PLC's answer.
    Write,
    /// Local inference: an anomaly episode started or ended (`alarm` names the detector).
    Anomaly,
    /// The plant model changed at this asset (a live apply added, removed or changed it).
    Model,
    /// A local action rule fired (`alarm` names the rule): what it wrote or would have
    /// written, the PLC's answer, the latency from the triggering reading.
    Action,
}

impl EventKind {
    pub const ALL: [EventKind; 10] = [
        EventKind::Alarm,
        EventKind::Quality,
        EventKind::State,
        EventKind::Rejected,
        EventKind::Lifecycle,
        EventKind::Connection,
        EventKind::Write,
        EventKind::Anomaly,
        EventKind::Model,
        EventKind::Action,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Alarm => "alarm",
            EventKind::Quality => "quality",
            EventKind::State => "state",
            EventKind::Rejected => "rejected",
            EventKind::Lifecycle => "lifecycle",
            EventKind::Connection => "connection",
            EventKind::Write => "write",
            EventKind::Anomaly => "anomaly",
            EventKind::Model => "model",
            EventKind::Action => "action",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// An event. `seq` is assigned by the store when it is persisted (0 before).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub asset: AssetPath,
    pub ts: Timestamp,
    pub kind: EventKind,
    pub severity: Severity,
    /// For alarm events: the alarm's name (e.g. `high`); for anomaly events: the detector
    /// (e.g. `spike`); empty otherwise.
    pub alarm: String,
    pub message: String,
    /// Anomaly events: whether this one opens or closes an episode of the detector in
    /// `alarm` (the eval pairs them by this, never by the message text). `None` otherwise.
    pub episode: Option<EpisodeEdge>,
}

/// The edge of an anomaly episode an event marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EpisodeEdge {
    Start,
    End,
}

impl EpisodeEdge {
    pub fn as_str(self) -> &'static str {
        match self {
            EpisodeEdge::Start => "start",
            EpisodeEdge::End => "end",
        }
    }

    /// The code of the store and replication records (0 = no edge).
    pub fn code(edge: Option<EpisodeEdge>) -> u32 {
        match edge {
            None => 0,
            Some(EpisodeEdge::Start) => 1,
            Some(EpisodeEdge::End) => 2,
        }
    }

    /// Inverse of `code`; an unknown code (a newer writer) reads as no edge.
    pub fn from_code(code: u32) -> Option<EpisodeEdge> {
        match code {
            1 => Some(EpisodeEdge::Start),
            2 => Some(EpisodeEdge::End),
            _ => None,
        }
    }
}

impl Event {
    pub fn new(
        asset: AssetPath,
        ts: Timestamp,
        kind: EventKind,
        severity: Severity,
        message: impl Into<String>,
    ) -> Event {
        Event {
            seq: 0,
            asset,
            ts,
            kind,
            severity,
            alarm: String::new(),
            message: message.into(),
            episode: None,
        }
    }
}
