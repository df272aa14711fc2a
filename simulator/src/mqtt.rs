//! The plant on MQTT: readings published as JSON on ISA-95 topics, to any broker or to an
//! embedded rumqttd broker started on 127.0.0.1.
//!
//! Topics: a sensor's value on its path, `enterprise/site/area/line/machine/sensor`; a
//! machine's properties under its path, `.../machine/state`, `.../machine/good_count`,
//! `.../machine/scrap_count`. Payload: `{"value": 12.5, "ts_us": 1735689600000000,
//! "quality": "good"}` with the value a JSON number or bool, `ts_us` the source timestamp in
//! microseconds since the Unix epoch, and `quality` one of `good`, `uncertain`, `bad` (a
//! non-good quality adds `"reason"`).
//!
//! Commands (see `parse_json_command`): a client sets a machine's speed by publishing
//! `{"value": 150}` on `<machine path>/set/speed_setpoint_pct` (0..=200, percent of nominal).
//! The publisher subscribes to those topics; the Sparkplug B edge nodes (`sparkplug`) use the
//! same client with their own subscriptions and Will.
//!
//! QoS 1: the broker acknowledges every publish, so at most `IN_FLIGHT` publishes are
//! unacknowledged and at most `REQUEST_CAPACITY` more wait in rumqttc's request channel; when
//! both are full `MqttPublisher::publish` waits. A slow broker slows the publisher down instead
//! of the publisher buffering without bound, and (unlike QoS 0, where only the socket buffer
//! pushes back) nothing is lost on the way to a broker that is up.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{AssetId, AssetPath, Property, QualityCode, QualityReason, Reading, Value};
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Publishes sent to the broker and not yet acknowledged.
pub const IN_FLIGHT: u16 = 100;
/// Publishes queued in the client before `publish` has to wait.
pub const REQUEST_CAPACITY: usize = 1000;
/// How long `connect` waits for the broker's CONNACK.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The QoS of every message (see the module docs).
pub const QOS: QoS = QoS::AtLeastOnce;
/// Messages that arrived on a subscription and wait for the serve loop. The client's event
/// loop never waits for the serve loop (which may itself wait for the event loop to take a
/// publish): beyond this bound commands are dropped and counted in `CommandStats::dropped`.
pub const INBOUND_QUEUE: usize = 256;
/// The JSON command topic of a machine's speed setpoint, below the machine's path.
pub const SPEED_COMMAND_SUFFIX: &str = "set/speed_setpoint_pct";
/// Highest speed setpoint in percent (the Modbus map refuses more too).
pub const MAX_SPEED_PCT: u16 = 200;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot start the embedded MQTT broker on 127.0.0.1")]
    BrokerStart {
        #[source]
        source: io::Error,
    },
    #[error("the embedded MQTT broker did not accept connections on {addr} within 5 s")]
    BrokerNotListening { addr: SocketAddr },
    #[error("cannot connect to the MQTT broker at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: Box<ConnectionError>,
    },
    #[error("no CONNACK from the MQTT broker at {endpoint} within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { endpoint: String },
    #[error("the MQTT client stopped")]
    ClientGone {
        #[source]
        source: rumqttc::ClientError,
    },
    #[error("{0:?} is not HOST:PORT")]
    Endpoint(String),
    #[error("no SUBACK from the MQTT broker at {endpoint} within {CONNECT_TIMEOUT:?}")]
    SubscribeTimeout { endpoint: String },
}

/// A message that arrived on one of a client's subscriptions, or news that the client's
/// connection came back (its subscriptions are renewed; Sparkplug nodes then rebirth).
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Message {
        client: usize,
        topic: String,
        payload: Vec<u8>,
    },
    Reconnected {
        client: usize,
    },
}

/// What happened to the commands clients sent to the simulator.
#[derive(Debug, Default)]
pub struct CommandStats {
    /// Setpoints handed to the simulation, rebirths done.
    pub applied: AtomicU64,
    /// Malformed, unknown machine or metric, value out of range.
    pub rejected: AtomicU64,
    /// Lost because `INBOUND_QUEUE` was full.
    pub dropped: AtomicU64,
}

