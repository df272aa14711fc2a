//! What an adapter reports about itself: link state and counters (read by the runtime's
//! metrics and API) and events (connection changes, per-tag errors, writes), which the
//! runtime records on an asset's event log.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrotwin_models::{AssetPath, Timestamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected yet, or between attempts.
    Connecting,
    Connected,
    /// The link failed; the adapter is waiting to reconnect.
    Disconnected,
    /// The adapter task ended (cancelled).
    Stopped,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Disconnected => "disconnected",
            LinkState::Stopped => "stopped",
        }
    }
}

/// Live counters of one adapter. Updated per batch, read at any time.
#[derive(Debug)]
pub struct AdapterStatus {
    name: String,
    link: Mutex<(LinkState, Option<String>)>,
    /// Values read from the PLC or broker and pushed to the sink.
    pub received: AtomicU64,
    /// Values refused: unmapped tags, unknown devices, malformed payloads, wrong types.
    pub rejected: AtomicU64,
    /// Failed requests or connections.
    pub errors: AtomicU64,
    pub connects: AtomicU64,
    /// Writes the PLC answered, or whose value the device reported back.
    pub writes_ok: AtomicU64,
    /// Writes the broker took and the device did not report back in time (MQTT).
    pub writes_unconfirmed: AtomicU64,
    pub writes_failed: AtomicU64,
    /// Polls that took longer than the poll interval (the next one was skipped, not
    /// bunched up); 0 for protocols that do not poll.
    pub overruns: AtomicU64,
}

/// A copy of an adapter's status at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSnapshot {
    pub name: String,
    pub link: LinkState,
    pub last_error: Option<String>,
    pub received: u64,
    pub rejected: u64,
    pub errors: u64,
    pub connects: u64,
    pub writes_ok: u64,
    pub writes_unconfirmed: u64,
    pub writes_failed: u64,
    pub overruns: u64,
}

impl AdapterStatus {
    pub fn new(name: &str) -> AdapterStatus {
        AdapterStatus {
            name: name.to_owned(),
            link: Mutex::new((LinkState::Connecting, None)),
            received: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            writes_ok: AtomicU64::new(0),
            writes_unconfirmed: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
            overruns: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_link(&self, state: LinkState, error: Option<String>) {
        let mut l = self.link.lock().expect("status lock is never poisoned");
        l.0 = state;
        if error.is_some() {
            l.1 = error;
        }
    }

    pub fn link(&self) -> LinkState {
        self.link.lock().expect("status lock is never poisoned").0
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let (link, last_error) = self
            .link
            .lock()
            .expect("status lock is never poisoned")
            .clone();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatusSnapshot {
            name: self.name.clone(),
            link,
            last_error,
            received: get(&self.received),
            rejected: get(&self.rejected),
            errors: get(&self.errors),
            connects: get(&self.connects),
            writes_ok: get(&self.writes_ok),
            writes_unconfirmed: get(&self.writes_unconfirmed),
            writes_failed: get(&self.writes_failed),
            overruns: get(&self.overruns),
        }
    }
}

/// Something the runtime records as an event.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterEvent {
    pub connection: String,
    /// The asset the event is about; `None`: the connection as a whole (the runtime records
    /// it on the deepest asset that holds all of the connection's tags).
    pub asset: Option<AssetPath>,
    pub at: Timestamp,
    pub kind: AdapterEventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AdapterEventKind {
    Connected {
        endpoint: String,
    },
    Disconnected {
        reason: String,
    },
    /// A tag started failing (a Modbus exception, a bad OPC UA status, a malformed
    /// payload). Sent on the change, not per poll.
    TagFailed {
        tag: String,
        error: String,
    },
    /// A failing tag reads again.
    TagRecovered {
        tag: String,
    },
    /// Values from a source no tag maps (an unknown Sparkplug node, an unmapped topic).
    /// Sent once per source and then at most once a minute with the count.
    Unmapped {
        source: String,
        count: u64,
    },
    /// A write's result: how far it is known to have reached the device, or why it did not.
    Written {
        property: String,
        value: String,
        by: String,
        outcome: Result<crate::write::WriteAck, String>,
    },
}
