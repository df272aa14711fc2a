"""A hostile client written outside the project (Python grpcio, hand-encoded protobuf),
run against a live `ferrotwin demo` to measure what hostile input costs it.

    pip install grpcio
    ferrotwin demo --grpc-addr 127.0.0.1:50051 --http-addr 127.0.0.1:8080 &
    python3 tests/foreign/hostile_probe.py --grpc 127.0.0.1:50051 --http 127.0.0.1:8080 --pid PID

It sends random request bodies to every method, 3 MB strings, a fake replication peer
(seq u64::MAX, an event 10^12 ahead, a hello storm) and slow-header HTTP connections, then
prints each class's answers (gRPC codes) and the process's RSS and open descriptors before
and after. Nothing here is ours but the method names: the encoding is written by hand.
"""

import argparse
import os
import random
import socket
import time
from collections import Counter

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)


def u(num, value):
    return field(num, 0, value)


METHODS = [
    "GetTwin", "Browse", "Query", "GetHistory", "ListEvents", "AcknowledgeAlarm",
    "ShelveAlarm", "WriteProperty", "ListConnections", "GetReplicationStatus", "WhoAmI",
    "ListAudit", "VerifyAudit",
]


def proc(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def call(channel, method, body, timeout=10):
    fn = channel.unary_unary(f"/ferrotwin.v1.TwinService/{method}")
    started = time.perf_counter()
    try:
        fn(body, timeout=timeout)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
        msg = e.details() or ""
        if len(msg) > 1100:
            code += f" (message of {len(msg)} bytes!)"
    return code, time.perf_counter() - started


def replicate(channel, msgs, timeout=10):
    fn = channel.stream_stream("/ferrotwin.v1.ReplicationService/Replicate")
    answers = []
    try:
        for a in fn(iter(msgs), timeout=timeout):
            answers.append(a)
            if len(answers) >= 2:
                break
        return f"answered {len(answers)}"
    except grpc.RpcError as e:
        return e.code().name


def hello(site, last_seq=2**64 - 1):
    return s(1, u(1, 2) + s(2, site) + s(3, "probe") + u(4, last_seq) + u(5, 2**64 - 1))


def batch(seq, after, inner):
    return s(2, u(1, seq) + s(2, inner) + u(3, after))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc", default="127.0.0.1:50051")
    ap.add_argument("--http", default="127.0.0.1:8080")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--random", type=int, default=3000)
    args = ap.parse_args()
    rng = random.Random(21)
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(args.grpc, options=opts)
    before = proc(args.pid)
    print(f"before: RSS {before[0]} KiB, {before[1]} descriptors")

    codes = Counter()
    lat = []
    for _ in range(args.random):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        code, took = call(channel, rng.choice(METHODS), body)
        codes[code] += 1
        lat.append(took)
    lat.sort()
    print(f"{args.random} random bodies: {dict(codes)}; per call p50 {lat[len(lat)//2]*1e3:.2f} ms, p99 {lat[int(len(lat)*.99)]*1e3:.2f} ms")

    path = "acme/berlin/assembly/line-1/press-1"
    big = "x" * (3 << 20)
    codes = Counter()
    for _ in range(5):
        codes[call(channel, "ShelveAlarm", s(1, path) + s(2, "a") + u(3, 2**64 - 1) + s(4, big))[0]] += 1
        codes[call(channel, "GetTwin", s(1, "acme/" + big))[0]] += 1
        codes[call(channel, "Query", s(1, "foo = bar"))[0]] += 1
        codes[call(channel, "Query", s(1, "value > NaN"))[0]] += 1
        codes[call(channel, "ListEvents", u(5, 99))[0]] += 1
    print(f"3 MB strings, nonsense queries and enums: {dict(codes)}")

    print("fake replication peer, seq 2^64-1:", replicate(channel, [hello("acme/berlin", 10), batch(2**64 - 1, 0, u(1, 2**64 - 1))]))
    event = s(4, u(1, 10**12) + s(2, s(1, path + "/x") + u(2, 1) + s(3, "lifecycle")))
    print("fake replication peer, event 10^12:", replicate(channel, [hello("acme/berlin", 10), batch(1, 0, u(1, 1) + u(9, 1) + event)]))
    storm = Counter()
    for _ in range(30):
        storm[replicate(channel, [hello("acme/berlin")], timeout=5)] += 1
        time.sleep(0.1)
    print(f"30 hellos for a live site, 100 ms apart: {dict(storm)}")

    host, port = args.http.split(":")
    slow = []
    for _ in range(200):
        c = socket.create_connection((host, int(port)))
        c.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        slow.append(c)
    print(f"200 slow-header connections open: {proc(args.pid)[1]} descriptors")
    time.sleep(15)
    closed = 0
    for c in slow:
        c.settimeout(1)
        try:
            c.recv(1024)  # an answer (408) or end of stream: the server let go
            closed += 1
        except socket.timeout:
            pass  # still held open
        except OSError:
            closed += 1  # reset
        c.close()
    after = proc(args.pid)
    print(f"after 15 s: {closed} of 200 slow connections closed by the server")
    print(f"after: RSS {after[0]} KiB ({after[0]-before[0]:+} KiB), {after[1]} descriptors")


if __name__ == "__main__":
    main()