impl CommandStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What a client subscribes to and leaves behind.
#[derive(Default)]
pub struct Session {
    /// Published by the broker when the connection dies without a DISCONNECT.
    pub will: Option<LastWill>,
    /// Topic filters, subscribed at QoS 1 on every (re)connection.
    pub subscriptions: Vec<String>,
    /// Where arriving messages go, tagged with the client number.
    pub inbound: Option<(usize, mpsc::Sender<Inbound>, Arc<CommandStats>)>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommandError {
    #[error("topic {0:?} is not <machine path>/{SPEED_COMMAND_SUFFIX}")]
    Topic(String),
    #[error("{topic}: no machine {machine:?} in the plant")]
    UnknownMachine { topic: String, machine: String },
    #[error("{topic}: payload is not {{\"value\": <integer 0..={MAX_SPEED_PCT}>}}: {why}")]
    Payload { topic: String, why: String },
}

/// The machine and percent of a JSON speed command: `{"value": 150}` on
/// `<machine path>/set/speed_setpoint_pct`; `machines` maps machine paths to ids.
pub fn parse_json_command(
    topic: &str,
    payload: &[u8],
    machines: &HashMap<String, AssetId>,
) -> Result<(AssetId, u16), CommandError> {
    let machine = topic
        .strip_suffix(SPEED_COMMAND_SUFFIX)
        .and_then(|m| m.strip_suffix('/'))
        .ok_or_else(|| CommandError::Topic(topic.to_string()))?;
    let &id = machines
        .get(machine)
        .ok_or_else(|| CommandError::UnknownMachine {
            topic: topic.to_string(),
            machine: machine.to_string(),
        })?;
    let bad = |why: String| CommandError::Payload {
        topic: topic.to_string(),
        why,
    };
    let json: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
    let value = json
        .get("value")
        .ok_or_else(|| bad("no \"value\"".into()))?;
    let pct = value
        .as_u64()
        .filter(|&v| v <= u64::from(MAX_SPEED_PCT))
        .ok_or_else(|| bad(format!("value {value}")))?;
    Ok((id, pct as u16))
}

/// The topic filter of every machine's JSON speed command (machines are five levels deep).
pub const SPEED_COMMAND_FILTER: &str = "+/+/+/+/+/set/speed_setpoint_pct";

/// Splits `HOST:PORT` (the host may be a name, an IPv4 address or a bracketed IPv6 address).
pub fn parse_endpoint(s: &str) -> Result<(String, u16), MqttError> {
    let s = s.strip_prefix("mqtt://").unwrap_or(s);
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| MqttError::Endpoint(s.to_string()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse::<u16>()
        .map_err(|_| MqttError::Endpoint(s.to_string()))?;
    if host.is_empty() || port == 0 {
        return Err(MqttError::Endpoint(s.to_string()));
    }
    Ok((host.to_string(), port))
}

/// An MQTT broker (rumqttd) on 127.0.0.1, running on its own threads.
///
/// rumqttd has no shutdown: the broker runs until the process exits. rumqttd binds its
/// listener itself and does not report the port, so `start` picks a free port by binding
/// 127.0.0.1:0, releases it and hands it to the broker (another process could take the port in
/// between; `start` then fails or, at worst, finds the other listener).
pub struct EmbeddedBroker {
    addr: SocketAddr,
    addr_v5: SocketAddr,
}

/// A free port on 127.0.0.1 (released again: see `EmbeddedBroker`).
fn free_local_addr() -> Result<SocketAddr, MqttError> {
    let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|source| MqttError::BrokerStart { source })?
        .port();
    Ok(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
}

impl EmbeddedBroker {
    /// Starts the broker with an MQTT 3.1.1 listener (`addr`) and an MQTT 5 one (`addr_v5`)
    /// sharing one router.
    pub fn start() -> Result<EmbeddedBroker, MqttError> {
        let addr = free_local_addr()?;
        let mut addr_v5 = free_local_addr()?;
        while addr_v5 == addr {
            addr_v5 = free_local_addr()?;
        }
        let server = |name: &str, listen| rumqttd::ServerSettings {
            name: name.to_string(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 20_480,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 200,
                // The router keeps at most count × size bytes of messages per filter.
                max_segment_size: 1 << 20,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([(
                "1".to_string(),
                server("ferrotwin-sim-v4", addr),
            )])),
            v5: Some(HashMap::from([(
                "1".to_string(),
                server("ferrotwin-sim-v5", addr_v5),
            )])),
            ..Default::default()
        };
        let mut broker = rumqttd::Broker::new(config);
        std::thread::Builder::new()
            .name("mqtt-broker".to_string())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    eprintln!("embedded MQTT broker stopped: {e}");
                }
            })
            .map_err(|source| MqttError::BrokerStart { source })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        for a in [addr, addr_v5] {
            while TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline {
                    return Err(MqttError::BrokerNotListening { addr: a });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(EmbeddedBroker { addr, addr_v5 })
    }

    /// The MQTT 3.1.1 listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The MQTT 5 listener.
    pub fn addr_v5(&self) -> SocketAddr {
        self.addr_v5
    }
}

/// The topic of each machine and sensor of a plant.
pub struct Topics {
    paths: HashMap<AssetId, AssetPath>,
}

impl Topics {
    pub fn of(spec: &PlantSpec) -> Topics {
        let paths = spec
            .assets()
            .into_iter()
            .filter(|a| matches!(a.kind, AssetKind::Machine { .. } | AssetKind::Sensor { .. }))
            .map(|a| (a.path.id(), a.path))
            .collect();
        Topics { paths }
    }

