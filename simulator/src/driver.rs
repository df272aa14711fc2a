//! In-process driver: pushes a `PlantSim`'s readings into an `IngestSink`, in real time for
//! demos or as fast as possible for load tests. Push-back is honoured by waiting and retrying
//! the same batch: nothing is dropped, and no more than one step's readings are ever held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrotwin_models::{IngestSink, PushBack, PushBackReason, Reading, Timestamp};

use crate::model::PlantSim;

/// How long to wait before retrying a batch the sink pushed back as busy.
const BUSY_RETRY: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Readings the sink accepted.
    pub readings: u64,
    pub pushed_batches: u64,
    /// Times the sink answered Busy (each followed by a retry of the same batch).
    pub push_backs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DriveOptions {
    /// Simulated seconds per wall-clock second.
    pub speed: f64,
    /// Wall-clock time between steps.
    pub tick_ms: u64,
    pub max_batch: usize,
    /// Wall-clock run time; `None` runs until stopped or the sink closes.
    pub duration: Option<Duration>,
}

impl Default for DriveOptions {
    fn default() -> DriveOptions {
        DriveOptions {
            speed: 1.0,
            tick_ms: 100,
            max_batch: 4096,
            duration: None,
        }
    }
}

/// Why pushing a step's readings ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    Closed,
    Stopped,
}

/// Pushes `readings` in batches of at most `max_batch`, retrying Busy batches until they are
/// taken. Leaves `readings` empty (its capacity kept for the next step).
pub fn push_all(
    sink: &dyn IngestSink,
    readings: &mut Vec<Reading>,
    max_batch: usize,
    stop: &AtomicBool,
    stats: &mut DriverStats,
) -> Result<(), Halt> {
    let max_batch = max_batch.max(1);
    let result = readings.chunks(max_batch).try_for_each(|chunk| {
        let mut batch = chunk.to_vec();
        loop {
            match sink.try_push(batch) {
                Ok(()) => {
                    stats.pushed_batches += 1;
                    stats.readings += chunk.len() as u64;
                    return Ok(());
                }
                Err(PushBack {
                    why: PushBackReason::Closed,
                    ..
                }) => return Err(Halt::Closed),
                Err(PushBack {
                    batch: back,
                    why: PushBackReason::Busy,
                }) => {
                    stats.push_backs += 1;
                    if stop.load(Ordering::Relaxed) {
                        return Err(Halt::Stopped);
                    }
                    std::thread::sleep(BUSY_RETRY);
                    batch = back;
                }
            }
        }
    });
    readings.clear();
    result
}

fn plus_micros(t: Timestamp, micros: f64) -> Timestamp {
    Timestamp(t.0.saturating_add(micros as i64))
}

/// Runs `sim` in real time scaled by `opts.speed` on the calling thread: simulated time is the
/// sim's time at the call plus elapsed wall time × speed. Steps every `tick_ms` and pushes what
/// each step produced before taking the next, so a slow sink slows the simulation's output
/// (the next step covers more time, bounded by the model's catch-up limit) instead of growing
/// a buffer. Returns when `stop` is set, the sink closes, or after `duration`.
pub fn run_realtime(
    sim: &mut PlantSim,
    sink: &dyn IngestSink,
    opts: &DriveOptions,
    stop: &AtomicBool,
) -> DriverStats {
    let mut stats = DriverStats::default();
    let mut readings = Vec::new();
    let wall_start = Instant::now();
    let sim_start = sim.now();
    let tick = Duration::from_millis(opts.tick_ms.max(1));
    let mut next_tick = wall_start;
    loop {
        if stop.load(Ordering::Relaxed) {
            return stats;
        }
        let mut elapsed = wall_start.elapsed();
        let finished = opts.duration.is_some_and(|d| elapsed >= d);
        if let Some(d) = opts.duration.filter(|_| finished) {
            // The last step ends exactly at the requested duration.
            elapsed = d;
        }
        sim.step(
            plus_micros(sim_start, elapsed.as_micros() as f64 * opts.speed),
            &mut readings,
        );
        if push_all(sink, &mut readings, opts.max_batch, stop, &mut stats).is_err() || finished {
            return stats;
        }
        next_tick += tick;
        let now = Instant::now();
        if next_tick > now {
            std::thread::sleep(next_tick - now);
        } else {
            // Behind (slow sink or step): do not try to catch up tick by tick.
            next_tick = now;
        }
    }
}

