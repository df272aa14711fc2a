//! The command line of `ferrotwin`: every command and its options (clap). `main.rs`
//! dispatches them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ferrotwin_cli::demo;
use ferrotwin_cli::logging::LogFormat;
use ferrotwin_cli::run::Role;

#[derive(Parser)]
#[command(
    name = "ferrotwin",
    version,
    about = "Actor-based digital twin runtime for manufacturing plants"
)]
pub struct Args {
    /// Log lines as text (default) or JSON, one object per line with level, time, target,
    /// message and fields (for a log collector).
    #[arg(
        long,
        global = true,
        env = "FERROTWIN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Args)]
pub struct Remote {
    /// Address of a running ferrotwin gRPC API (`https://…` for TLS).
    #[arg(long, env = "FERROTWIN_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token: a JWT of your identity provider or a service token (`ftk.…`).
    #[arg(long, env = "FERROTWIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA that signs the runtime's certificate (turns TLS on).
    #[arg(long, env = "FERROTWIN_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (mTLS), instead of or besides a token.
    #[arg(long, env = "FERROTWIN_CERT")]
    pub cert: Option<PathBuf>,
    #[arg(long, env = "FERROTWIN_KEY")]
    pub key: Option<PathBuf>,
    /// Name the runtime's certificate must carry (default: the address's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
}

impl Remote {
    pub fn connect(&self) -> ferrotwin_cli::client::Connect {
        ferrotwin_cli::client::Connect {
            addr: self.addr.clone(),
            token: self.token.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            domain: self.tls_domain.clone(),
        }
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Generate a plant, drive it with the simulator and serve it over gRPC.
    Demo {
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_addr: SocketAddr,
        /// The enterprise's web browser and JSON API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// Data directory (default: a temporary one, removed at exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Simulated seconds per second.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long = "for")]
        for_s: Option<u64>,
        /// How the simulator's readings reach the sites.
        #[arg(long, value_enum, default_value = "in-process")]
        via: demo::Via,
        /// TLS on every listener, mTLS replication, a CA and certificates in
        /// DATA_DIR/pki/, and a printed token per role (viewer, operator, engineer, admin).
        #[arg(long)]
        secure: bool,
    },
    /// Run a site or an enterprise from a config file (plant spec, data dir, listen address,
    /// PLC connections, replication).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Checked against the config: a site has no `[enterprise]` section, an enterprise
        /// has one.
        #[arg(long, value_enum, default_value = "site")]
        role: Role,
        /// Web browser, JSON API, /healthz and /metrics (default: the config's `http_addr`,
        /// else 127.0.0.1:8080).
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Check a config file and its plant spec without serving (for CI of plant configs):
    /// everything `run` checks at its start, on a temporary data dir; exits 0 when it would
    /// start, 1 with the reason when not. PLC connections are not contacted.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Discover a plant from a PLC server or an edge node and write DIR/plant.toml and
    /// DIR/site.toml, which `ferrotwin run --config DIR/site.toml` runs as they are.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Show replication: a site's link and outbox, or an enterprise's mirrored sites.
    Replication {
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the asset tree with live values, quality and alarms.
    Tree {
        /// Subtree to print (default: the whole plant).
        #[arg(default_value = "")]
        path: String,
        #[arg(long, default_value_t = 6)]
        depth: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print one twin.
    Get {
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stream changes (and events) under a path.
    Watch {
        #[arg(default_value = "")]
        path: String,
        /// Also print events.
        #[arg(long)]
        events: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Find twins, e.g. `level = sensor and value > 80`.
    Query {
        expr: String,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Rank by a field, highest first (`-FIELD`: lowest first), e.g. `--rank oee`.
        #[arg(long, allow_hyphen_values = true)]
        rank: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a sensor's history.
    History {
        path: String,
        #[arg(default_value = "value")]
        property: String,
        /// Seconds back from now.
        #[arg(long, default_value_t = 900)]
        since: u64,
        #[arg(long, default_value_t = 60)]
        max_points: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the latest events under a path.
    Events {
        #[arg(default_value = "")]
        path: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Acknowledge an alarm of a sensor.
    Ack {
        path: String,
        alarm: String,
        /// Who acknowledges, on a runtime without security (with security: who you signed
        /// in as).
        #[arg(long, default_value = "")]
        by: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Write a setpoint to the PLC, e.g. `write acme/.../press-1 speed_setpoint_pct 120 --by ann`.
    Write {
        path: String,
        property: String,
        /// The value: a number (negative ones too, `-10`), `true` or `false`.
        #[arg(allow_negative_numbers = true)]
        value: String,
        /// Who writes, on a runtime without security (with security: who you signed in as).
        #[arg(long, default_value = "")]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// The plant the runtime runs: version, when and by whom applied (`--show`: its TOML).
    Plant {
        #[arg(long)]
        show: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Local action rules of the machines at and below PATH (default: the whole plant):
    /// mode, state (armed, pending, firing, latched, cooling-down, limited), firings and the
    /// last one's result. `--set RULE=MODE` switches a machine's rule to enabled, dry-run or
    /// disabled.
    Rules {
        path: Option<String>,
        /// `RULE=MODE` on the machine at PATH, e.g. `overheat-stop=dry-run`.
        #[arg(long)]
        set: Option<String>,
        /// Who switches it, on a runtime without security.
        #[arg(long, default_value = "")]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Apply a changed plant spec to a running runtime, without a restart: prints the
    /// changes (a dry run), then applies them against the version that dry run saw.
    Apply {
        /// The whole new plant spec (TOML).
        plant: PathBuf,
        /// A site config whose `[[connections]]` run from now on (unchanged ones keep
        /// running, changed ones restart); without it the running connections stay.
        #[arg(long)]
        site: Option<PathBuf>,
        /// Only print the changes.
        #[arg(long)]
        dry_run: bool,
        /// Apply only if the runtime still runs this version (as an earlier dry run showed).
        #[arg(long)]
        expect_version: Option<u64>,
        /// Who applies, on a runtime without security (with security: who you signed in as).
        #[arg(long, default_value = "")]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Fleet templates at an enterprise: push a site's template, show every site's, roll
    /// one back.
    Fleet {
        #[command(subcommand)]
        what: FleetCmd,
    },
    /// List the site's PLC connections with their state and counters.
    Connections {
        #[command(flatten)]
        remote: Remote,
    },
    /// Who the runtime takes you for, and your grants.
    Whoami {
        #[command(flatten)]
        remote: Remote,
    },
    /// The audit log (admin): list and filter, or `audit verify` its hash chain.
    Audit {
        /// `verify`: walk the hash chain and name the first broken record.
        #[arg(value_parser = ["verify"])]
        verify: Option<String>,
        /// Records after this seq.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Substring of the subject (`user:alice`, `token:scada`).
        #[arg(long, default_value = "")]
        subject: String,
        /// Substring of the action (write, acknowledge, shelve, sign-in, denied).
        #[arg(long, default_value = "")]
        action: String,
        /// Substring of the target (an asset path).
        #[arg(long, default_value = "")]
        target: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make a service token: prints the token (give it to the client) and the argon2 hash
    /// for `[[security.tokens]]` (the runtime keeps only the hash).
    Token {
        /// The token's name (`token:NAME` in grants).
        name: String,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Score local inference against the simulator's ground truth: runs a plant as fast as
    /// possible through a real runtime and prints precision, recall and detection delays.
    Eval {
        /// Directory holding `plant.toml` (default: a generated plant of 12 machines).
        #[arg(long)]
        plant: Option<PathBuf>,
        /// Scenario file (scheduled faults, random fault settings, seed).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Simulation seed (a scenario's own seed wins).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Seed of the generated plant.
        #[arg(long, default_value_t = 7)]
        plant_seed: u64,
        /// Simulated hours.
        #[arg(long, default_value_t = 48.0)]
        hours: f64,
    },
}

#[derive(clap::Subcommand)]
pub enum FleetCmd {
    /// Keep `DIR/plant.toml` (the site's own plant) and `DIR/site.toml` (its
    /// `[[connections]]`, optional) as the site's next template; the site applies it live
    /// now, or on its next connection.
    Push {
        /// The site, e.g. `acme/lyon`.
        #[arg(long)]
        site: String,
        dir: PathBuf,
        #[arg(long, default_value = "")]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Every accepted site: template desired, applied, its error, connected.
    Status {
        #[command(flatten)]
        remote: Remote,
    },
    /// A site's template back to an earlier version (default: the one before the newest).
    Rollback {
        #[arg(long)]
        site: String,
        #[arg(long, default_value_t = 0)]
        to: u64,
        #[arg(long, default_value = "")]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The web browser's targets: first load of the page and the tree, push → SSE latency,
    /// ingest with 0 and N open live clients.
    Http {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        /// Seconds per ingest run (four runs).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Live (SSE) clients, each watching a line.
        #[arg(long, default_value_t = 50)]
        clients: usize,
    },
    /// What the OpenTelemetry export costs: ingest readings/s and WriteProperty latency
    /// with spans exported over OTLP to an in-process collector against no export.
    Telemetry {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        /// Seconds of ingest per round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds of each, alternating off and on.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Share of new traces sampled while the export is on.
        #[arg(long, default_value_t = 0.01)]
        ratio: f64,
        /// Sequential WriteProperty calls per round.
        #[arg(long, default_value_t = 300)]
        writes: usize,
    },
    /// Drive the real ingest path and print readings/s, latency to a watcher, RSS per twin.
    Ingest {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Local inference in every twin: on (the plant spec's default) or off.
        #[arg(long, value_enum, default_value = "on")]
        detectors: OnOff,
    },
    /// Start and stop: a generated plant's start on an empty data dir, its clean stop, its
    /// start from that data dir (restore), and the RSS after each start; each phase in a
    /// process of its own.
    Start {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        /// Rounds of (empty start, stop, restore, stop); medians and every round are printed.
        #[arg(long, default_value_t = 1)]
        runs: u32,
        /// Run one phase in this process on this data dir (what the rounds call).
        #[arg(long, hide = true)]
        phase_dir: Option<std::path::PathBuf>,
    },
    /// Local actions under ingest load: from the reading that completes an alarm to the
    /// simulated Modbus PLC's acknowledgment of the rule's write.
    Actions {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        #[arg(long, default_value_t = 50)]
        firings: u64,
    },
    /// A changed plant applied live to a running plant under a paced load: time until the
    /// new twins are live, the largest gap in an untouched sensor's readings.
    Apply {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        /// Sensors to add (as whole lines of the generated plant).
        #[arg(long, default_value_t = 10_000)]
        add: u64,
        /// Each sensor gets one reading per period.
        #[arg(long, default_value_t = 1_000)]
        period_ms: u64,
        /// Add a sensor to every machine type instead of lines (`--add` is then ignored):
        /// every machine changes.
        #[arg(long)]
        per_type: bool,
    },
    /// A site replicating to an enterprise over loopback gRPC: rate, bytes per reading,
    /// lag, catch-up after an outage.
    Replication {
        #[arg(long, default_value_t = 10_000)]
        sensors: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Cut the link this long after the steady state, then measure the catch-up.
        #[arg(long, default_value_t = 30)]
        outage: u64,
        /// raw, aggregated or state-only.
        #[arg(long, default_value = "aggregated")]
        history: String,
    },
    /// Latency from a value changing in a simulated PLC to a gRPC Watch subscriber, over a
    /// real protocol and adapter.
    Plc {
        #[arg(long, value_enum, default_value = "modbus")]
        via: demo::Via,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Modbus poll interval.
        #[arg(long, default_value_t = 100)]
        poll_ms: u64,
        #[arg(long, default_value_t = 4)]
        lines: u32,
    },
    /// What security costs a call: authorisation with a cached token, and GetTwin over
    /// plaintext without security against TLS with a token.
    Security {
        /// Sequential GetTwin calls per configuration.
        #[arg(long, default_value_t = 20_000)]
        calls: usize,
        /// Concurrent callers in the throughput run, each on its own connection.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Print the RSS in bytes of one idle ractor actor (spawning `count` of them).
    Actors {
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// A negative setpoint is a value, not an option (no `--` needed).
    #[test]
    fn write_takes_a_negative_value() {
        let args = Args::try_parse_from([
            "ferrotwin",
            "write",
            "acme/berlin/a/l/press-1",
            "temp_offset",
            "-10",
            "--by",
            "ann",
        ])
        .expect("parses");
        let Cmd::Write { value, by, .. } = args.cmd else {
            panic!("a write");
        };
        assert_eq!((value.as_str(), by.as_str()), ("-10", "ann"));
    }
}

/// Names and output of an import.
#[derive(clap::Args)]
pub struct ImportOut {
    /// Directory for plant.toml and site.toml (created).
    #[arg(long)]
    pub out: PathBuf,
    /// The plant's enterprise name (a slug is made of it).
    #[arg(long, default_value = "plant")]
    pub enterprise: String,
    /// The site's name.
    #[arg(long, default_value = "site")]
    pub site: String,
    /// Replace plant.toml and site.toml when they exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand)]
pub enum ImportSource {
    /// Browse an OPC UA server: objects holding variables are machines (the object above a
    /// machine its line, the one above that its area), variables their sensors with the
    /// server's EngineeringUnits and EURange; a `Running` bool is the machine's state,
    /// `GoodCount`/`ScrapCount` integers its counters; writable variables stay writable.
    Opcua {
        /// `opc.tcp://HOST:PORT/PATH`
        endpoint: String,
        /// User name (with --password-file), else anonymous.
        #[arg(long, requires = "password_file")]
        user: Option<String>,
        #[arg(long, requires = "user")]
        password_file: Option<PathBuf>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[command(flatten)]
        out: ImportOut,
    },
    /// Read a Modbus PLC's register map, saved as CSV (a PLC cannot be asked what it holds):
    /// a header row, then one row per value with columns Machine (`Area/Line/Machine`),
    /// Name, Register (holding, input, coil, discrete_input), Address (0-based) and
    /// optionally Type, WordOrder, Scale, Offset, Unit, Min, Max, Access (R or RW).
    Modbus {
        /// The register map (CSV).
        map: PathBuf,
        /// The PLC, `HOST:PORT`.
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value_t = 1)]
        unit_id: u8,
        #[arg(long, default_value_t = 1000)]
        poll_interval_ms: u64,
        #[command(flatten)]
        out: ImportOut,
    },
    /// Listen to a Sparkplug B group's births (asking running edge nodes for a rebirth):
    /// each edge node is a line (the group its area), each device a machine, the node's own
    /// metrics a machine named after the node; metrics are sensors, with `engUnit`,
    /// `engLow`, `engHigh` properties as unit and range; a `Running` bool is the state.
    Sparkplug {
        /// `mqtt://HOST:PORT`
        broker: String,
        /// The Sparkplug group id.
        #[arg(long)]
        group: String,
        /// How long to listen for births, in seconds.
        #[arg(long = "listen", default_value_t = 10)]
        listen_s: u64,
        #[arg(long, requires = "password_file")]
        user: Option<String>,
        #[arg(long, requires = "user")]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        out: ImportOut,
    },
}
