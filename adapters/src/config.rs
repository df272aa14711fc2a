//! One `[[connections]]` entry of the site config, and the tag targets every protocol
//! shares: which asset and property a tag feeds, validated once.

use ferrotwin_models::{AssetPath, Property};
use serde::Deserialize;

/// Longest connection name (it appears in events, metrics and logs).
pub const MAX_NAME_LEN: usize = 64;

/// One connection to a PLC or broker. `protocol` picks the variant; each protocol's struct
/// rejects unknown keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum ConnectionConfig {
    Modbus(crate::modbus::ModbusConfig),
    Mqtt(crate::mqtt::MqttConfig),
    OpcUa(crate::opcua::OpcUaConfig),
}

impl ConnectionConfig {
    pub fn name(&self) -> &str {
        match self {
            ConnectionConfig::Modbus(c) => &c.name,
            ConnectionConfig::Mqtt(c) => &c.name,
            ConnectionConfig::OpcUa(c) => &c.name,
        }
    }

    /// `modbus`, `opcua` or `mqtt` (as in the config's `protocol`).
    pub fn protocol(&self) -> &'static str {
        match self {
            ConnectionConfig::Modbus(_) => "modbus",
            ConnectionConfig::Mqtt(_) => "mqtt",
            ConnectionConfig::OpcUa(_) => "opcua",
        }
    }

    /// Where it connects, for status and events.
    pub fn endpoint(&self) -> String {
        match self {
            ConnectionConfig::Modbus(c) => c.endpoint.clone(),
            ConnectionConfig::Mqtt(c) => c.broker.clone(),
            ConnectionConfig::OpcUa(c) => c.endpoint.clone(),
        }
    }

    /// Makes file paths in the connection relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        match self {
            ConnectionConfig::Modbus(c) => {
                if let Some(f) = &mut c.mapping_file
                    && f.is_relative()
                {
                    *f = base.join(&*f);
                }
            }
            ConnectionConfig::Mqtt(c) => c.resolve_paths(base),
            ConnectionConfig::OpcUa(c) => c.resolve_paths(base),
        }
    }

    /// The validated tags of this connection: every asset path parses, every property is a
    /// reading property or a writable setpoint, no (asset, property) twice.
    pub fn targets(&self) -> Result<Vec<TagTarget>, ConfigError> {
        match self {
            ConnectionConfig::Modbus(c) => c.targets(),
            ConnectionConfig::Mqtt(c) => c.targets(),
            ConnectionConfig::OpcUa(c) => c.targets(),
        }
    }
}

/// Where in a site config's text the first `[[connections]]` entry that does not parse is,
/// and why: `(byte offset, message)`. The offset is the failing tag's table when a tag is
/// at fault, else the connection's. serde's tagged enum (`protocol`) buffers each entry,
/// which loses the position TOML errors carry; this parses each entry on its own to find it
/// again. `None` when every entry parses (the error is elsewhere).
pub fn locate_connection_error(text: &str) -> Option<(usize, String)> {
    use toml::Spanned;
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        connections: Vec<Spanned<toml::Table>>,
    }
    #[derive(Deserialize)]
    struct Tags {
        #[serde(default)]
        tags: Vec<Spanned<toml::Table>>,
        #[serde(default)]
        format: Option<FormatTags>,
    }
    #[derive(Deserialize)]
    struct FormatTags {
        #[serde(default)]
        tags: Vec<Spanned<toml::Table>>,
        #[serde(default)]
        metrics: Vec<Spanned<toml::Table>>,
    }
    #[derive(Deserialize)]
    struct TagsDoc {
        #[serde(default)]
        connections: Vec<Tags>,
    }
    let doc: Doc = toml::from_str(text).ok()?;
    let tags: Option<TagsDoc> = toml::from_str(text).ok();
    for (i, conn) in doc.connections.iter().enumerate() {
        let Err(e) = toml::Value::Table(conn.get_ref().clone()).try_into::<ConnectionConfig>()
        else {
            continue;
        };
        let name = conn
            .get_ref()
            .get("name")
            .and_then(toml::Value::as_str)
            .map_or_else(
                || format!("[[connections]] #{}", i + 1),
                |n| format!("connection {n:?}"),
            );
        let protocol = conn.get_ref().get("protocol").and_then(toml::Value::as_str);
        let mine = tags.as_ref().and_then(|t| t.connections.get(i));
        let tag_error = |list: &[Spanned<toml::Table>], what: &str| {
            list.iter().enumerate().find_map(|(j, t)| {
                let value = toml::Value::Table(t.get_ref().clone());
                let err = match protocol {
                    Some("modbus") => value.try_into::<crate::modbus::ModbusTag>().err(),
                    Some("opcua") => value.try_into::<crate::opcua::OpcUaTag>().err(),
                    Some("mqtt") if what == "metric" => {
                        value.try_into::<crate::mqtt::SparkplugMetric>().err()
                    }
                    Some("mqtt") => value.try_into::<crate::mqtt::JsonTag>().err(),
                    _ => None,
                }?;
                Some((
                    t.span().start,
                    format!("{name}, {what} #{}: {}", j + 1, err.message()),
                ))
            })
        };
        let found = mine.and_then(|m| {
            tag_error(&m.tags, "tag").or_else(|| {
                let f = m.format.as_ref()?;
                tag_error(&f.tags, "tag").or_else(|| tag_error(&f.metrics, "metric"))
            })
        });
        return Some(found.unwrap_or((conn.span().start, format!("{name}: {}", e.message()))));
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("connection {connection:?}: tag {tag}: {what}")]
    Tag {
        connection: String,
        /// The tag's address as the protocol writes it (register, node id, topic).
        tag: String,
        what: String,
    },
    #[error("connection {connection:?}: {what}")]
    Connection { connection: String, what: String },
}

