"""A plant's OPC UA server written by other people (python asyncua), with naming unlike
ours, for `ferrotwin import opcua` (tests/e2e/import.rs):

Objects/
  Hall 2/                       folder (area)
    Line A/                     folder (line)
      Press_01/  Press_02/      objects (machines), each:
        OilTemp    Double, EngineeringUnits degC, EURange 0..200, moves every 200 ms
        Force      Float, kN, EURange 0..500, moves
        Running    Boolean, true
        PartsGood  UInt32, grows
        SpeedSP    Int16, writable, EURange 0..150, %
        Serial     String (no twin holds it)
  Utilities/
    Compressor/ Pressure  Double bar (no EURange), moves; Enable  Boolean, writable
    Curve      Double[] (no twin holds an array)

Variables have string node ids `Hall2.LineA.Press_01.OilTemp` in the namespace
`urn:foreign:plant`. Prints `ready PORT` once it listens on 127.0.0.1:PORT and, on every
write a client makes, `write NODEID VALUE`. A line `fail` on stdin turns Compressor/Pressure's status
BadSensorFailure (value kept), `heal` Good again. Ends when stdin closes."""
import asyncio
import sys
import threading

from asyncua import Server, ua


async def analog(parent, idx, nodeid, name, value, vtype, unit, rng, writable=False):
    var = await parent.add_variable(
        ua.NodeId(nodeid, idx), name, ua.Variant(value, vtype)
    )
    if writable:
        await var.set_writable()
    if unit is not None:
        eu = ua.EUInformation()
        eu.DisplayName = ua.LocalizedText(unit)
        eu.NamespaceUri = "http://www.opcfoundation.org/UA/units/un/cefact"
        await var.add_property(idx, "EngineeringUnits", ua.Variant(eu))
    if rng is not None:
        r = ua.Range()
        r.Low, r.High = rng
        await var.add_property(idx, "EURange", ua.Variant(r))
    return var


class Writes:
    def datachange_notification(self, node, val, data):
        print(f"write {node.nodeid.to_string()} {val}", flush=True)


async def main():
    port = int(sys.argv[1])
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/foreign/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:foreign:plant")
    objects = server.nodes.objects
    hall = await objects.add_folder(ua.NodeId("Hall2", idx), "Hall 2")
    line = await hall.add_folder(ua.NodeId("Hall2.LineA", idx), "Line A")
    moving = []
    setpoints = []
    for n, press in enumerate(["Press_01", "Press_02"]):
        base = f"Hall2.LineA.{press}"
        obj = await line.add_object(ua.NodeId(base, idx), press)
        t = await analog(obj, idx, f"{base}.OilTemp", "OilTemp", 40.0 + n, ua.VariantType.Double, "degC", (0.0, 200.0))
        f = await analog(obj, idx, f"{base}.Force", "Force", 100.0 + n, ua.VariantType.Float, "kN", (0.0, 500.0))
        await analog(obj, idx, f"{base}.Running", "Running", True, ua.VariantType.Boolean, None, None)
        g = await analog(obj, idx, f"{base}.PartsGood", "PartsGood", 10 * n, ua.VariantType.UInt32, None, None)
        sp = await analog(obj, idx, f"{base}.SpeedSP", "SpeedSP", 100, ua.VariantType.Int16, "%", (0.0, 150.0), writable=True)
        await analog(obj, idx, f"{base}.Serial", "Serial", f"SN-{n}", ua.VariantType.String, None, None)
        moving += [(t, ua.VariantType.Double, 0.5), (f, ua.VariantType.Float, 1.0), (g, ua.VariantType.UInt32, 1)]
        setpoints.append(sp)
    utilities = await objects.add_folder(ua.NodeId("Utilities", idx), "Utilities")
    comp = await utilities.add_object(ua.NodeId("Utilities.Compressor", idx), "Compressor")
    p = await analog(comp, idx, "Utilities.Compressor.Pressure", "Pressure", 6.0, ua.VariantType.Double, "bar", None)
    enable = await analog(comp, idx, "Utilities.Compressor.Enable", "Enable", True, ua.VariantType.Boolean, None, None, writable=True)
    await comp.add_variable(ua.NodeId("Utilities.Compressor.Curve", idx), "Curve", ua.Variant([1.0, 2.0], ua.VariantType.Double))
    moving.append((p, ua.VariantType.Double, 0.01))
    setpoints.append(enable)
    async with server:
        sub = await server.create_subscription(50, Writes())
        await sub.subscribe_data_change(setpoints)
        print(f"ready {port}", flush=True)
        loop = asyncio.get_running_loop()
        commands = asyncio.Queue()

        def read_stdin():
            for text in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, text.strip())
            loop.call_soon_threadsafe(commands.put_nowait, None)

        threading.Thread(target=read_stdin, daemon=True).start()
        failing = False
        values = {}
        while True:
            while not commands.empty():
                cmd = commands.get_nowait()
                if cmd is None:
                    return
                failing = {"fail": True, "heal": False}.get(cmd, failing)
            await asyncio.sleep(0.2)
            for var, vtype, delta in moving:
                # Our own copy: reading back a Bad value raises in asyncua.
                if var.nodeid not in values:
                    values[var.nodeid] = await var.read_value()
                v = values[var.nodeid]
                if var is p and failing:
                    # The server's way of saying the value is not to be trusted.
                    bad = ua.StatusCode(ua.StatusCodes.BadSensorFailure)
                    await var.write_value(ua.DataValue(ua.Variant(v, vtype), StatusCode=bad))
                else:
                    values[var.nodeid] = v + delta
                    await var.write_value(ua.Variant(v + delta, vtype))


asyncio.run(main())
