//! Values, quality and timestamps of live data.

use std::fmt;

/// Microseconds since the Unix epoch, UTC. Every timestamp in ferrotwin is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    /// The wall clock, UTC: the one place in ferrotwin that reads it (the runtime's
    /// `server_ts`, the adapters' and the simulator's arrival times all come from here).
    /// The domain logic in this crate never calls it: time is passed in, so it stays
    /// testable data in, data out (`tests::domain_logic_never_reads_the_clock`).
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    pub fn from_millis(ms: i64) -> Timestamp {
        Timestamp(ms.saturating_mul(1000))
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    pub fn as_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn plus_ms(self, ms: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms.saturating_mul(1000)))
    }

    /// `self - earlier` in milliseconds (negative if `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0) / 1000
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Plain UTC rendering without a date crate: civil-from-days (H. Hinnant).
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = if m <= 2 { y + 1 } else { y };
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60,
            micros / 1000
        )
    }
}

/// Declared value type of a sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    Float,
    Int,
    Bool,
}

impl ValueType {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Float => "float",
            ValueType::Int => "int",
            ValueType::Bool => "bool",
        }
    }
}

/// A live value. Text values are not part of the foundation: PLC tags we model are numeric
/// or boolean, and a fixed-size value keeps a reading allocation-free.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Float(f64),
    Int(i64),
    Bool(bool),
}

impl Value {
    pub fn value_type(self) -> ValueType {
        match self {
            Value::Float(_) => ValueType::Float,
            Value::Int(_) => ValueType::Int,
            Value::Bool(_) => ValueType::Bool,
        }
    }

    /// Numeric view used by alarms, stats and roll-ups (`true` = 1.0).
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Float(v) => v,
            Value::Int(v) => v as f64,
            Value::Bool(b) => f64::from(u8::from(b)),
        }
    }

    pub fn is_finite(self) -> bool {
        match self {
            Value::Float(v) => v.is_finite(),
            _ => true,
        }
    }

    /// Whether a reading of this value may be applied to a sensor declared as `declared`.
    /// Ints are accepted for floats (PLCs send scaled integers); nothing else converts.
    pub fn fits(self, declared: ValueType) -> bool {
        matches!(
            (self, declared),
            (Value::Float(_), ValueType::Float)
                | (Value::Int(_), ValueType::Float)
                | (Value::Int(_), ValueType::Int)
                | (Value::Bool(_), ValueType::Bool)
        )
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Float(v) => {
                if v.abs() >= 1e6 || (v.abs() < 1e-3 && *v != 0.0) {
                    write!(f, "{v:.3e}")
                } else {
                    write!(f, "{v:.3}")
                }
            }
            Value::Int(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// OPC UA style quality, coarse code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QualityCode {
    #[default]
    Good,
    Uncertain,
    Bad,
}

/// Why a value is not Good. A small closed set so a reading stays fixed-size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QualityReason {
    #[default]
    None,
    /// No reading within the sensor's expected period × N.
    Stale,
    /// The source reported a sensor failure.
    SensorFailure,
    /// The link to the PLC is down; the value is the last known one.
    CommFailure,
    /// The value lies outside the declared range.
    OutOfRange,
    /// The twin has not received a value yet.
    NoData,
    /// The device or tag configuration is wrong.
    ConfigError,
}

impl QualityReason {
    pub fn as_str(self) -> &'static str {
        match self {
            QualityReason::None => "",
            QualityReason::Stale => "stale",
            QualityReason::SensorFailure => "sensor failure",
            QualityReason::CommFailure => "communication failure",
            QualityReason::OutOfRange => "out of range",
            QualityReason::NoData => "no data",
            QualityReason::ConfigError => "configuration error",
        }
    }

    pub fn parse(s: &str) -> QualityReason {
        match s {
            "stale" => QualityReason::Stale,
            "sensor failure" => QualityReason::SensorFailure,
            "communication failure" => QualityReason::CommFailure,
            "out of range" => QualityReason::OutOfRange,
            "no data" => QualityReason::NoData,
            "configuration error" => QualityReason::ConfigError,
            _ => QualityReason::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Quality {
    pub code: QualityCode,
    pub reason: QualityReason,
}

impl Quality {
    pub const GOOD: Quality = Quality {
        code: QualityCode::Good,
        reason: QualityReason::None,
    };

    pub fn uncertain(reason: QualityReason) -> Quality {
        Quality {
            code: QualityCode::Uncertain,
            reason,
        }
    }

    pub fn bad(reason: QualityReason) -> Quality {
        Quality {
            code: QualityCode::Bad,
            reason,
        }
    }

    pub fn is_good(self) -> bool {
        self.code == QualityCode::Good
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            QualityCode::Good => "good",
            QualityCode::Uncertain => "uncertain",
            QualityCode::Bad => "bad",
        };
        if self.reason == QualityReason::None {
            f.write_str(code)
        } else {
            write!(f, "{code} ({})", self.reason.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_utc_timestamps() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp::from_millis(1_764_074_096_123).to_string(),
            "2025-11-25T12:34:56.123Z"
        );
    }

    #[test]
    fn ints_fit_floats_but_bools_do_not() {
        assert!(Value::Int(3).fits(ValueType::Float));
        assert!(!Value::Bool(true).fits(ValueType::Float));
        assert!(!Value::Float(1.0).fits(ValueType::Int));
        assert!(!Value::Float(f64::NAN).is_finite());
    }

    /// `Timestamp::now` exists for the crates above; nothing in this crate may call it.
    #[test]
    fn domain_logic_never_reads_the_clock() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        let mut dirs = vec![src];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("src is readable") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source is utf-8");
                // Tests may read the clock (this one names it).
                let code_part = text.split("#[cfg(test)]").next().unwrap_or("");
                for (i, line) in code_part.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    let reads = ["Timestamp::now", "SystemTime::now", "Instant::now"];
                    if reads.iter().any(|r| code.contains(r)) && !code.contains("fn now()") {
                        offenders.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        }
        // The definition itself reads SystemTime once.
        offenders.retain(|o| !o.contains("let d = std::time::SystemTime::now()"));
        assert!(
            offenders.is_empty(),
            "the domain reads the clock:\n{}",
            offenders.join("\n")
        );
    }
}