/// Steps simulated time from the sim's current time to `until` in steps of `step_ms`, as fast
/// as the sink takes the readings. Returns early if the sink closes.
pub fn run_offline(
    sim: &mut PlantSim,
    sink: &dyn IngestSink,
    until: Timestamp,
    step_ms: u64,
    max_batch: usize,
) -> DriverStats {
    let never = AtomicBool::new(false);
    let mut stats = DriverStats::default();
    let mut readings = Vec::new();
    let step_ms = i64::try_from(step_ms.max(1)).unwrap_or(i64::MAX);
    let mut t = sim.now();
    while t < until {
        t = t.plus_ms(step_ms).min(until);
        sim.step(t, &mut readings);
        if push_all(sink, &mut readings, max_batch, &never, &mut stats).is_err() {
            break;
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use ferrotwin_models::RecordingSink;

    use super::*;
    use crate::generate::{PlantSize, generate};

    const START: Timestamp = Timestamp(1_764_000_000_000_000);

    fn demo_sim(seed: u64) -> PlantSim {
        PlantSim::new(&generate(PlantSize::DEMO, 7), seed, START)
    }

    /// What the sim produces when stepped directly, for comparison.
    fn direct(seed: u64, until: Timestamp, step_ms: i64) -> Vec<Reading> {
        let mut sim = demo_sim(seed);
        let mut out = Vec::new();
        let mut t = START;
        while t < until {
            t = t.plus_ms(step_ms).min(until);
            sim.step(t, &mut out);
        }
        out
    }

    /// Pushes back `busy` times (or closes after `accept` batches), then takes everything.
    struct Grudging {
        busy_left: AtomicUsize,
        close_after: Option<usize>,
        batches: Mutex<Vec<Vec<Reading>>>,
    }

    impl Grudging {
        fn new(busy: usize, close_after: Option<usize>) -> Grudging {
            Grudging {
                busy_left: AtomicUsize::new(busy),
                close_after,
                batches: Mutex::new(Vec::new()),
            }
        }

        fn readings(&self) -> Vec<Reading> {
            self.batches.lock().expect("not poisoned").concat()
        }
    }

    impl IngestSink for Grudging {
        fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
            let mut batches = self.batches.lock().expect("not poisoned");
            if self.close_after.is_some_and(|n| batches.len() >= n) {
                return Err(PushBack {
                    batch,
                    why: PushBackReason::Closed,
                });
            }
            if self.busy_left.load(Ordering::Relaxed) > 0 {
                self.busy_left.fetch_sub(1, Ordering::Relaxed);
                return Err(PushBack {
                    batch,
                    why: PushBackReason::Busy,
                });
            }
            batches.push(batch);
            Ok(())
        }
    }

    #[test]
    fn run_offline_delivers_every_reading_in_bounded_batches() {
        let until = START.plus_ms(120_000);
        let sink = RecordingSink::with_limit(usize::MAX);
        let stats = run_offline(&mut demo_sim(4), &sink, until, 500, 50);
        let got = sink.take();
        assert_eq!(got, direct(4, until, 500));
        assert_eq!(stats.readings, got.len() as u64);
        assert!(stats.pushed_batches >= got.len() as u64 / 50);
        assert_eq!(stats.push_backs, 0);
    }

    #[test]
    fn busy_sink_loses_nothing() {
        let until = START.plus_ms(3_000);
        let sink = Grudging::new(7, None);
        let stats = run_offline(&mut demo_sim(4), &sink, until, 1000, 64);
        assert_eq!(stats.push_backs, 7);
        assert_eq!(sink.readings(), direct(4, until, 1000));
        assert!(
            sink.batches
                .lock()
                .expect("not poisoned")
                .iter()
                .all(|b| b.len() <= 64)
        );
    }

    #[test]
    fn closed_sink_ends_the_run() {
        let sink = Grudging::new(0, Some(3));
        let stats = run_offline(&mut demo_sim(4), &sink, START.plus_ms(3_600_000), 1000, 10);
        assert_eq!(stats.pushed_batches, 3);
        assert_eq!(stats.readings, 30);
    }

    #[test]
    fn realtime_run_covers_duration_times_speed_then_returns() {
        let sink = RecordingSink::with_limit(usize::MAX);
        let opts = DriveOptions {
            // 3 simulated seconds: shorter than the catch-up window, so a stalled test
            // machine cannot change what is emitted.
            speed: 10.0,
            tick_ms: 20,
            duration: Some(Duration::from_millis(300)),
            ..DriveOptions::default()
        };
        let mut sim = demo_sim(4);
        let stats = run_realtime(&mut sim, &sink, &opts, &AtomicBool::new(false));
        assert_eq!(sim.now(), START.plus_ms(3_000));
        let got = sink.take();
        assert_eq!(stats.readings, got.len() as u64);
        assert_eq!(got.len(), direct(4, START.plus_ms(3_000), 1000).len());
    }

    #[test]
    fn realtime_run_returns_when_stopped() {
        let sink = RecordingSink::with_limit(usize::MAX);
        let stop = AtomicBool::new(true);
        let stats = run_realtime(&mut demo_sim(4), &sink, &DriveOptions::default(), &stop);
        assert_eq!(stats, DriverStats::default());
    }
}
