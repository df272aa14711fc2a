//! A line's virtual PLC on Modbus TCP: a register image the simulation writes readings into
//! (`LineRegisters`) and a tokio-modbus server answering clients from it (`serve_line`).
//!
//! Served: read coils (0x01), read discrete inputs (0x02), read holding registers (0x03),
//! read input registers (0x04), write single coil (0x05), write single register (0x06), write
//! multiple coils (0x0F), write multiple registers (0x10). Anything else gets
//! `IllegalFunction`; a range past the image `IllegalDataAddress`; a bad quantity, a write to
//! a read-only register or a setpoint out of 0..=200 `IllegalDataValue`. Nothing a client sends can panic the server,
//! and one client's bad request does not affect the others.
//!
//! Layout and word order: see `mapping`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use ferrotwin_models::{AssetId, AssetPath, Property, Reading, Value};
use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

use crate::mapping::{
    DataType, FAULT_ACTIVE, LineMap, MAX_SPEED_PCT, RUN_ENABLE, RegisterKind, SPEED_SETPOINT,
    STATUS, WordOrder,
};
use crate::model::MachineStatus;

/// Most registers one read may ask for (Modbus application protocol, 6.3/6.4).
const MAX_READ_QUANTITY: u16 = 125;
/// Most registers one write-multiple may carry (6.12).
const MAX_WRITE_QUANTITY: u16 = 123;
/// Most coils or discrete inputs one read may ask for (6.1/6.2).
const MAX_READ_BITS: u16 = 2000;
/// Most coils one write-multiple may carry (6.11).
const MAX_WRITE_BITS: u16 = 1968;

#[derive(Debug, thiserror::Error)]
pub enum LineMapError {
    #[error("line {line}: tag {asset:?}: not an asset path")]
    Asset { line: String, asset: String },
    #[error("line {line}: tag {asset:?}: property {property:?} is not served")]
    Property {
        line: String,
        asset: String,
        property: String,
    },
    #[error(
        "line {line}: tag {asset:?} {property}: address {address} is past the line's registers"
    )]
    Address {
        line: String,
        asset: String,
        property: String,
        address: u16,
    },
}

/// Where a reading goes in the image.
#[derive(Debug, Clone, Copy)]
struct Slot {
    register: RegisterKind,
    address: u16,
    data_type: DataType,
    word_order: WordOrder,
}

/// Where a machine's health goes in the image (either may be absent in a hand-written map).
#[derive(Debug, Clone, Copy, Default)]
struct HealthSlots {
    status: Option<(RegisterKind, u16)>,
    fault_active: Option<(RegisterKind, u16)>,
}

/// A run-enable coil a client wrote and the simulation has not applied yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEnableWrite {
    pub machine: AssetId,
    pub enabled: bool,
}

/// A speed setpoint a client wrote and the simulation has not applied yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetpointWrite {
    pub machine: AssetId,
    pub pct: u16,
}

#[derive(Debug)]
struct Image {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
    /// Latest written value per setpoint register: coalesced, so bounded by the number of
    /// machines however fast a client writes.
    pending: BTreeMap<u16, u16>,
    /// Latest written value per run-enable coil, coalesced the same way.
    pending_coils: BTreeMap<u16, bool>,
}

impl Image {
    fn words_mut(&mut self, register: RegisterKind) -> &mut Vec<u16> {
        match register {
            RegisterKind::Holding => &mut self.holding,
            _ => &mut self.input,
        }
    }

    fn bits_mut(&mut self, register: RegisterKind) -> &mut Vec<bool> {
        match register {
            RegisterKind::Coil => &mut self.coils,
            _ => &mut self.discrete,
        }
    }
}

/// The register image of one line's PLC, shared by its server and the simulation.
#[derive(Debug)]
pub struct LineRegisters {
    line: String,
    slots: HashMap<(AssetId, Property), Slot>,
    /// Holding address of each machine's speed setpoint.
    setpoints: HashMap<u16, AssetId>,
    /// Coil address of each machine's run enable.
    run_enables: HashMap<u16, AssetId>,
    health: HashMap<AssetId, HealthSlots>,
    image: Mutex<Image>,
}

fn encode(value: Value, data_type: DataType, order: WordOrder) -> [u16; 2] {
    match data_type {
        DataType::U16 | DataType::Bool => {
            let v = match value {
                Value::Int(n) => n.clamp(0, i64::from(u16::MAX)) as u16,
                other => other.as_f64().clamp(0.0, f64::from(u16::MAX)) as u16,
            };
            [v, 0]
        }
        DataType::U32 => {
            // A PLC counter wraps at 2^32.
            let v = match value {
                Value::Int(n) => n as u32,
                other => other.as_f64() as u32,
            };
            order.split(v)
        }
        DataType::F32 => order.split((value.as_f64() as f32).to_bits()),
    }
}

/// The f32 in two registers, high word first (the mapping's word order).
pub fn decode_f32(words: [u16; 2]) -> f32 {
    f32::from_bits((u32::from(words[0]) << 16) | u32::from(words[1]))
}

