//! `ferrotwin-sim serve`: the plant on Modbus TCP. One `modbus::serve_line` server per line on
//! 127.0.0.1 (port chosen by the OS), a simulation stepped in real time whose readings update
//! the register images, and setpoints written by clients applied to the machines.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetId, AssetPath, Reading, Timestamp};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::mapping::{Mapping, MappingError};
use crate::modbus::{LineMapError, LineRegisters, serve_line};
use crate::model::PlantSim;
use crate::run::RUN_START;

/// Wall-clock time between simulation steps: registers are at most this stale.
pub const STEP_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}: cannot read the plant spec", .file.display())]
    ReadPlant {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Plant(#[from] ferrotwin_models::spec::SpecError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    LineMap(#[from] LineMapError),
    #[error("line {line}: cannot bind a Modbus server on 127.0.0.1")]
    Bind {
        line: String,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot write the endpoints", .file.display())]
    WriteEndpoints {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("speed {0} is not a finite number > 0")]
    Speed(f64),
    #[error("a Modbus server stopped accepting connections")]
    ServerEnded {
        #[source]
        source: io::Error,
    },
}

/// One line's PLC being served.
pub struct ServedLine {
    pub line: String,
    pub addr: SocketAddr,
    pub registers: Arc<LineRegisters>,
}

/// A simulated plant with a Modbus server per line. Dropping it stops the servers.
pub struct ModbusPlant {
    sim: PlantSim,
    lines: Vec<ServedLine>,
    /// Which line serves an asset's readings.
    line_of: HashMap<AssetId, usize>,
    readings: Vec<Reading>,
    per_line: Vec<Vec<Reading>>,
    servers: JoinSet<io::Result<()>>,
}

pub fn load_plant(dir: &Path) -> Result<PlantSpec, ServeError> {
    let file = dir.join("plant.toml");
    let text = std::fs::read_to_string(&file).map_err(|source| ServeError::ReadPlant {
        file: file.clone(),
        source,
    })?;
    Ok(PlantSpec::from_toml(&text, &file.display().to_string())?)
}

impl ModbusPlant {
    /// Binds and starts one server per line of `spec` (on a tokio runtime), the simulation at
    /// `RUN_START` with `seed`.
    pub async fn start(spec: &PlantSpec, seed: u64) -> Result<ModbusPlant, ServeError> {
        let mapping = Mapping::of(spec)?;
        let mut lines = Vec::new();
        let mut line_of = HashMap::new();
        let mut servers = JoinSet::new();
        for (i, map) in mapping.lines.iter().enumerate() {
            let registers = Arc::new(LineRegisters::new(map)?);
            for t in &map.tags {
                let id = AssetPath::parse(&t.asset)
                    .expect("LineRegisters::new checked the paths")
                    .id();
                line_of.insert(id, i);
            }
            let listener =
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|source| ServeError::Bind {
                        line: map.line.clone(),
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| ServeError::Bind {
                line: map.line.clone(),
                source,
            })?;
            servers.spawn(serve_line(listener, Arc::clone(&registers)));
            lines.push(ServedLine {
                line: map.line.clone(),
                addr,
                registers,
            });
        }
        let mut plant = ModbusPlant {
            sim: PlantSim::new(spec, seed, RUN_START),
            per_line: (0..lines.len()).map(|_| Vec::new()).collect(),
            lines,
            line_of,
            readings: Vec::new(),
            servers,
        };
        // Initial states and counters into the images before any client reads.
        plant.step_to(RUN_START);
        Ok(plant)
    }

    pub fn lines(&self) -> &[ServedLine] {
        &self.lines
    }

    pub fn sim(&self) -> &PlantSim {
        &self.sim
    }

    /// `endpoints.toml`: the address of each line's server.
    pub fn endpoints_toml(&self) -> String {
        let mut out = String::from("version = 1\n");
        for l in &self.lines {
            let _ = write!(
                out,
                "\n[[modbus]]\nline = {:?}\nendpoint = \"{}\"\n",
                l.line, l.addr
            );
        }
        out
    }

    /// Applies the setpoints clients wrote, advances the simulation to `t` and writes what it
    /// read into the register images. Returns the readings of the step.
    pub fn step_to(&mut self, t: Timestamp) -> &[Reading] {
        for l in &self.lines {
            for w in l.registers.take_setpoint_writes() {
                self.sim.set_speed_pct(w.machine, w.pct);
            }
        }
        self.readings.clear();
        self.sim.step(t, &mut self.readings);
        for r in &self.readings {
            if let Some(&i) = self.line_of.get(&r.asset) {
                self.per_line[i].push(*r);
            }
        }
        for (l, batch) in self.lines.iter().zip(&mut self.per_line) {
            l.registers.update_from(batch);
            batch.clear();
        }
        &self.readings
    }

    /// Steps the simulation every `STEP_INTERVAL`, simulated time running `speed` times as
    /// fast as the wall clock, until `shutdown` completes or a server fails.
    pub async fn run_realtime(
        &mut self,
        speed: f64,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        if !(speed.is_finite() && speed > 0.0) {
            return Err(ServeError::Speed(speed));
        }
        let wall_start = tokio::time::Instant::now();
        let sim_start = self.sim.now();
        let mut tick = tokio::time::interval(STEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                _ = tick.tick() => {
                    let micros = wall_start.elapsed().as_micros() as f64 * speed;
                    self.step_to(Timestamp(sim_start.0.saturating_add(micros as i64)));
                }
                Some(ended) = self.servers.join_next() => {
                    // A server only ends when accepting fails: the PLC is gone.
                    let source = match ended {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => io::Error::other("server ended"),
                        Err(e) => io::Error::other(e),
                    };
                    return Err(ServeError::ServerEnded { source });
                }
            }
        }
    }
}

/// What `ferrotwin-sim serve` does: loads DIR/plant.toml, starts the servers, prints
/// `modbus <line> <addr>` per line and writes the same to DIR/endpoints.toml, runs until
/// `shutdown`.
pub async fn serve(
    plant_dir: &Path,
    speed: f64,
    seed: u64,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(ServeError::Speed(speed));
    }
    let spec = load_plant(plant_dir)?;
    let mut plant = ModbusPlant::start(&spec, seed).await?;
    for l in plant.lines() {
        println!("modbus {} {}", l.line, l.addr);
    }
    let file = plant_dir.join("endpoints.toml");
    std::fs::write(&file, plant.endpoints_toml())
        .map_err(|source| ServeError::WriteEndpoints { file, source })?;
    plant.run_realtime(speed, shutdown).await
}
