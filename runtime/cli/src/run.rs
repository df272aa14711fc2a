//! `ferrotwin run`: a site or an enterprise from its config file, served until Ctrl-C or
//! SIGTERM (both a clean stop, see `signals`).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use ferrotwin_runtime::Runtime;
use ferrotwin_runtime::config::SiteConfig;

/// What the operator says the config is for; checked against it (a site has no
/// `[enterprise]` section, an enterprise has one).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Site,
    Enterprise,
}

/// The `[telemetry]` section of `config` (the default when the file does not load: `run`
/// then reports why).
pub fn telemetry_config(config: &Path) -> ferrotwin_runtime::telemetry::TelemetryConfig {
    SiteConfig::load(config)
        .map(|c| c.telemetry)
        .unwrap_or_default()
}

/// Loads `config`, starts the runtime, serves gRPC and HTTP (`http_addr` overrides the
/// config's), and stops cleanly at Ctrl-C or SIGTERM.
pub async fn run(config: &Path, role: Role, http_addr: Option<SocketAddr>) -> Result<()> {
    let cfg = SiteConfig::load(config)?;
    match (role, cfg.enterprise.is_some()) {
        (Role::Site, true) => anyhow::bail!(
            "{}: has an [enterprise] section: run it with --role enterprise",
            config.display()
        ),
        (Role::Enterprise, false) => anyhow::bail!(
            "{}: an enterprise needs an [enterprise] section listing the sites it accepts",
            config.display()
        ),
        _ => {}
    }
    let spec = cfg.load_plant()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.grpc_addr))?;
    let http_addr = http_addr.unwrap_or(cfg.http_addr);
    let http = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("cannot listen on {http_addr} (http_addr)"))?;
    let rt = Runtime::start(&spec, &cfg.data_dir, cfg.options()).await?;
    let (grpc_at, http_at) = (listener.local_addr()?, http.local_addr()?);
    if let Err(e) = rt.serve_grpc(listener).and_then(|()| rt.serve_http(http)) {
        rt.shutdown().await;
        return Err(e.into());
    }
    let tls = cfg.security.as_ref().is_some_and(|s| s.tls.is_some());
    println!(
        "ferrotwin {}: {} twins, gRPC{} on {grpc_at}, web browser on {}://{http_at}/{}",
        match role {
            Role::Site => "site",
            Role::Enterprise => "enterprise",
        },
        rt.api().twin_count(),
        if tls { " (TLS)" } else { "" },
        if tls { "https" } else { "http" },
        if rt.api().secured() {
            " (sign-in required)"
        } else {
            ""
        },
    );
    let signal = crate::signals::stop_requested().await;
    crate::signals::clean_stop(signal, rt.shutdown(), crate::signals::CLEAN_STOP_LIMIT).await;
    Ok(())
}

/// `ferrotwin check`: loads `config` and its plant spec and starts a runtime of them on a
/// temporary data dir (every check a start makes: plant, connections' tags, replication,
/// security files), then stops it without serving. PLC connections and the replication
/// sender are checked but never started (`RuntimeOptions::check_only`).
pub async fn check(config: &Path) -> Result<()> {
    let cfg = SiteConfig::load(config)?;
    let spec = cfg.load_plant()?;
    let dir = tempfile::tempdir().context("cannot create a temporary data dir")?;
    let mut opts = cfg.options();
    opts.check_only = true;
    let rt = Runtime::start(&spec, dir.path(), opts)
        .await
        .with_context(|| format!("{}: the runtime would not start", config.display()))?;
    println!(
        "{}: ok: {} twins, {} PLC connection(s), role {}",
        config.display(),
        rt.api().twin_count(),
        cfg.connections.len(),
        rt.api().role()
    );
    rt.shutdown().await;
    Ok(())
}