/// The u32 in two registers, high word first.
pub fn decode_u32(words: [u16; 2]) -> u32 {
    (u32::from(words[0]) << 16) | u32::from(words[1])
}

impl LineRegisters {
    /// An image sized for `line`, every register 0 except the speed setpoints (100 %).
    pub fn new(line: &LineMap) -> Result<LineRegisters, LineMapError> {
        let mut holding = vec![0u16; line.holding_registers as usize];
        let input = vec![0u16; line.input_registers as usize];
        let mut coils = vec![false; line.coils as usize];
        let discrete = vec![false; line.discrete_inputs as usize];
        let mut slots = HashMap::new();
        let mut setpoints = HashMap::new();
        let mut run_enables = HashMap::new();
        let mut health: HashMap<AssetId, HealthSlots> = HashMap::new();
        for t in &line.tags {
            let asset = AssetPath::parse(&t.asset)
                .map_err(|_| LineMapError::Asset {
                    line: line.line.clone(),
                    asset: t.asset.clone(),
                })?
                .id();
            let len = match t.register {
                RegisterKind::Holding => holding.len(),
                RegisterKind::Input => input.len(),
                RegisterKind::Coil => coils.len(),
                RegisterKind::DiscreteInput => discrete.len(),
            };
            if usize::from(t.address) + usize::from(t.data_type.words()) > len {
                return Err(LineMapError::Address {
                    line: line.line.clone(),
                    asset: t.asset.clone(),
                    property: t.property.clone(),
                    address: t.address,
                });
            }
            if t.property == SPEED_SETPOINT && t.register == RegisterKind::Holding {
                holding[usize::from(t.address)] = 100;
                setpoints.insert(t.address, asset);
                continue;
            }
            if t.property == RUN_ENABLE && t.register == RegisterKind::Coil {
                coils[usize::from(t.address)] = true;
                run_enables.insert(t.address, asset);
                continue;
            }
            if t.property == STATUS && !t.register.is_bit() {
                health.entry(asset).or_default().status = Some((t.register, t.address));
                continue;
            }
            if t.property == FAULT_ACTIVE && t.register.is_bit() {
                health.entry(asset).or_default().fault_active = Some((t.register, t.address));
                continue;
            }
            let Some(property) = Property::parse(&t.property) else {
                return Err(LineMapError::Property {
                    line: line.line.clone(),
                    asset: t.asset.clone(),
                    property: t.property.clone(),
                });
            };
            let slot = Slot {
                register: t.register,
                address: t.address,
                data_type: t.data_type,
                word_order: t.word_order,
            };
            if t.register.is_bit() != (t.data_type == DataType::Bool) {
                return Err(LineMapError::Property {
                    line: line.line.clone(),
                    asset: t.asset.clone(),
                    property: t.property.clone(),
                });
            }
            slots.insert((asset, property), slot);
        }
        Ok(LineRegisters {
            line: line.line.clone(),
            slots,
            setpoints,
            run_enables,
            health,
            image: Mutex::new(Image {
                holding,
                input,
                coils,
                discrete,
                pending: BTreeMap::new(),
                pending_coils: BTreeMap::new(),
            }),
        })
    }

    pub fn line(&self) -> &str {
        &self.line
    }

    fn image(&self) -> MutexGuard<'_, Image> {
        // A panic while holding the lock cannot leave the image half-written in a way that
        // matters (registers are independent words): keep serving.
        self.image.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the readings of this line's assets into the image; readings of other assets
    /// are ignored.
    pub fn update_from(&self, readings: &[Reading]) {
        let mut image = self.image();
        for r in readings {
            let Some(slot) = self.slots.get(&(r.asset, r.property)) else {
                continue;
            };
            let at = usize::from(slot.address);
            if slot.register.is_bit() {
                image.bits_mut(slot.register)[at] = r.value.as_f64() != 0.0;
                continue;
            }
            let words = encode(r.value, slot.data_type, slot.word_order);
            let n = usize::from(slot.data_type.words());
            image.words_mut(slot.register)[at..at + n].copy_from_slice(&words[..n]);
        }
    }

    /// Writes a machine's health into its status word and fault input; other lines'
    /// machines are ignored. Only the low 16 sensor bits fit the word.
    pub fn update_status(&self, status: &MachineStatus) {
        let Some(h) = self.health.get(&status.machine) else {
            return;
        };
        let mut image = self.image();
        if let Some((register, address)) = h.status {
            image.words_mut(register)[usize::from(address)] = status.bad_sensors as u16;
        }
        if let Some((register, address)) = h.fault_active {
            image.bits_mut(register)[usize::from(address)] = status.fault_active;
        }
    }

    /// The run enables written since the last call, the latest per machine, in address order.
    pub fn take_run_enable_writes(&self) -> Vec<RunEnableWrite> {
        let pending = std::mem::take(&mut self.image().pending_coils);
        pending
            .into_iter()
            .map(|(address, enabled)| RunEnableWrite {
                machine: self.run_enables[&address],
                enabled,
            })
            .collect()
    }