    /// A sensor's value on the sensor's path, a machine's properties below the machine's;
    /// `None` for an asset not in the plant.
    pub fn topic(&self, r: &Reading) -> Option<String> {
        let path = self.paths.get(&r.asset)?;
        Some(match r.property {
            Property::Value => path.as_str().to_string(),
            p => format!("{}/{}", path.as_str(), p.as_str()),
        })
    }
}

/// The JSON payload of a reading (see the module docs).
pub fn payload(r: &Reading) -> Vec<u8> {
    let value = match r.value {
        // NaN and infinities have no JSON number: they become null.
        Value::Float(v) => {
            serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into)
        }
        Value::Int(v) => v.into(),
        Value::Bool(b) => b.into(),
    };
    let quality = match r.quality.code {
        QualityCode::Good => "good",
        QualityCode::Uncertain => "uncertain",
        QualityCode::Bad => "bad",
    };
    let mut json = serde_json::json!({
        "value": value,
        "ts_us": r.source_ts.as_micros(),
        "quality": quality,
    });
    if r.quality.reason != QualityReason::None {
        json["reason"] = r.quality.reason.as_str().into();
    }
    serde_json::to_vec(&json).expect("a JSON value always serialises")
}

/// An MQTT 3.1.1 client (rumqttc) publishing readings; its event loop runs as a tokio task
/// and reconnects (every second) when the connection drops.
pub struct MqttPublisher {
    client: AsyncClient,
    driver: JoinHandle<()>,
    /// Publishes handed to the client, and those the broker acknowledged: `disconnect` waits
    /// for them to meet (rumqttd can drop publishes that arrive right before a DISCONNECT).
    queued: AtomicU64,
    acked: Arc<AtomicU64>,
}

impl MqttPublisher {
    /// Connects and waits for the broker's CONNACK (at most `CONNECT_TIMEOUT`). Call inside a
    /// tokio runtime.
    pub async fn connect(
        host: &str,
        port: u16,
        client_id: &str,
    ) -> Result<MqttPublisher, MqttError> {
        MqttPublisher::connect_with(host, port, client_id, Session::default()).await
    }

