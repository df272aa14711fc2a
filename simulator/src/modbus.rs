//! A line's virtual PLC on Modbus TCP: a register image the simulation writes readings into
//! (`LineRegisters`) and a tokio-modbus server answering clients from it (`serve_line`).
//!
//! Served: read holding registers (0x03), read input registers (0x04), write single register
//! (0x06), write multiple registers (0x10). Anything else gets `IllegalFunction`; a range past
//! the image `IllegalDataAddress`; a bad quantity, a write to a read-only register or a
//! setpoint out of 0..=200 `IllegalDataValue`. Nothing a client sends can panic the server,
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

use crate::mapping::{DataType, LineMap, MAX_SPEED_PCT, RegisterKind, SPEED_SETPOINT};

/// Most registers one read may ask for (Modbus application protocol, 6.3/6.4).
const MAX_READ_QUANTITY: u16 = 125;
/// Most registers one write-multiple may carry (6.12).
const MAX_WRITE_QUANTITY: u16 = 123;

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
    /// Latest written value per setpoint register: coalesced, so bounded by the number of
    /// machines however fast a client writes.
    pending: BTreeMap<u16, u16>,
}

/// The register image of one line's PLC, shared by its server and the simulation.
#[derive(Debug)]
pub struct LineRegisters {
    line: String,
    slots: HashMap<(AssetId, Property), Slot>,
    /// Holding address of each machine's speed setpoint.
    setpoints: HashMap<u16, AssetId>,
    image: Mutex<Image>,
}

fn encode(value: Value, data_type: DataType) -> [u16; 2] {
    match data_type {
        DataType::U16 => {
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
            [(v >> 16) as u16, v as u16]
        }
        DataType::F32 => {
            let bits = (value.as_f64() as f32).to_bits();
            [(bits >> 16) as u16, bits as u16]
        }
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
        let mut slots = HashMap::new();
        let mut setpoints = HashMap::new();
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
            };
            slots.insert((asset, property), slot);
        }
        Ok(LineRegisters {
            line: line.line.clone(),
            slots,
            setpoints,
            image: Mutex::new(Image {
                holding,
                input,
                pending: BTreeMap::new(),
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
            let words = encode(r.value, slot.data_type);
            let regs = match slot.register {
                RegisterKind::Holding => &mut image.holding,
                RegisterKind::Input => &mut image.input,
            };
            let n = usize::from(slot.data_type.words());
            let at = usize::from(slot.address);
            regs[at..at + n].copy_from_slice(&words[..n]);
        }
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
