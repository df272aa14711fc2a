"""A plant's PLC written by other people (pymodbus Modbus TCP server), with naming unlike
ours; its register map, as the vendor hands it over, is pymodbus_plant.csv next to it.
Addresses are 0-based protocol addresses; every register is big-endian bytes.

Packaging/Line 3/Wrapper_A   (Wrapper_B: every address +1000, values in brackets)
  FilmTension    holding 100-101   f32 low word first, N        123.5   [98.25]
  MotorCurrent   input 10          i16 x0.1 A, raw              157     [203]
  Running        discrete input 0  bool                         1       [0]
  GoodCount      input 20-21       u32 high word first, +1 every 500 ms from 70000 [5]
  RejectCount    input 22          u16                          12      [0]
  SpeedSetpoint  holding 200       u16 ppm 0..300, writable     180     [150]
  Enable         coil 0            writable                     1       [1]
Boiler House/Boiler 1/Boiler
  SupplyTemp     holding 300       i16 x0.1 degC, raw -125 (0xFF83)
  SteamPressure  holding 302-303   i32 high word first x0.001 bar, raw 8250
  Locked         holding 310       u16 7; "RW" in the map, but every write gets
                                   exception 4 (SlaveDeviceFailure)
  Spare          holding 500       in the map, not served (exception 2)

Every address not listed (and any read or write spanning one) answers exception 2
(IllegalDataAddress); so does a write to a register the map marks R. Answers every unit
id. Prints `ready PORT` once it listens on 127.0.0.1:PORT; on every accepted write
(function codes 5, 6, 15, 16, 23) `write holding|coil ADDRESS V1 [V2 ...]` (raw unsigned
16-bit registers, coils 0/1); on every refused one `refused holding|coil ADDRESS` (the
request's first address). Ends when stdin closes.

pymodbus 3.16 asks `server.context` for async_getValues/async_setValues(device_id,
function_code, address, count|values) and takes an ExcCodes back as the exception to
answer; its own SimDevice store cannot refuse single unmapped coils (it validates bits
16 at a time), so the PLC below is that context itself, a dict per table."""
import asyncio
import struct
import sys
import time

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.server import ModbusTcpServer


def words(fmt, value, low_first=False):
    """`value` packed big-endian as struct `fmt` ("f", "i", "I", "h"), as 16-bit registers."""
    b = struct.pack(">" + fmt, value)
    regs = [int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2)]
    return regs[::-1] if low_first else regs


# table per function code: c coils, d discrete inputs, h holding, i input registers
TABLE = {1: "c", 5: "c", 15: "c", 2: "d", 3: "h", 6: "h", 16: "h", 23: "h", 4: "i"}
KIND = {"c": "coil", "h": "holding"}
WRITABLE = {("h", 200), ("h", 1200), ("c", 0), ("c", 1000), ("h", 310)}
LOCKED = {("h", 310)}
COUNTERS = []  # (input register address of a u32 GoodCount, its value at start)


def plant():
    """The four tables: {address: raw register value or 0/1}."""
    t = {"c": {}, "d": {}, "h": {}, "i": {}}

    def put(table, address, regs):
        for i, r in enumerate(regs):
            t[table][address + i] = r

    for base, tension, current, running, good, rejects, speed, enable in [
        (0, 123.5, 157, 1, 70000, 12, 180, 1),  # Wrapper_A
        (1000, 98.25, 203, 0, 5, 0, 150, 1),  # Wrapper_B
    ]:
        put("h", base + 100, words("f", tension, low_first=True))  # FilmTension
        put("i", base + 10, words("h", current))  # MotorCurrent
        put("d", base + 0, [running])  # Running
        put("i", base + 20, words("I", good))  # GoodCount
        COUNTERS.append((base + 20, good))
        put("i", base + 22, [rejects])  # RejectCount
        put("h", base + 200, [speed])  # SpeedSetpoint
        put("c", base + 0, [enable])  # Enable
    put("h", 300, words("h", -125))  # SupplyTemp
    put("h", 302, words("i", 8250))  # SteamPressure
    put("h", 310, [7])  # Locked (Spare, holding 500, is deliberately absent)
    return t


class Plc(ModbusServerContext):
    """The datastore pymodbus' request handlers call; any unit id gets the same PLC."""

    def __init__(self):  # no super().__init__: it wants a deprecated device context
        self.tables = plant()
        self.simdevices = []  # empty + old_simulator: the server uses us as we are
        self.old_simulator = True

    def device_ids(self):
        return [0]

    async def async_getValues(self, device_id, func_code, address, count=1):
        table = TABLE[func_code]
        regs = self.tables[table]
        if any(a not in regs for a in range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        values = [regs[a] for a in range(address, address + count)]
        return [bool(v) for v in values] if table in "cd" else values

    async def async_setValues(self, device_id, func_code, address, values):
        table = TABLE[func_code]
        addrs = [(table, a) for a in range(address, address + len(values))]
        refused = None
        if any(a not in WRITABLE for a in addrs):
            refused = ExcCodes.ILLEGAL_ADDRESS
        elif any(a in LOCKED for a in addrs):
            refused = ExcCodes.DEVICE_FAILURE
        if refused:
            print(f"refused {KIND[table]} {address}", flush=True)
            return refused
        raw = [int(v) for v in values]
        for i, v in enumerate(raw):
            self.tables[table][address + i] = v
        print(f"write {KIND[table]} {address} {' '.join(map(str, raw))}", flush=True)
        return None


async def main():
    port = int(sys.argv[1])
    plc = Plc()
    server = ModbusTcpServer(plc, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    print(f"ready {port}", flush=True)
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    while not stdin_closed.done():
        await asyncio.wait([stdin_closed], timeout=0.05)
        ticks = int((time.monotonic() - start) / 0.5)  # GoodCount: +1 every 500 ms
        for address, first in COUNTERS:
            hi, lo = words("I", first + ticks)
            plc.tables["i"][address], plc.tables["i"][address + 1] = hi, lo
    await server.shutdown()


asyncio.run(main())
