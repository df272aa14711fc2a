"""An MQTT device that is not ours (paho-mqtt, PyPI), with its own topics and payload shape,
for tests/e2e/plc.rs through Debian's mosquitto:

    python3 json_device.py HOST PORT

An oven zone setpoint it reports every 300 ms on `factory/hall2/Oven1/zoneSP` as
`{"reading": {"val": X}, "time": <epoch ms>, "status": "OK"}` (180 at start). It takes
commands `{"value": V, ...}` on `factory/hall2/Oven1/zoneSP/set`: a V in 0..=250 is applied,
any other is ignored (it goes on reporting what it holds). Prints `ready` once subscribed,
then `cmd V` per command. Ends when stdin closes."""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port = sys.argv[1], int(sys.argv[2])
REPORT = "factory/hall2/Oven1/zoneSP"
COMMAND = REPORT + "/set"
held = 180.0
lock = threading.Lock()
subscribed = threading.Event()


def on_connect(client, userdata, flags, rc, *rest):
    client.subscribe(COMMAND, qos=1)


def on_subscribe(client, userdata, mid, granted, *rest):
    subscribed.set()


def on_message(client, userdata, msg):
    global held
    value = json.loads(msg.payload)["value"]
    print(f"cmd {value}", flush=True)
    with lock:
        if 0 <= value <= 250:
            held = float(value)
    report(client)


def report(client):
    with lock:
        body = {"reading": {"val": held}, "time": int(time.time() * 1000), "status": "OK"}
    client.publish(REPORT, json.dumps(body), qos=1)


if hasattr(mqtt, "CallbackAPIVersion"):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id="oven1-zone")
else:
    client = mqtt.Client(client_id="oven1-zone")
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, port)
client.loop_start()
subscribed.wait(30)
print("ready", flush=True)
stdin_closed = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
while not stdin_closed.wait(0.3):
    report(client)
client.loop_stop()
client.disconnect()
