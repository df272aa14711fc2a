//! Protobuf enums as the words people read: the proto enum's name without its type prefix,
//! lowercase (`LEVEL_SENSOR` → `"sensor"`). The HTTP API's JSON and the CLI client print
//! these; an unknown number reads as `"unspecified"`.

use ferrotwin_proto::v1 as pb;

/// `"LEVEL_SENSOR"` → `"sensor"`: the proto enum's name without its type prefix.
fn enum_str(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

pub fn level(v: i32) -> String {
    enum_str(
        pb::Level::try_from(v).unwrap_or_default().as_str_name(),
        "LEVEL_",
    )
}

pub fn quality_code(v: i32) -> String {
    enum_str(
        pb::QualityCode::try_from(v)
            .unwrap_or_default()
            .as_str_name(),
        "QUALITY_CODE_",
    )
}

pub fn severity(v: i32) -> String {
    enum_str(
        pb::Severity::try_from(v).unwrap_or_default().as_str_name(),
        "SEVERITY_",
    )
}

pub fn alarm_state(v: i32) -> String {
    enum_str(
        pb::AlarmState::try_from(v)
            .unwrap_or_default()
            .as_str_name(),
        "ALARM_STATE_",
    )
}
