//! Pushing batches into the sink. The sink never waits; the adapter does: while the runtime
//! pushes back the adapter holds its one batch and stops reading its PLC, so nothing is
//! dropped and nothing piles up.

use std::time::Duration;

use ferrotwin_models::{IngestSink, PushBackReason, Reading};
use tokio_util::sync::CancellationToken;

/// First wait after a `Busy`; doubles up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(100);

/// Why a batch was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDelivered {
    /// The runtime is shutting down.
    SinkClosed,
    /// The adapter was cancelled while waiting.
    Cancelled,
}

/// Pushes `batch`, waiting while the sink is busy.
pub async fn push_batch(
    sink: &dyn IngestSink,
    mut batch: Vec<Reading>,
    token: &CancellationToken,
) -> Result<(), NotDelivered> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut wait = FIRST_RETRY;
    loop {
        match sink.try_push(batch) {
            Ok(()) => return Ok(()),
            Err(back) if back.why == PushBackReason::Closed => {
                return Err(NotDelivered::SinkClosed);
            }
            Err(back) => batch = back.batch,
        }
        tokio::select! {
            () = token.cancelled() => return Err(NotDelivered::Cancelled),
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(MAX_RETRY);
    }
}
