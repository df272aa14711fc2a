"""A Sparkplug B edge node that is not ours: pysparkplug (PyPI) on paho-mqtt, named as a
vendor would name it. Used by tests/e2e/plc.rs through Debian's mosquitto.

    python3 sparkplug_edge.py HOST PORT SECONDS

Group "Plant1", node "Edge1":
- node metrics "Line/Throughput" (Double, changes every step) and "Line/Enable" (Boolean,
  takes NCMDs silently: a device that never reports a setpoint back);
- device "Filler": "Temperature" (Float, every step), "Running" (Boolean), "Speed" (Float,
  a setpoint: a DCMD in 0..=100 is applied and reported back in a DDATA, one above 100 is
  refused by reporting the value it keeps) and "Serial" (Int32, nobody maps it).

Prints "born" once its births are out, then one line per command it takes. Ends after
SECONDS or when stdin closes.
"""

import sys
import threading
import time

import pysparkplug as sp

host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

speed = 40.0
# One message at a time: each takes the next seq when built, and the host requires them in
# order (a command answered from paho's thread would otherwise race the main loop).
lock = threading.Lock()


def now():
    return sp.get_current_timestamp()


def m(name, datatype, value):
    return sp.Metric(timestamp=now(), name=name, datatype=datatype, value=value)


def node_cmd(node, message):
    for metric in message.payload.metrics:
        print(f"ncmd {metric.name} = {metric.value}", flush=True)


def device_cmd(node, message):
    global speed
    for metric in message.payload.metrics:
        print(f"dcmd {metric.name} = {metric.value}", flush=True)
        if metric.name == "Speed":
            if 0 <= metric.value <= 100:
                speed = float(metric.value)
            # Applied or not, the device says what it holds.
            with lock:
                node.update_device("Filler", [m("Speed", sp.DataType.FLOAT, speed)])


node = sp.EdgeNode(
    group_id="Plant1",
    edge_node_id="Edge1",
    metrics=[
        m("Line/Throughput", sp.DataType.DOUBLE, 120.0),
        m("Line/Enable", sp.DataType.BOOLEAN, True),
    ],
    cmd_callback=node_cmd,
)
node.register(
    sp.Device(
        device_id="Filler",
        metrics=[
            m("Temperature", sp.DataType.FLOAT, 20.5),
            m("Running", sp.DataType.BOOLEAN, True),
            m("Speed", sp.DataType.FLOAT, speed),
            m("Serial", sp.DataType.INT32, 4711),
        ],
        cmd_callback=device_cmd,
    )
)
node.connect(host, port=port, blocking=False)
time.sleep(1.0)
print("born", flush=True)

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
end = time.time() + seconds
step = 0
while time.time() < end and not stop.is_set():
    step += 1
    with lock:
        node.update_device("Filler", [m("Temperature", sp.DataType.FLOAT, 20.5 + step)])
        node.update([m("Line/Throughput", sp.DataType.DOUBLE, 120.0 + step)])
    time.sleep(0.2)
node.disconnect()