/// What a tag feeds or drives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TagKind {
    /// A reading property of the asset's twin.
    Reading(Property),
    /// A setpoint the PLC holds and the twin does not report (`speed_setpoint_pct`): write
    /// only.
    Setpoint(String),
}

/// A tag's place in the plant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagTarget {
    pub asset: AssetPath,
    pub kind: TagKind,
    pub writable: bool,
}

impl TagTarget {
    /// Validates the asset path and property of the tag at `address` of `connection`.
    pub fn parse(
        connection: &str,
        address: &str,
        asset: &str,
        property: &str,
        writable: bool,
    ) -> Result<TagTarget, ConfigError> {
        let err = |what: String| ConfigError::Tag {
            connection: connection.to_owned(),
            tag: address.to_owned(),
            what,
        };
        let asset = AssetPath::parse(asset).map_err(|e| err(format!("asset {asset:?}: {e}")))?;
        let kind = match Property::parse(property) {
            Some(p) => TagKind::Reading(p),
            None if writable && ferrotwin_models::asset::is_slug(property) => {
                TagKind::Setpoint(property.to_owned())
            }
            None => {
                return Err(err(format!(
                    "property {property:?} is not a reading property ({}) and the tag is not \
                     writable",
                    Property::ALL.map(Property::as_str).join(", ")
                )));
            }
        };
        Ok(TagTarget {
            asset,
            kind,
            writable,
        })
    }

    pub fn property_name(&self) -> &str {
        match &self.kind {
            TagKind::Reading(p) => p.as_str(),
            TagKind::Setpoint(s) => s,
        }
    }

    pub fn reading_property(&self) -> Option<Property> {
        match self.kind {
            TagKind::Reading(p) => Some(p),
            TagKind::Setpoint(_) => None,
        }
    }
}

/// Checks a connection name and that no (asset, property) appears twice among `targets`.
pub fn check_connection(name: &str, targets: &[TagTarget]) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ferrotwin_models::asset::is_slug(name) {
        return Err(ConfigError::Connection {
            connection: name.to_owned(),
            what: format!(
                "name must be a slug ([a-z0-9][a-z0-9_-]*) of at most {MAX_NAME_LEN} characters"
            ),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for t in targets {
        if !seen.insert((&t.asset, t.property_name())) {
            return Err(ConfigError::Connection {
                connection: name.to_owned(),
                what: format!("{} {} is mapped twice", t.asset, t.property_name()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reading_and_setpoint_targets() {
        let t = TagTarget::parse("plc", "hr 1", "acme/s/a/l/m", "state", false).expect("ok");
        assert_eq!(t.kind, TagKind::Reading(Property::State));
        let t = TagTarget::parse("plc", "hr 2", "acme/s/a/l/m", "speed_setpoint_pct", true)
            .expect("ok");
        assert_eq!(t.kind, TagKind::Setpoint("speed_setpoint_pct".into()));
    }

    #[test]
    fn refuses_unknown_read_only_property_naming_connection_and_tag() {
        let e =
            TagTarget::parse("plc", "hr 2", "acme/s/a/l/m", "speed", false).expect_err("refused");
        let msg = e.to_string();
        assert!(msg.contains("\"plc\"") && msg.contains("hr 2") && msg.contains("speed"));
    }

    #[test]
    fn refuses_bad_paths_and_duplicates() {
        assert!(TagTarget::parse("plc", "x", "Acme//", "value", false).is_err());
        let t = TagTarget::parse("plc", "x", "acme/s/a/l/m/t", "value", false).expect("ok");
        let e = check_connection("plc", &[t.clone(), t]).expect_err("refused");
        assert!(e.to_string().contains("mapped twice"));
        assert!(check_connection("Bad Name", &[]).is_err());
    }
}
