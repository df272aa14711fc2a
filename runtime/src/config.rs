//! The site config file of `ferrotwin run --config FILE`: typed, strict, loaded once.
//!
//! ```toml
//! version = 1
//! plant = "plant.toml"          # relative to this file
//! data_dir = "data"             # relative to this file
//! grpc_addr = "127.0.0.1:50051"
//! http_addr = "127.0.0.1:8080"  # web browser, JSON API, /healthz, /metrics
//! [store]
//! flush_interval_ms = 200
//! [twins]
//! max_future_skew_ms = 5000
//! [ingest]
//! max_inflight_readings = 1048576
//! [security]                    # see `crate::security`; without it, loopback only
//! [telemetry]                   # OTLP export, see `crate::telemetry` (OTEL_* win)
//! otlp_endpoint = "http://collector:4317"
//! ```
//! Environment overrides: `FERROTWIN_GRPC_ADDR`, `FERROTWIN_HTTP_ADDR`, `FERROTWIN_DATA_DIR`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_models::spec::{PlantSpec, SpecError};

use crate::core::TwinSettings;
use crate::replication::{EnterpriseRole, SiteReplication};
use crate::runtime::{IngestOptions, RuntimeOptions};
use crate::security::SecurityConfig;
use crate::store::StoreConfig;
use crate::telemetry::TelemetryConfig;

pub const CONFIG_VERSION: u32 = 1;

fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

