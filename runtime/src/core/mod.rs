//! The bottom layer of the runtime: plain types every other module shares and none of them
//! owns. A twin's snapshot and a point of history (`snapshot`), the twin message and its
//! errors (`msg`), the twins' settings and clock rules (`settings`), the hot-path counters
//! and the ingest credits (`metrics`). Nothing here imports another module of this crate;
//! the wall clock is `ferrotwin_models::Timestamp::now`, the only one.

pub mod metrics;
pub mod msg;
pub mod settings;
pub mod snapshot;

pub use metrics::{Credits, Metrics};
pub use msg::{ActionDone, SensorAlarm, TwinError, TwinMsg, ask};
pub use settings::{ClockRules, TwinSettings};
pub use snapshot::{
    HistPoint, MachineInference, MachineSnap, SensorSnap, TwinSnapshot, TwinState,
    new_machine_detector, new_sensor_detector,
};

/// The largest length at most `max` that ends `s` on a char boundary (where a bounded
/// message or field is cut).
pub fn char_floor(s: &str, max: usize) -> usize {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cut_never_splits_a_char() {
        assert_eq!(super::char_floor("abc", 10), 3);
        assert_eq!(super::char_floor("aé", 2), 1, "é is two bytes");
        assert_eq!(super::char_floor("aé", 3), 3);
    }
}
