//! The machine types every generated plant defines: one row per sensor and per alarm, with the
//! field names of the plant spec (`SensorSpec`, `AlarmLimit`), so a row reads like the spec
//! entry it becomes.
//!
//! Every type lists its temperature first: a type truncated by `sensors_per_machine` keeps the
//! sensor the overheating fault needs. Vibration alarms sit at the ISO 10816 class II
//! "unacceptable" boundary (11.2 mm/s RMS), or lower for smaller machines: healthy bearings
//! stay well below it, worn ones cross it.

use ferrotwin_models::Severity;
use ferrotwin_models::alarm::LimitKind::{High, Low};
use ferrotwin_models::spec::SensorKind::{
    Flow, Generic, Power, Pressure, Speed, Temperature, Vibration,
};
use ferrotwin_models::value::ValueType::{Bool, Float, Int};

use super::{AlarmRow, MachineTypeRow, SensorRow};

/// In the order the seed picks from (see `MACHINE_TYPES`).
pub(super) const CATALOGUE: [MachineTypeRow; 5] = [CNC_MILL, PRESS, CONVEYOR, ROBOT_CELL, OVEN];

const CNC_MILL: MachineTypeRow = MachineTypeRow {
    name: "cnc-mill",
    description: "5-axis CNC milling centre",
    ideal_cycle_ms: 45_000.0,
    sensors: &[
        SensorRow { name: "spindle-temp",  kind: Temperature, unit: "degC",  value_type: Float, min: 0.0, max: 150.0,    period_ms: 1000 },
        SensorRow { name: "spindle-speed", kind: Speed,       unit: "rpm",   value_type: Float, min: 0.0, max: 24_000.0, period_ms: 1000 },
        SensorRow { name: "vibration",     kind: Vibration,   unit: "mm/s",  value_type: Float, min: 0.0, max: 50.0,     period_ms: 500 },
        SensorRow { name: "power",         kind: Power,       unit: "kW",    value_type: Float, min: 0.0, max: 40.0,     period_ms: 1000 },
        SensorRow { name: "coolant-flow",  kind: Flow,        unit: "l/min", value_type: Float, min: 0.0, max: 60.0,     period_ms: 1000 },
    ],
    alarms: &[
        AlarmRow { sensor: "spindle-temp", name: "high", kind: High, limit: 85.0, deadband: 2.0, on_delay_ms: 2000, severity: Severity::High },
        AlarmRow { sensor: "vibration",    name: "high", kind: High, limit: 11.2, deadband: 0.5, on_delay_ms: 5000, severity: Severity::High },
        AlarmRow { sensor: "coolant-flow", name: "low",  kind: Low,  limit: 8.0,  deadband: 1.0, on_delay_ms: 3000, severity: Severity::Medium },
    ],
};

const PRESS: MachineTypeRow = MachineTypeRow {
    name: "press",
    description: "hydraulic stamping press",
    ideal_cycle_ms: 4_000.0,
    sensors: &[
        SensorRow { name: "oil-temp",           kind: Temperature, unit: "degC",  value_type: Float, min: 0.0, max: 120.0, period_ms: 1000 },
        SensorRow { name: "hydraulic-pressure", kind: Pressure,    unit: "bar",   value_type: Float, min: 0.0, max: 350.0, period_ms: 1000 },
        SensorRow { name: "vibration",          kind: Vibration,   unit: "mm/s",  value_type: Float, min: 0.0, max: 50.0,  period_ms: 500 },
        SensorRow { name: "power",              kind: Power,       unit: "kW",    value_type: Float, min: 0.0, max: 150.0, period_ms: 1000 },
        SensorRow { name: "stroke-rate",        kind: Speed,       unit: "1/min", value_type: Float, min: 0.0, max: 30.0,  period_ms: 1000 },
    ],
    alarms: &[
        AlarmRow { sensor: "oil-temp",           name: "high", kind: High, limit: 70.0,  deadband: 2.0, on_delay_ms: 2000, severity: Severity::High },
        AlarmRow { sensor: "hydraulic-pressure", name: "high", kind: High, limit: 300.0, deadband: 5.0, on_delay_ms: 1000, severity: Severity::Critical },
        AlarmRow { sensor: "hydraulic-pressure", name: "low",  kind: Low,  limit: 120.0, deadband: 5.0, on_delay_ms: 2000, severity: Severity::High },
        AlarmRow { sensor: "vibration",          name: "high", kind: High, limit: 11.2,  deadband: 0.5, on_delay_ms: 5000, severity: Severity::High },
    ],
};

