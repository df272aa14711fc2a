//! One `[[connections]]` entry of the site config, and the tag targets every protocol
//! shares: which asset and property a tag feeds, validated once.

use ferrotwin_models::{AssetPath, Property};
use serde::Deserialize;

/// Longest connection name (it appears in events, metrics and logs).
pub const MAX_NAME_LEN: usize = 64;

/// One connection to a PLC or broker. `protocol` picks the variant; each protocol's struct
/// rejects unknown keys.
#[derive(Debug, Clone, Deserialize)]
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
            ConnectionConfig::OpcUa(_) => {}
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
