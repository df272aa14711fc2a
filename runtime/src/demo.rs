//! `ferrotwin demo`: a generated plant driven in-process by the simulator, served over gRPC,
//! with nothing to install.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ferrotwin_sim::driver::{DriveOptions, run_realtime};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::PlantSim;
use tokio::net::TcpListener;

use crate::runtime::{Runtime, RuntimeOptions};

/// Faults are this many times as frequent as in the simulator's default plant, so that an
/// alarm shows up within a minute or two of starting the demo.
const DEMO_FAULT_RATE: f64 = 20.0;

pub struct DemoOptions {
    pub grpc_addr: SocketAddr,
    /// `None`: a temporary directory, removed at exit.
    pub data_dir: Option<PathBuf>,
    pub seed: u64,
    /// Simulated seconds per second.
    pub speed: f64,
    /// Stop after this long (`None`: until Ctrl-C).
    pub duration: Option<Duration>,
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let spec = generate(PlantSize::DEMO, opts.seed);
    let (dir, _temp) = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("cannot create data dir {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("ferrotwin-demo-")
                .tempdir()
                .context("cannot create a temporary data dir")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let listener = TcpListener::bind(opts.grpc_addr).await.with_context(|| {
        format!(
            "cannot listen on {} (is another demo running? try --grpc-addr 127.0.0.1:0)",
            opts.grpc_addr
        )
    })?;
    let addr = listener.local_addr()?;
    let rt = Runtime::start(&spec, &dir, RuntimeOptions::default()).await?;
    rt.serve_grpc(listener);
    let machines = rt
        .registry
        .all()
        .iter()
        .filter(|e| e.level() == ferrotwin_models::Level::Machine)
        .count();
    println!(
        "ferrotwin demo: {} twins ({machines} machines in {} sites), data in {}",
        rt.registry.len(),
        spec.sites.len(),
        dir.display()
    );
    println!("gRPC API on {addr} (health and reflection included)");
    println!("try (from the repo, `cargo run --release --` in place of `ferrotwin`):");
    println!("  ferrotwin tree --addr {addr}");
    println!("  ferrotwin query --addr {addr} 'level = sensor and alarm = active'");
    println!("  ferrotwin watch --addr {addr} acme/berlin --events");
    println!("  grpcurl -plaintext {addr} list");
    println!("stop with Ctrl-C");

    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let stop = stop.clone();
        let router = rt.router.clone();
        let start = crate::twin::now();
        let drive = DriveOptions {
            speed: opts.speed,
            ..DriveOptions::default()
        };
        let seed = opts.seed;
        std::thread::Builder::new()
            .name("sim-driver".into())
            .spawn(move || {
                let mut sim = PlantSim::with_fault_rate(&spec, seed, start, DEMO_FAULT_RATE);
                run_realtime(&mut sim, router.as_ref(), &drive, &stop)
            })
            .context("cannot start the simulator thread")?
    };
    match opts.duration {
        Some(d) => tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    stop.store(true, Ordering::Release);
    let stats = tokio::task::spawn_blocking(move || driver.join())
        .await
        .context("simulator thread")?
        .map_err(|_| anyhow::anyhow!("simulator thread panicked"))?;
    println!(
        "simulator pushed {} readings in {} batches ({} push-backs); shutting down",
        stats.readings, stats.pushed_batches, stats.push_backs
    );
    rt.shutdown().await;
    Ok(())
}
