//! The messages every twin actor takes, and what asking one can fail with. One enum so the
//! registry routes to any twin by id.

use std::sync::Arc;
use std::time::Duration;

use ferrotwin_models::alarm::{AlarmState, AlarmStatus};
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::rule::RuleMode;
use ferrotwin_models::{AssetId, AssetPath, Severity, Timestamp};
use ractor::{ActorRef, RpcReplyPort};

use super::snapshot::TwinSnapshot;

/// Messages of every twin kind. One enum so the registry routes to any twin by id; each
/// actor handles the variants of its kind and counts the rest as misrouted.
pub enum TwinMsg {
    /// Readings wait in the twin's registry inbox: take and apply them.
    Drain,
    /// A child's roll-up changed.
    ChildChanged { id: AssetId, rollup: RollUp },
    /// Debounce timer: publish the roll-up to the parent now.
    PublishRollUp,
    /// Sweeper: no reading since the stale threshold.
    CheckStale(Timestamp),
    /// Machines: evaluate the detectors on the sample board, at this source time.
    Evaluate(Timestamp),
    Acknowledge {
        alarm: String,
        by: String,
        comment: String,
        reply: RpcReplyPort<Result<AlarmStatus, TwinError>>,
    },
    Shelve {
        alarm: String,
        until: Option<Timestamp>,
        by: String,
        reply: RpcReplyPort<Result<AlarmStatus, TwinError>>,
    },
    /// Write the history tail now (clean shutdown).
    FlushHistory(RpcReplyPort<()>),
    /// Machines, lines and above: a live apply gave this twin a new registry entry (new
    /// settings): apply what the old entry's inbox holds, take the new entry and its
    /// settings, keep running (children untouched).
    Rebind(RpcReplyPort<Result<(), String>>),
    /// Parents: a live apply added (or replaced) the child at `path`, whose entry is in the
    /// registry: start its twin (and so its subtree) linked to this one.
    Adopt {
        path: AssetPath,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Machines: an alarm of one of its sensors changed state (sent only to machines with
    /// alarm rules).
    SensorAlarm(Box<SensorAlarm>),
    /// Machines: a rule's timer (a `for_ms`, a cooldown, a window) is due: look again.
    RuleTick,
    /// Machines: a rule's action came back from the executor.
    ActionDone(Box<ActionDone>),
    /// Machines: switch a rule's mode; answers the mode it had.
    SetRuleMode {
        rule: String,
        mode: RuleMode,
        reply: RpcReplyPort<Result<RuleMode, TwinError>>,
    },
    /// Enterprise role: the state of this twin's original at its site (replication).
    /// Sensors and machines take it as their own; roll-ups follow as usual.
    Mirror(Arc<TwinSnapshot>),
    /// Panic inside the handler, as a bug would (tests of supervision, through
    /// `testing::crash`). Without the `testing` feature nothing sends it; `allow`, not
    /// `expect`: unit tests may build it with the feature off.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    Crash,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TwinError {
    #[error("{asset}: no alarm named {alarm:?} (alarms: {known})")]
    UnknownAlarm {
        asset: AssetPath,
        alarm: String,
        known: String,
    },
    #[error("{asset}: alarm {alarm:?}: {source}")]
    Ack {
        asset: AssetPath,
        alarm: String,
        source: ferrotwin_models::alarm::AckError,
    },
    #[error("{asset}: no rule named {rule:?} (its rules: {known})")]
    UnknownRule {
        asset: AssetPath,
        rule: String,
        known: String,
    },
    #[error("{asset}: a {level} has no alarms")]
    NoAlarms {
        asset: AssetPath,
        level: &'static str,
    },
}

/// An alarm of a machine's sensor changed: what a rule's alarm condition watches.
#[derive(Debug, Clone)]
pub struct SensorAlarm {
    pub sensor: String,
    pub alarm: String,
    pub state: AlarmState,
    pub severity: Severity,
    /// The seq of the event of this change (the rule's trigger).
    pub seq: u64,
    /// Source time of the reading that made it (its acknowledgment's time for an ack).
    pub at: Timestamp,
    /// An operator's acknowledgment (a rule re-armed by acknowledgments re-arms).
    pub acknowledged: bool,
}

/// What became of a rule's action.
#[derive(Debug, Clone)]
pub struct ActionDone {
    pub rule: String,
    pub ok: bool,
    /// What was written (or would have been) and the PLC's answer, or why it failed.
    pub result: String,
}

/// Asks a twin and waits at most `timeout` for the answer.
pub async fn ask<R: Send + 'static>(
    actor: &ActorRef<TwinMsg>,
    msg: impl FnOnce(RpcReplyPort<R>) -> TwinMsg,
    timeout: Duration,
) -> Option<R> {
    match actor.call(msg, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Some(r),
        _ => None,
    }
}