const CONVEYOR: MachineTypeRow = MachineTypeRow {
    name: "conveyor",
    description: "belt conveyor",
    ideal_cycle_ms: 1_500.0,
    sensors: &[
        SensorRow { name: "motor-temp",    kind: Temperature, unit: "degC",  value_type: Float, min: 0.0, max: 130.0, period_ms: 1000 },
        SensorRow { name: "belt-speed",    kind: Speed,       unit: "m/min", value_type: Float, min: 0.0, max: 60.0,  period_ms: 1000 },
        SensorRow { name: "vibration",     kind: Vibration,   unit: "mm/s",  value_type: Float, min: 0.0, max: 50.0,  period_ms: 500 },
        SensorRow { name: "parts-on-belt", kind: Generic,     unit: "",      value_type: Int,   min: 0.0, max: 40.0,  period_ms: 1000 },
    ],
    alarms: &[
        AlarmRow { sensor: "motor-temp", name: "high", kind: High, limit: 95.0, deadband: 2.0, on_delay_ms: 2000, severity: Severity::Medium },
        AlarmRow { sensor: "vibration",  name: "high", kind: High, limit: 7.1,  deadband: 0.5, on_delay_ms: 5000, severity: Severity::High },
    ],
};

const ROBOT_CELL: MachineTypeRow = MachineTypeRow {
    name: "robot-cell",
    description: "6-axis welding robot cell",
    ideal_cycle_ms: 30_000.0,
    sensors: &[
        SensorRow { name: "joint-temp",   kind: Temperature, unit: "degC",  value_type: Float, min: 0.0, max: 120.0, period_ms: 1000 },
        SensorRow { name: "power",        kind: Power,       unit: "kW",    value_type: Float, min: 0.0, max: 20.0,  period_ms: 1000 },
        SensorRow { name: "vibration",    kind: Vibration,   unit: "mm/s",  value_type: Float, min: 0.0, max: 50.0,  period_ms: 500 },
        SensorRow { name: "air-pressure", kind: Pressure,    unit: "bar",   value_type: Float, min: 0.0, max: 10.0,  period_ms: 1000 },
        SensorRow { name: "wire-feed",    kind: Speed,       unit: "m/min", value_type: Float, min: 0.0, max: 20.0,  period_ms: 1000 },
    ],
    alarms: &[
        AlarmRow { sensor: "joint-temp",   name: "high", kind: High, limit: 80.0, deadband: 2.0, on_delay_ms: 2000, severity: Severity::High },
        AlarmRow { sensor: "vibration",    name: "high", kind: High, limit: 4.5,  deadband: 0.5, on_delay_ms: 5000, severity: Severity::High },
        AlarmRow { sensor: "air-pressure", name: "low",  kind: Low,  limit: 4.5,  deadband: 0.2, on_delay_ms: 2000, severity: Severity::Medium },
    ],
};

const OVEN: MachineTypeRow = MachineTypeRow {
    name: "oven",
    description: "convection curing oven",
    ideal_cycle_ms: 60_000.0,
    sensors: &[
        SensorRow { name: "zone-1-temp",  kind: Temperature, unit: "degC", value_type: Float, min: 0.0, max: 300.0,  period_ms: 1000 },
        SensorRow { name: "zone-2-temp",  kind: Temperature, unit: "degC", value_type: Float, min: 0.0, max: 300.0,  period_ms: 1000 },
        SensorRow { name: "fan-speed",    kind: Speed,       unit: "rpm",  value_type: Float, min: 0.0, max: 1800.0, period_ms: 1000 },
        SensorRow { name: "power",        kind: Power,       unit: "kW",   value_type: Float, min: 0.0, max: 80.0,   period_ms: 1000 },
        // A Power-kind bool: on while the oven draws more than half its range.
        SensorRow { name: "heater-on",    kind: Power,       unit: "",     value_type: Bool,  min: 0.0, max: 1.0,    period_ms: 1000 },
        SensorRow { name: "exhaust-flow", kind: Flow,        unit: "m3/h", value_type: Float, min: 0.0, max: 1200.0, period_ms: 1000 },
    ],
    alarms: &[
        AlarmRow { sensor: "zone-1-temp", name: "high", kind: High, limit: 260.0, deadband: 3.0, on_delay_ms: 2000, severity: Severity::Critical },
        AlarmRow { sensor: "zone-2-temp", name: "high", kind: High, limit: 260.0, deadband: 3.0, on_delay_ms: 2000, severity: Severity::Critical },
    ],
};
