//! Fan-out of twin changes and events to watchers (gRPC `Watch`, the benchmark).
//!
//! A bounded broadcast ring: twins never wait for watchers. A watcher that falls more than
//! `capacity` changes behind is told how many it missed and resyncs from a fresh snapshot
//! (the coalesced latest value of every asset it watches).

use std::sync::Arc;

use ferrotwin_models::Event;
use tokio::sync::broadcast;

use crate::registry::TwinEntry;
use crate::twin::TwinSnapshot;

#[derive(Clone)]
pub enum Change {
    Twin(Arc<TwinEntry>, Arc<TwinSnapshot>),
    Event(Arc<Event>),
}

pub struct WatchHub {
    tx: broadcast::Sender<Change>,
}

/// Default ring size: about a second of changes of a 16k-sensor plant at 1 Hz.
pub const WATCH_RING: usize = 16_384;

impl WatchHub {
    pub fn new(capacity: usize) -> WatchHub {
        WatchHub {
            tx: broadcast::Sender::new(capacity.max(16)),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    pub fn twin(&self, entry: Arc<TwinEntry>, snapshot: Arc<TwinSnapshot>) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Change::Twin(entry, snapshot));
        }
    }

    pub fn event(&self, event: Arc<Event>) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Change::Event(event));
        }
    }

    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}