    /// The setpoints written since the last call, the latest per machine, in address order.
    pub fn take_setpoint_writes(&self) -> Vec<SetpointWrite> {
        let pending = std::mem::take(&mut self.image().pending);
        pending
            .into_iter()
            .map(|(address, pct)| SetpointWrite {
                machine: self.setpoints[&address],
                pct,
            })
            .collect()
    }

    /// Answers one request from the image.
    pub fn answer(&self, request: &Request<'_>) -> Result<Response, ExceptionCode> {
        match request {
            Request::ReadCoils(address, quantity) => {
                let image = self.image();
                read_bits(&image.coils, *address, *quantity).map(Response::ReadCoils)
            }
            Request::ReadDiscreteInputs(address, quantity) => {
                let image = self.image();
                read_bits(&image.discrete, *address, *quantity).map(Response::ReadDiscreteInputs)
            }
            Request::WriteSingleCoil(address, on) => {
                self.write_coils(*address, &[*on])?;
                Ok(Response::WriteSingleCoil(*address, *on))
            }
            Request::WriteMultipleCoils(address, bits) => {
                if bits.is_empty() || bits.len() > usize::from(MAX_WRITE_BITS) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                self.write_coils(*address, bits)?;
                let quantity = u16::try_from(bits.len()).expect("at most MAX_WRITE_BITS");
                Ok(Response::WriteMultipleCoils(*address, quantity))
            }
            Request::ReadHoldingRegisters(address, quantity) => {
                let image = self.image();
                read(&image.holding, *address, *quantity).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(address, quantity) => {
                let image = self.image();
                read(&image.input, *address, *quantity).map(Response::ReadInputRegisters)
            }
            Request::WriteSingleRegister(address, word) => {
                self.write(*address, &[*word])?;
                Ok(Response::WriteSingleRegister(*address, *word))
            }
            Request::WriteMultipleRegisters(address, words) => {
                if words.is_empty() || words.len() > usize::from(MAX_WRITE_QUANTITY) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                self.write(*address, words)?;
                let quantity = u16::try_from(words.len()).expect("at most MAX_WRITE_QUANTITY");
                Ok(Response::WriteMultipleRegisters(*address, quantity))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    /// All or nothing: every register must exist and be a setpoint, every value in range.
    fn write(&self, address: u16, words: &[u16]) -> Result<(), ExceptionCode> {
        let mut image = self.image();
        let start = usize::from(address);
        if start + words.len() > image.holding.len() {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let writable = (address..)
            .zip(words)
            .all(|(a, w)| self.setpoints.contains_key(&a) && *w <= MAX_SPEED_PCT);
        if !writable {
            return Err(ExceptionCode::IllegalDataValue);
        }
        for (a, w) in (address..).zip(words) {
            image.holding[usize::from(a)] = *w;
            image.pending.insert(a, *w);
        }
        Ok(())
    }
}

impl LineRegisters {
    /// All or nothing, like `write`: every coil must exist and be a run enable.
    fn write_coils(&self, address: u16, bits: &[bool]) -> Result<(), ExceptionCode> {
        let mut image = self.image();
        if usize::from(address) + bits.len() > image.coils.len() {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        if !(address..)
            .take(bits.len())
            .all(|a| self.run_enables.contains_key(&a))
        {
            return Err(ExceptionCode::IllegalDataValue);
        }
        for (a, on) in (address..).zip(bits) {
            image.coils[usize::from(a)] = *on;
            image.pending_coils.insert(a, *on);
        }
        Ok(())
    }
}

fn read_bits(bits: &[bool], address: u16, quantity: u16) -> Result<Vec<bool>, ExceptionCode> {
    if quantity == 0 || quantity > MAX_READ_BITS {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(address);
    bits.get(start..start + usize::from(quantity))
        .map(<[bool]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

fn read(registers: &[u16], address: u16, quantity: u16) -> Result<Vec<u16>, ExceptionCode> {
    if quantity == 0 || quantity > MAX_READ_QUANTITY {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(address);
    let end = start + usize::from(quantity);
    registers
        .get(start..end)
        .map(<[u16]>::to_vec)
        .ok_or(ExceptionCode::IllegalDataAddress)
}

struct LineService {
    registers: Arc<LineRegisters>,
}

impl tokio_modbus::server::Service for LineService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, request: Self::Request) -> Self::Future {
        std::future::ready(self.registers.answer(&request))
    }
}

/// Serves `registers` on `listener` until dropped (dropping it also ends every open
/// connection) or until accepting fails. The unit id is not checked: one PLC per address.
pub async fn serve_line(listener: TcpListener, registers: Arc<LineRegisters>) -> io::Result<()> {
    let server = Server::new(listener);
    let on_connected = |stream, peer| {
        let registers = Arc::clone(&registers);
        async move {
            accept_tcp_connection(stream, peer, |_| {
                Ok(Some(LineService {
                    registers: Arc::clone(&registers),
                }))
            })
        }
    };
    // A connection that fails (a client sending garbage or hanging up) ends alone; the
    // server keeps accepting.
    server.serve(&on_connected, |_err: io::Error| {}).await
}
