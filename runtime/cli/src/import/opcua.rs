//! `ferrotwin import opcua ENDPOINT --out DIR`: browses the server (`adapters::browse`) and
//! writes the plant and the site config with one OPC UA connection. An object that holds
//! variables is a machine; the object above it its line, the one above that its area.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use ferrotwin_adapters::browse::{BrowseLimits, Browsed, browse};
use ferrotwin_adapters::opcua::OpcUaConfig;

use super::{Address, Found, FoundMachine, Mapped, Naming, Plant, Signal, Written, quoted};

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct Source {
    pub endpoint: String,
    /// A user-name token (the password from a file), else anonymous.
    pub user: Option<(String, PathBuf)>,
    pub timeout_ms: u64,
}

impl Source {
    /// The connection both the browse and the written site config use.
    fn connection_toml(&self, name: &str) -> String {
        let mut s = format!(
            "[[connections]]\nprotocol = \"opcua\"\nname = {}\nendpoint = {}\n\
             # No message security: fine on a closed cell network; otherwise basic256sha256\n\
             # with security_mode, client_cert, client_key and pki_dir (README, OPC UA).\n\
             security_policy = \"none\"\ntimeout_ms = {}\n",
            quoted(name),
            quoted(&self.endpoint),
            self.timeout_ms
        );
        if let Some((user, file)) = &self.user {
            s.push_str(&format!(
                "user = {{ name = {}, password_file = {} }}\n",
                quoted(user),
                quoted(&file.display().to_string())
            ));
        }
        s
    }

    fn config(&self) -> Result<OpcUaConfig> {
        toml::from_str(&self.connection_toml("import").replacen(
            "[[connections]]\nprotocol = \"opcua\"\n",
            "",
            1,
        ))
        .map_err(|e| anyhow!("{}: {e}", self.endpoint))
    }
}

/// Browses `source` and writes `out`/plant.toml and `out`/site.toml.
pub async fn import(
    source: &Source,
    naming: &Naming,
    out: &std::path::Path,
    force: bool,
) -> Result<Written> {
    let config = source.config()?;
    let browsed = browse(&config, BrowseLimits::default())
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let plant = Plant::build(found(browsed), naming)?;
    let name = super::slug(&format!("{}-opcua", naming.site));
    super::write(
        out,
        force,
        &source.endpoint,
        &plant,
        &source.connection_toml(&name),
        tag_toml,
    )
}

/// The machines of a browse: every object with variables.
pub fn found(browsed: Browsed) -> Found {
    let mut out = Found {
        notes: browsed.notes,
        ..Found::default()
    };
    for o in browsed.objects {
        let (within, name) = match o.path.split_last() {
            Some((name, within)) => (within.to_vec(), name.clone()),
            None => (Vec::new(), "Objects".to_string()),
        };
        let mut signals = Vec::new();
        for v in o.variables {
            match v.value_type {
                Some(value_type) => signals.push(Signal {
                    name: v.name,
                    value_type,
                    unit: v.unit.unwrap_or_default(),
                    range: v.range,
                    writable: v.writable,
                    address: Address::OpcUa(v.node_id),
                }),
                None => out.skipped.push(format!(
                    "{}/{} ({}, {})",
                    o.path.join("/"),
                    v.name,
                    v.node_id,
                    v.kind
                )),
            }
        }
        if !signals.is_empty() {
            out.machines.push(FoundMachine {
                within,
                name,
                signals,
            });
        }
    }
    out
}

fn tag_toml(t: &Mapped) -> String {
    let Address::OpcUa(node) = &t.address else {
        unreachable!("an OPC UA import maps node ids only")
    };
    let mut s = format!(
        "\n[[connections.tags]]   # {}\nnode_id = {}\nasset = {}\nproperty = \"{}\"\n",
        t.source.replace('\n', " "),
        quoted(node),
        quoted(&t.asset),
        t.property
    );
    if t.writable {
        s.push_str("writable = true\n");
    }
    s
}