    /// `connect` with a Will and subscriptions: returns once the broker acknowledged the
    /// connection and every subscription (each at most `CONNECT_TIMEOUT`).
    pub async fn connect_with(
        host: &str,
        port: u16,
        client_id: &str,
        session: Session,
    ) -> Result<MqttPublisher, MqttError> {
        let endpoint = format!("{host}:{port}");
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(IN_FLIGHT);
        if let Some(will) = session.will {
            options.set_last_will(will);
        }
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        // A device answers a command at once: no Nagle on its reports.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let connack = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connack).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(MqttError::Connect {
                    endpoint,
                    source: Box::new(e),
                });
            }
            Err(_) => return Err(MqttError::ConnectTimeout { endpoint }),
        }
        let filters = session.subscriptions;
        let inbound = session.inbound;
        // Messages that arrive before the SUBACKs are kept for the serve loop too.
        let mut early = Vec::new();
        if !filters.is_empty() {
            for f in &filters {
                client
                    .subscribe(f.clone(), QOS)
                    .await
                    .map_err(|source| MqttError::ClientGone { source })?;
            }
            let mut acked = 0;
            let subacks = async {
                while acked < filters.len() {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => acked += 1,
                        Ok(Event::Incoming(Packet::Publish(p))) => early.push(p),
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, subacks).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(MqttError::Connect {
                        endpoint,
                        source: Box::new(e),
                    });
                }
                Err(_) => return Err(MqttError::SubscribeTimeout { endpoint }),
            }
        }
        let resubscribe = client.clone();
        let acked = Arc::new(AtomicU64::new(0));
        let acks = Arc::clone(&acked);
        let driver = tokio::spawn(async move {
            let forward = |m: Inbound| {
                if let Some((_, tx, stats)) = &inbound
                    && tx.try_send(m).is_err()
                {
                    CommandStats::count(&stats.dropped);
                }
            };
            let number = inbound.as_ref().map_or(0, |(n, _, _)| *n);
            for p in early {
                forward(Inbound::Message {
                    client: number,
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                });
            }
            let mut lost = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect))
                    | Err(ConnectionError::RequestsDone) => return,
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => forward(Inbound::Message {
                        client: number,
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    }),
                    Ok(Event::Incoming(Packet::ConnAck(_))) if lost => {
                        lost = false;
                        // A clean session forgets subscriptions: renew them.
                        for f in &filters {
                            if let Err(e) = resubscribe.try_subscribe(f.clone(), QOS) {
                                eprintln!("mqtt {endpoint}: cannot resubscribe to {f}: {e}");
                            }
                        }
                        forward(Inbound::Reconnected { client: number });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        lost = true;
                        eprintln!("mqtt {endpoint}: {e}; reconnecting in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(MqttPublisher {
            client,
            driver,
            queued: AtomicU64::new(0),
            acked,
        })
    }

    /// Publishes `payload` on `topic` (QoS 1, not retained); waits while the client's queue
    /// is full.
    pub async fn publish_to(&self, topic: String, payload: Vec<u8>) -> Result<(), MqttError> {
        self.client
            .publish(topic, QOS, false, payload)
            .await
            .map_err(|source| MqttError::ClientGone { source })?;
        self.queued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes each reading of an asset in `topics` on its topic (QoS 1, not retained);
    /// waits while the client's queue is full. Returns how many were published.
    pub async fn publish(&self, readings: &[Reading], topics: &Topics) -> Result<usize, MqttError> {
        let mut sent = 0;
        for r in readings {
            let Some(topic) = topics.topic(r) else {
                continue;
            };
            self.client
                .publish(topic, QOS, false, payload(r))
                .await
                .map_err(|source| MqttError::ClientGone { source })?;
            self.queued.fetch_add(1, Ordering::Relaxed);
            sent += 1;
        }
        Ok(sent)
    }

    /// Waits until the broker acknowledged what is queued, disconnects and stops the event
    /// loop (waits at most 2 s for each).
    pub async fn disconnect(mut self) {
        self.disconnect_in_place().await;
    }

    /// `disconnect` for a publisher that is borrowed; it publishes nothing after.
    pub async fn disconnect_in_place(&mut self) {
        if self.driver.is_finished() {
            return;
        }
        let queued = self.queued.load(Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.acked.load(Ordering::Relaxed) < queued {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.driver).await;
        }
        // `Drop` aborts the event loop if it has not ended.
    }

    /// Ends the connection without a DISCONNECT, as a crash would: the broker publishes the
    /// Will (when it notices: at once for a closed socket).
    pub fn abort(self) {
        self.driver.abort();
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferrotwin_models::{Quality, Timestamp};
    use rumqttc::EventLoop;

    use super::*;
    use crate::generate::{PlantSize, generate};
    use crate::model::PlantSim;
    use crate::run::RUN_START;

    /// One line of three machines (a press, a conveyor with an int sensor, an oven with a
    /// bool sensor).
    fn line_plant() -> PlantSpec {
        generate(PlantSize::ONE_LINE, 1)
    }

    /// A client subscribed to `acme/#` (QoS 1), SUBACK received.
    async fn subscriber(broker: &EmbeddedBroker) -> EventLoop {
        let addr = broker.addr();
        let mut options = MqttOptions::new("test-sub", addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        client.subscribe("acme/#", QOS).await.expect("queued");
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) =
                    eventloop.poll().await.expect("subscriber connected")
                {
                    return;
                }
            }
        })
        .await
        .expect("SUBACK within 5 s");
        // The client handle may go: the event loop keeps its request channel alive.
        std::mem::forget(client);
        eventloop
    }

    /// Receives publishes until `n` have arrived or nothing comes for 3 s: topic → payloads
    /// in arrival order.
    async fn receive(eventloop: &mut EventLoop, n: usize) -> BTreeMap<String, Vec<Vec<u8>>> {
        let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        let mut count = 0;
        while count < n {
            let event = tokio::time::timeout(Duration::from_secs(3), eventloop.poll()).await;
            match event {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    got.entry(p.topic.clone())
                        .or_default()
                        .push(p.payload.to_vec());
                    count += 1;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscriber: {e}"),
                Err(_) => break,
            }
        }
        got
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("payload is JSON")
    }

    #[tokio::test]
    async fn subscriber_receives_each_reading_as_json_on_its_isa95_topic() {
        let broker = EmbeddedBroker::start().expect("broker starts");
        assert_eq!(broker.addr().ip(), Ipv4Addr::LOCALHOST);
        assert_ne!(broker.addr().port(), 0);
        let mut sub = subscriber(&broker).await;
        let spec = line_plant();
        let topics = Topics::of(&spec);
        let publisher = MqttPublisher::connect("127.0.0.1", broker.addr().port(), "test-pub")
            .await
            .expect("publisher connects");
        let mut sim = PlantSim::new(&spec, 3, RUN_START);
        let mut all = Vec::new();
        let mut readings = Vec::new();
        for s in 0..=5 {
            readings.clear();
            sim.step(RUN_START.plus_ms(s * 1000), &mut readings);
            let sent = publisher
                .publish(&readings, &topics)
                .await
                .expect("published");
            assert_eq!(sent, readings.len(), "every reading has a topic");
            all.extend_from_slice(&readings);
        }
        let got = receive(&mut sub, all.len()).await;
        assert_eq!(got.values().map(Vec::len).sum::<usize>(), all.len());

        // Every reading arrived, in order per topic, with the simulated value, time, quality.
        let mut expected: BTreeMap<String, Vec<&Reading>> = BTreeMap::new();
        for r in &all {
            expected
                .entry(topics.topic(r).expect("topic"))
                .or_default()
                .push(r);
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        for (topic, rs) in &expected {
            assert_eq!(topic.split('/').next(), Some("acme"));
            let payloads = &got[topic];
            assert_eq!(payloads.len(), rs.len(), "{topic}");
            for (p, r) in payloads.iter().zip(rs) {
                let j = json(p);
                assert_eq!(
                    j["ts_us"].as_i64(),
                    Some(r.source_ts.as_micros()),
                    "{topic}"
                );
                assert_eq!(j["quality"], "good", "{topic}");
                match r.value {
                    Value::Float(v) => assert_eq!(j["value"].as_f64(), Some(v), "{topic}"),
                    Value::Int(v) => assert_eq!(j["value"].as_i64(), Some(v), "{topic}"),
                    Value::Bool(v) => assert_eq!(j["value"].as_bool(), Some(v), "{topic}"),
                }
            }
        }

        // One named sensor on its exact six-level topic, and each kind of payload present.
        let press = spec
            .assets()
            .into_iter()
            .find(|a| a.path.as_str().ends_with("press-1"))
            .expect("a press")
            .path;
        let temp = format!("{}/oil-temp", press.as_str());
        assert_eq!(temp.split('/').count(), 6, "{temp}");
        let last = all
            .iter()
            .rev()
            .find(|r| r.asset == AssetPath::parse(&temp).expect("path").id())
            .expect("oil temperature sampled");
        let Value::Float(v) = last.value else {
            panic!("oil-temp is a float: {:?}", last.value)
        };
        let newest = json(got[&temp].last().expect("received"));
        assert_eq!(newest["value"].as_f64(), Some(v));
        assert!(v != 0.0, "a simulated value");
        let state = json(&got[&format!("{}/state", press.as_str())][0]);
        assert!(state["value"].is_i64(), "machine state is an int: {state}");
        let kinds = |f: fn(&serde_json::Value) -> bool| {
            got.values().flatten().any(|p| f(&json(p)["value"]))
        };
        assert!(kinds(|v| v.is_f64()), "a float sensor");
        assert!(kinds(|v| v.is_boolean()), "the oven's bool sensor");
        let belt = got
            .iter()
            .find(|(t, _)| t.ends_with("/parts-on-belt"))
            .expect("the conveyor's int sensor");
        assert!(
            belt.1.iter().all(|p| json(p)["value"].is_i64()),
            "{}",
            belt.0
        );
        publisher.disconnect().await;
    }

    #[test]
    fn payloads_of_each_kind_parse_as_json() {
        let id = AssetPath::parse("acme/s/a/l/m/x").expect("path").id();
        let ts = Timestamp(1_735_689_600_000_000);
        let r = |value| Reading::good(id, Property::Value, value, ts);
        let f = json(&payload(&r(Value::Float(12.5))));
        assert_eq!(
            f,
            serde_json::json!({"value": 12.5, "ts_us": 1_735_689_600_000_000_i64, "quality": "good"})
        );
        assert_eq!(json(&payload(&r(Value::Int(-7))))["value"], -7);
        assert_eq!(json(&payload(&r(Value::Bool(true))))["value"], true);
        assert!(json(&payload(&r(Value::Float(f64::NAN))))["value"].is_null());
        let state = Reading::good(id, Property::State, Value::Int(1), ts);
        assert_eq!(json(&payload(&state))["value"], 1);
        let bad = Reading {
            quality: Quality::bad(QualityReason::CommFailure),
            ..state
        };
        let j = json(&payload(&bad));
        assert_eq!(j["quality"], "bad");
        assert_eq!(j["reason"], "communication failure");
    }

    #[test]
    fn machine_properties_go_below_the_machine_and_unknown_assets_nowhere() {
        let spec = line_plant();
        let topics = Topics::of(&spec);
        let machine = spec
            .assets()
            .into_iter()
            .find(|a| matches!(a.kind, AssetKind::Machine { .. }))
            .expect("a machine")
            .path;
        let ts = RUN_START;
        for (p, suffix) in [
            (Property::State, "state"),
            (Property::GoodCount, "good_count"),
            (Property::ScrapCount, "scrap_count"),
        ] {
            let r = Reading::good(machine.id(), p, Value::Int(0), ts);
            assert_eq!(
                topics.topic(&r),
                Some(format!("{}/{suffix}", machine.as_str()))
            );
        }
        let stranger = AssetPath::parse("other/s/a/l/m").expect("path").id();
        let r = Reading::good(stranger, Property::State, Value::Int(0), ts);
        assert_eq!(topics.topic(&r), None);
    }

    #[test]
    fn endpoints_parse_as_host_and_port() {
        assert_eq!(
            parse_endpoint("127.0.0.1:1883").expect("valid"),
            ("127.0.0.1".to_string(), 1883)
        );
        assert_eq!(
            parse_endpoint("mqtt://broker.local:1884").expect("valid"),
            ("broker.local".to_string(), 1884)
        );
        assert_eq!(
            parse_endpoint("[::1]:1883").expect("valid"),
            ("::1".to_string(), 1883)
        );
        for bad in ["broker", ":1883", "host:", "host:0", "host:99999"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_with_the_endpoint() {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let err = MqttPublisher::connect("127.0.0.1", port, "nobody")
            .await
            .err()
            .expect("nothing listens");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}
