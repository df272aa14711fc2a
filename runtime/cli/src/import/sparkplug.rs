//! `ferrotwin import sparkplug mqtt://HOST:PORT --group G --out DIR [--listen SECONDS]`:
//! listens to the group's births (`adapters::births`, asking running nodes for a rebirth)
//! and writes the plant and a site config with one Sparkplug connection whose metrics are
//! mapped one by one. An edge node is a line (its group the area); each device a machine;
//! the node's own metrics a machine named after the node.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use ferrotwin_adapters::births::{Birth, Listen, listen};

use super::{Address, Found, FoundMachine, Mapped, Naming, Plant, Signal, Written, quoted};

/// Where to listen and for how long.
#[derive(Debug, Clone)]
pub struct Source {
    /// `mqtt://HOST:PORT` (or `HOST:PORT`).
    pub broker: String,
    pub group: String,
    pub user: Option<(String, PathBuf)>,
    pub seconds: u64,
}

impl Source {
    fn host_port(&self) -> Result<(String, u16)> {
        let hp = self.broker.strip_prefix("mqtt://").unwrap_or(&self.broker);
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("{}: give the broker as mqtt://HOST:PORT", self.broker))?;
        let port: u16 = port
            .trim_end_matches('/')
            .parse()
            .map_err(|_| anyhow!("{}: port {port:?} is not a port number", self.broker))?;
        if host.is_empty() || port == 0 {
            bail!("{}: give the broker as mqtt://HOST:PORT", self.broker);
        }
        Ok((host.to_string(), port))
    }
}

/// Listens to `source` and writes `out`/plant.toml and `out`/site.toml.
pub async fn import(
    source: &Source,
    naming: &Naming,
    out: &std::path::Path,
    force: bool,
) -> Result<Written> {
    let (host, port) = source.host_port()?;
    let credentials = match &source.user {
        Some((user, file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the password file {}", file.display()))?;
            Some((user.clone(), password.trim_end().to_string()))
        }
        None => None,
    };
    let births = listen(&Listen {
        host: host.clone(),
        port,
        group: source.group.clone(),
        credentials,
        seconds: source.seconds,
    })
    .await
    .map_err(|e| anyhow!("{e}"))?;
    if births.is_empty() {
        bail!(
            "no birth of group {:?} heard within {} s on {host}:{port} (nodes that do not answer a rebirth request must start while the import listens: raise --listen)",
            source.group,
            source.seconds
        );
    }
    let plant = Plant::build(found(&source.group, births), naming)?;
    let name = super::slug(&format!("{}-sparkplug", naming.site));
    let mut connection = format!(
        "[[connections]]\nprotocol = \"mqtt\"\nname = {}\nbroker = {}\n",
        quoted(&name),
        quoted(&format!("{host}:{port}"))
    );
    if let Some((user, file)) = &source.user {
        connection.push_str(&format!(
            "username = {}\npassword_file = {}\n",
            quoted(user),
            quoted(&file.display().to_string())
        ));
    }
    connection.push_str(&format!(
        "[connections.format]\ntype = \"sparkplug\"\ngroup_id = {}\n",
        quoted(&source.group)
    ));
    super::write(
        out,
        force,
        &format!("{} (group {})", source.broker, source.group),
        &plant,
        &connection,
        metric_toml,
    )
}

/// The machines of the births heard in `group`.
pub fn found(group: &str, births: Vec<Birth>) -> Found {
    let mut out = Found {
        by_exception: true,
        ..Found::default()
    };
    out.notes.push(
        "Sparkplug reports by exception: sensors are given an hour's period_ms (a node \
         that dies is told by its NDEATH, which turns its twins Bad)."
            .into(),
    );
    for b in births {
        let machine = b.device.clone().unwrap_or_else(|| b.node.clone());
        let at = match &b.device {
            Some(d) => format!("{}/{d}", b.node),
            None => b.node.clone(),
        };
        let mut signals = Vec::new();
        for m in b.metrics {
            match m.value_type {
                Some(value_type) => signals.push(Signal {
                    name: m.name.clone(),
                    value_type,
                    unit: m.unit.unwrap_or_default(),
                    range: m.range,
                    writable: false,
                    address: Address::Sparkplug {
                        node: b.node.clone(),
                        device: b.device.clone(),
                        metric: m.name,
                    },
                }),
                None => out.skipped.push(format!("{at}/{} ({})", m.name, m.kind)),
            }
        }
        if !signals.is_empty() {
            out.machines.push(FoundMachine {
                within: vec![group.to_string(), b.node.clone()],
                name: machine,
                signals,
            });
        }
    }
    out.notes.push(
        "Sparkplug births do not say which metrics a device accepts in a DCMD: none is \
         imported as writable. To write one, map it as a setpoint of its machine (a machine \
         type's setpoints, writable = true, README: Sparkplug B)."
            .into(),
    );
    out
}

fn metric_toml(t: &Mapped) -> String {
    let Address::Sparkplug {
        node,
        device,
        metric,
    } = &t.address
    else {
        unreachable!("a Sparkplug import maps metrics only")
    };
    let mut s = format!(
        "\n[[connections.format.metrics]]   # {}\nnode = {}\n",
        t.source.replace('\n', " "),
        quoted(node)
    );
    if let Some(d) = device {
        s.push_str(&format!("device = {}\n", quoted(d)));
    }
    s.push_str(&format!(
        "metric = {}\nasset = {}\nproperty = \"{}\"\n",
        quoted(metric),
        quoted(&t.asset),
        t.property
    ));
    s
}
