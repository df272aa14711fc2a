//! Connection configs that point the adapters at a simulated plant (`ferrotwin_sim::serve::
//! ServedPlant`): what the demo and the end-to-end tests use, and an example of each
//! protocol's config. Each function takes a filter on line paths, so lines can be split
//! between protocols.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_adapters::modbus::ModbusConfig;
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_sim::mapping::Mapping;
use ferrotwin_sim::serve::ServedPlant;

/// A connection's name from a line path: `berlin-assembly-line-1` (site, area, line).
pub fn line_connection_name(line: &str) -> String {
    line.split('/').skip(1).collect::<Vec<_>>().join("-")
}

/// One Modbus connection per selected line, from the simulator's register map, polled every
/// `poll_interval_ms`.
pub fn modbus_connections(
    spec: &PlantSpec,
    plant: &ServedPlant,
    poll_interval_ms: u64,
    lines: impl Fn(&str) -> bool,
) -> Result<Vec<ConnectionConfig>> {
    let mapping = Mapping::of(spec)?;
    mapping
        .lines
        .iter()
        .zip(plant.lines())
        .filter(|(l, _)| lines(&l.line))
        .map(|(l, served)| {
            // The mapping of this line only: each connection parses what it needs, not the
            // whole plant's map once per line.
            let text = Mapping {
                version: mapping.version,
                lines: vec![l.clone()],
            }
            .to_toml();
            let mut c = ModbusConfig::from_sim_mapping(
                &line_connection_name(&l.line),
                &served.addr.to_string(),
                &text,
                &l.line,
            )
            .with_context(|| format!("mapping of {}", l.line))?;
            c.poll_interval_ms = poll_interval_ms;
            Ok(ConnectionConfig::Modbus(c))
        })
        .collect()
}

/// One Sparkplug B connection per group (site) with the selected lines' edge nodes, every
/// device listed (so that their setpoints can be written).
pub fn sparkplug_connections(
    plant: &ServedPlant,
    broker: SocketAddr,
    lines: impl Fn(&str) -> bool,
) -> Result<Vec<ConnectionConfig>> {
    let layout = plant
        .sparkplug_layout()
        .context("the simulator does not publish Sparkplug B")?;
    let mut groups: Vec<(String, String)> = Vec::new();
    for n in layout.nodes.iter().filter(|n| lines(n.line.as_str())) {
        let devices: Vec<String> = n.devices.iter().map(|d| format!("{:?}", d.id)).collect();
        let node = format!(
            "[[format.nodes]]\nnode = {:?}\nline = {:?}\ndevices = [{}]\n",
            n.id,
            n.line.as_str(),
            devices.join(", ")
        );
        match groups.iter_mut().find(|(g, _)| *g == n.group) {
            Some((_, nodes)) => nodes.push_str(&node),
            None => groups.push((n.group.clone(), node)),
        }
    }
    groups
        .into_iter()
        .map(|(group, nodes)| {
            let text = format!(
                "protocol = \"mqtt\"\nname = \"{group}-sparkplug\"\nbroker = \"{broker}\"\n\
                 [format]\ntype = \"sparkplug\"\ngroup_id = \"{group}\"\n\
                 writable_metrics = [\"speed_setpoint_pct\"]\n{nodes}"
            );
            toml::from_str::<ConnectionConfig>(&text)
                .with_context(|| format!("sparkplug connection of group {group}"))
        })
        .collect()
}

/// One JSON connection for the selected lines: topics are asset paths, and each machine's
/// speed setpoint is writable on `<machine>/set/speed_setpoint_pct`.
pub fn json_connection(
    name: &str,
    spec: &PlantSpec,
    broker: SocketAddr,
    lines: impl Fn(&str) -> bool,
) -> Result<ConnectionConfig> {
    let mut prefixes = Vec::new();
    let mut tags = String::new();
    for a in spec.assets() {
        let Some(line) = a.path.parent() else {
            continue;
        };
        match a.kind {
            ferrotwin_models::spec::AssetKind::Line { .. } if lines(a.path.as_str()) => {
                prefixes.push(format!("{:?}", a.path.as_str()));
            }
            ferrotwin_models::spec::AssetKind::Machine { .. } if lines(line.as_str()) => {
                tags.push_str(&format!(
                    "[[format.tags]]\nasset = {:?}\nproperty = \"speed_setpoint_pct\"\nwritable = true\n",
                    a.path.as_str()
                ));
            }
            _ => {}
        }
    }
    let text = format!(
        "protocol = \"mqtt\"\nname = \"{name}\"\nbroker = \"{broker}\"\n[format]\n\
         type = \"json\"\ntopic_prefixes = [{}]\n{tags}",
        prefixes.join(", ")
    );
    toml::from_str::<ConnectionConfig>(&text).with_context(|| format!("json connection {name}"))
}

/// One OPC UA connection per site server, subscribing to every reading of the selected
/// lines' machines and sensors by their path-shaped node ids, each machine's speed setpoint
/// writable.
pub fn opcua_connections(
    spec: &PlantSpec,
    plant: &ServedPlant,
    lines: impl Fn(&str) -> bool,
) -> Result<Vec<ConnectionConfig>> {
    use ferrotwin_models::spec::AssetKind;
    let servers = plant
        .opcua()
        .context("the simulator does not serve OPC UA (serve_opcua)")?;
    let assets = spec.assets();
    let mut out = Vec::new();
    for s in servers.sites() {
        let mut tags = String::new();
        for a in &assets {
            let Some(line) = a.path.parent() else {
                continue;
            };
            let in_site = a.path.as_str().starts_with(&format!("{}/", s.site));
            let mut tag = |property: &str, writable: bool| {
                tags.push_str(&format!(
                    "[[tags]]\nnode_id = \"ns=2;s={}/{property}\"\nasset = {:?}\nproperty = \"{property}\"\nwritable = {writable}\n",
                    a.path.as_str(),
                    a.path.as_str()
                ));
            };
            match &a.kind {
                AssetKind::Machine { .. } if in_site && lines(line.as_str()) => {
                    for p in ["state", "good_count", "scrap_count"] {
                        tag(p, false);
                    }
                    tag("speed_setpoint_pct", true);
                }
                AssetKind::Sensor { .. }
                    if in_site && line.parent().is_some_and(|l| lines(l.as_str())) =>
                {
                    tag("value", false);
                }
                _ => {}
            }
        }
        if tags.is_empty() {
            continue;
        }
        let name = format!(
            "{}-opcua",
            s.site.split('/').skip(1).collect::<Vec<_>>().join("-")
        );
        let text = format!(
            "protocol = \"opcua\"\nname = \"{name}\"\nendpoint = {:?}\n\
             security_policy = \"none\"\npublishing_interval_ms = 100\nsampling_interval_ms = 100\n{tags}",
            s.endpoint
        );
        out.push(
            toml::from_str::<ConnectionConfig>(&text)
                .with_context(|| format!("opcua connection of {}", s.site))?,
        );
    }
    Ok(out)
}