pub fn default_http_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub version: u32,
    /// The plant spec file. Left out by a site that takes its plant from its enterprise's
    /// fleet template: it needs `[replication]` with `site`, and starts with that site alone
    /// (or with the plant its data dir recorded).
    #[serde(default)]
    pub plant: Option<PathBuf>,
    pub data_dir: PathBuf,
    #[serde(default = "default_grpc_addr")]
    pub grpc_addr: SocketAddr,
    /// The HTTP server: web browser, JSON API, `/healthz`, `/metrics`.
    #[serde(default = "default_http_addr")]
    pub http_addr: SocketAddr,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub twins: TwinSettings,
    #[serde(default)]
    pub ingest: IngestOptions,
    /// PLC connections (`protocol = "modbus" | "opcua" | "mqtt"`, see the adapters crate).
    #[serde(default)]
    pub connections: Vec<ConnectionConfig>,
    /// Site role: the enterprise this site replicates to (none: the site runs alone).
    #[serde(default)]
    pub replication: Option<SiteReplication>,
    /// Enterprise role: the sites whose replication this runtime accepts.
    #[serde(default)]
    pub enterprise: Option<EnterpriseRole>,
    /// TLS, authentication and grants (`crate::security`). Without it only loopback
    /// listeners start.
    #[serde(default)]
    pub security: Option<SecurityConfig>,
    /// OpenTelemetry export (`crate::telemetry`); the `OTEL_*` variables override it.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `connections` as the file wrote them (canonical TOML).
    #[serde(skip)]
    pub connections_toml: Option<String>,
    /// The folder of the config file.
    #[serde(skip)]
    pub config_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error(
        "{file}: config version {found} is not supported (this build reads version {CONFIG_VERSION})"
    )]
    Version { file: PathBuf, found: u32 },
    #[error("{file}: {var}: {message}")]
    Env {
        file: PathBuf,
        var: &'static str,
        message: String,
    },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: PathBuf,
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl SiteConfig {
    /// Parses, applies environment overrides, resolves relative paths, validates.
    pub fn load(file: &Path) -> Result<SiteConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let mut c: SiteConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            // A `[[connections]]` entry's error carries no position of its own: find it.
            message: match ferrotwin_adapters::config::locate_connection_error(&text) {
                Some((at, why)) => {
                    let line = text[..at.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {why}")
                }
                None => e.to_string(),
            },
        })?;
        if c.version != CONFIG_VERSION {
            return Err(ConfigError::Version {
                file: file.to_path_buf(),
                found: c.version,
            });
        }
        if let Ok(v) = std::env::var("FERROTWIN_GRPC_ADDR") {
            c.grpc_addr = v.parse().map_err(|e| ConfigError::Env {
                file: file.to_path_buf(),
                var: "FERROTWIN_GRPC_ADDR",
                message: format!("{v:?}: {e}"),
            })?;
        }
        if let Ok(v) = std::env::var("FERROTWIN_HTTP_ADDR") {
            c.http_addr = v.parse().map_err(|e| ConfigError::Env {
                file: file.to_path_buf(),
                var: "FERROTWIN_HTTP_ADDR",
                message: format!("{v:?}: {e}"),
            })?;
        }
        if let Ok(v) = std::env::var("FERROTWIN_DATA_DIR") {
            c.data_dir = PathBuf::from(v);
        }
        let base = file.parent().unwrap_or(Path::new("."));
        c.config_dir = Some(base.to_path_buf());
        c.connections_toml = crate::connections::parse_connections(&text, None)
            .ok()
            .map(|(_, t)| t);
        if let Some(p) = &mut c.plant
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
        if c.plant.is_none()
            && c.replication
                .as_ref()
                .and_then(|r| r.site.as_ref())
                .is_none()
        {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                field: "plant",
                message: "name the plant spec file, or (a site that takes its plant from its enterprise) [replication] with site = \"ENTERPRISE/SITE\"".into(),
            });
        }
        if c.data_dir.is_relative() {
            c.data_dir = base.join(&c.data_dir);
        }
        for conn in &mut c.connections {
            conn.resolve_paths(base);
        }
        if let Some(sec) = &mut c.security {
            sec.resolve_paths(base);
            sec.validate().map_err(|message| ConfigError::Invalid {
                file: file.to_path_buf(),
                field: "security",
                message,
            })?;
        }
        if let Some(t) = c.replication.as_mut().and_then(|r| r.tls.as_mut()) {
            t.resolve_paths(base);
        }
        if c.store.flush_interval_ms == 0 {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                field: "store.flush_interval_ms",
                message: "must be > 0".into(),
            });
        }
        if c.replication.is_some() && c.enterprise.is_some() {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                field: "replication",
                message:
                    "a runtime is a site ([replication]) or an enterprise ([enterprise]), not both"
                        .into(),
            });
        }
        c.telemetry.validate().map_err(|e| ConfigError::Invalid {
            file: file.to_path_buf(),
            field: "telemetry",
            message: e.to_string(),
        })?;
        if c.ingest.max_inflight_readings == 0 {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                field: "ingest.max_inflight_readings",
                message: "must be > 0".into(),
            });
        }
        Ok(c)
    }

    pub fn load_plant(&self) -> Result<PlantSpec, ConfigError> {
        let Some(plant) = &self.plant else {
            // A site that takes its plant from its enterprise: its site alone until then.
            let site = self
                .replication
                .as_ref()
                .and_then(|r| r.site.clone())
                .unwrap_or_default();
            let (enterprise, name) = site.split_once('/').unwrap_or(("", &site));
            let text =
                format!("version = 1\nenterprise = {enterprise:?}\n[[sites]]\nname = {name:?}\n");
            return Ok(PlantSpec::from_toml(&text, "replication.site")?);
        };
        let text = std::fs::read_to_string(plant).map_err(|source| ConfigError::Read {
            file: plant.clone(),
            source,
        })?;
        Ok(PlantSpec::from_toml(&text, &plant.display().to_string())?)
    }

    pub fn options(&self) -> RuntimeOptions {
        RuntimeOptions {
            store: self.store.clone(),
            twins: self.twins.clone(),
            ingest: self.ingest.clone(),
            connections: self.connections.clone(),
            replication: self.replication.clone(),
            enterprise: self.enterprise.clone(),
            security: self.security.clone(),
            plant_dir: self
                .plant
                .as_ref()
                .and_then(|p| p.parent())
                .map(std::path::Path::to_path_buf)
                .or_else(|| self.config_dir.clone()),
            check_only: false,
            connections_toml: self.connections_toml.clone(),
            config_dir: self.config_dir.clone(),
            plant_from_enterprise: self.plant.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_fails_at_load_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("site.toml");
        std::fs::write(
            &f,
            "version = 1\nplant = \"p.toml\"\ndata_dir = \"d\"\n[store]\nflush_intervall_ms = 5\n",
        )
        .expect("write");
        let err = SiteConfig::load(&f).expect_err("typo");
        let msg = err.to_string();
        assert!(
            msg.contains("site.toml") && msg.contains("flush_intervall_ms"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_tag_is_reported_at_its_own_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("site.toml");
        let head = "version = 1\nplant = \"p.toml\"\ndata_dir = \"d\"\n";
        let conn = |name: &str, data_type: &str| {
            format!(
                "\n[[connections]]\nprotocol = \"modbus\"\nname = \"{name}\"\nendpoint = \"127.0.0.1:502\"\n\
                 [[connections.tags]]\nasset = \"acme/a/b/c/d/e\"\nproperty = \"value\"\nregister = \"holding\"\naddress = 1\ndata_type = \"u16\"\n\
                 [[connections.tags]]\nasset = \"acme/a/b/c/d/f\"\nproperty = \"value\"\nregister = \"holding\"\naddress = 3\ndata_type = \"{data_type}\"\n"
            )
        };
        // The second tag of the second connection, at line 32.
        let text = format!("{head}{}{}", conn("one", "u16"), conn("two", "float32"));
        assert_eq!(text.lines().nth(31), Some("[[connections.tags]]"), "{text}");
        std::fs::write(&f, text).expect("write");
        let msg = SiteConfig::load(&f).expect_err("float32").to_string();
        assert!(
            msg.contains("line 32: connection \"two\", tag #2: unknown variant `float32`, expected one of `u16`"),
            "{msg}"
        );
        // A connection's own key: at the connection.
        let text = format!(
            "{head}{}",
            conn("one", "u16").replace("endpoint", "endpiont")
        );
        std::fs::write(&f, text).expect("write");
        let msg = SiteConfig::load(&f).expect_err("typo").to_string();
        assert!(
            msg.contains("line 5: connection \"one\": unknown field `endpiont`"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_mqtt_tag_or_metric_or_opcua_tag_is_reported_at_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("site.toml");
        let head = "version = 1\nplant = \"p.toml\"\ndata_dir = \"d\"\n";
        for (body, line, says) in [
            (
                "[[connections]]\nprotocol = \"mqtt\"\nname = \"mq\"\nbroker = \"127.0.0.1:1883\"\n\
                 [connections.format]\ntype = \"json\"\n\
                 [[connections.format.tags]]\ntopic = \"a/b\"\nasset = \"acme/a/b/c/d/e\"\nproperty = \"value\"\nwritable = \"yes\"\n",
                10,
                "connection \"mq\", tag #1: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "[[connections]]\nprotocol = \"mqtt\"\nname = \"sp\"\nbroker = \"127.0.0.1:1883\"\n\
                 [connections.format]\ntype = \"sparkplug\"\ngroup_id = \"G\"\n\
                 [[connections.format.metrics]]\nnode = \"N\"\nmetric = \"T\"\nasset = \"acme/a/b/c/d/e\"\n\
                 [[connections.format.metrics]]\nnode = \"N\"\nmetrik = \"U\"\nasset = \"acme/a/b/c/d/f\"\n",
                15,
                "connection \"sp\", metric #2: unknown field `metrik`",
            ),
            (
                "[[connections]]\nprotocol = \"opcua\"\nname = \"ua\"\nendpoint = \"opc.tcp://h:4840/\"\n\
                 [[connections.tags]]\nnode = \"ns=2;s=x\"\nasset = \"acme/a/b/c/d/e\"\n",
                8,
                "connection \"ua\", tag #1: unknown field `node`",
            ),
        ] {
            std::fs::write(&f, format!("{head}{body}")).expect("write");
            let msg = SiteConfig::load(&f).expect_err(says).to_string();
            assert!(
                msg.contains(&format!("line {line}: {says}")),
                "{says}: {msg}"
            );
        }
        // An error outside the connections keeps TOML's own message and position.
        std::fs::write(&f, format!("{head}[store]\nflush_intervall_ms = 5\n")).expect("write");
        let msg = SiteConfig::load(&f).expect_err("typo").to_string();
        assert!(
            msg.contains("flush_intervall_ms") && msg.contains("line 5"),
            "{msg}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("site.toml");
        std::fs::write(&f, "version = 1\nplant = \"p.toml\"\ndata_dir = \"d\"\n").expect("write");
        let c = SiteConfig::load(&f).expect("valid");
        assert_eq!(c.plant, Some(dir.path().join("p.toml")));
        assert_eq!(c.grpc_addr, default_grpc_addr());
        // The connections' files too: certificates, keys, PKI folder, password files.
        std::fs::write(
            &f,
            r#"version = 1
plant = "p.toml"
data_dir = "d"
[[connections]]
protocol = "opcua"
name = "ua"
endpoint = "opc.tcp://127.0.0.1:4840/"
security_policy = "basic256sha256"
security_mode = "sign"
client_cert = "own/cert.der"
client_key = "/abs/key.pem"
pki_dir = "pki"
user = { name = "ft", password_file = "secrets/ua" }
[[connections]]
protocol = "mqtt"
name = "mq"
broker = "127.0.0.1:1883"
username = "ft"
password_file = "secrets/mqtt"
tls = { ca = "ca.pem" }
[connections.format]
type = "json"
topic_prefixes = ["acme"]
"#,
        )
        .expect("write");
        let c = SiteConfig::load(&f).expect("valid");
        let d = dir.path();
        let ConnectionConfig::OpcUa(ua) = &c.connections[0] else {
            panic!("opcua first")
        };
        // Under pki_dir, as async-opcua reads it.
        assert_eq!(
            ua.client_cert.as_deref(),
            Some(std::path::Path::new("own/cert.der"))
        );
        assert_eq!(
            ua.client_key.as_deref(),
            Some(std::path::Path::new("/abs/key.pem"))
        );
        assert_eq!(ua.pki_dir.as_deref(), Some(d.join("pki").as_path()));
        let user = ua.user.as_ref().expect("a user");
        assert_eq!(
            user.password_file.as_deref(),
            Some(d.join("secrets/ua").as_path())
        );
        let ConnectionConfig::Mqtt(mq) = &c.connections[1] else {
            panic!("mqtt second")
        };
        assert_eq!(
            mq.password_file.as_deref(),
            Some(d.join("secrets/mqtt").as_path())
        );
        assert_eq!(
            mq.tls.as_ref().map(|t| t.ca.clone()),
            Some(d.join("ca.pem"))
        );
    }

    /// A site that takes its plant from its enterprise names no plant file: it starts with
    /// its site alone; a config with neither is refused naming both ways.
    #[test]
    fn a_site_without_a_plant_file_starts_with_its_site_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("site.toml");
        std::fs::write(
            &f,
            "version = 1\ndata_dir = \"d\"\n[replication]\nenterprise = \"http://127.0.0.1:1\"\nsite = \"acme/lyon\"\n",
        )
        .expect("write");
        let c = SiteConfig::load(&f).expect("loads");
        let p = c.load_plant().expect("a bare plant");
        assert_eq!((p.enterprise.as_str(), p.sites.len()), ("acme", 1));
        assert_eq!(p.sites[0].name, "lyon");
        assert!(p.sites[0].areas.is_empty());
        std::fs::write(&f, "version = 1\ndata_dir = \"d\"\n").expect("write");
        let err = SiteConfig::load(&f).expect_err("no plant").to_string();
        assert!(
            err.contains("plant") && err.contains("replication"),
            "{err}"
        );
    }
}
