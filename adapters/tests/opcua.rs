//! The OPC UA adapter against the simulator's real OPC UA server on 127.0.0.1.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_adapters::{
    AdapterEvent, AdapterEventKind, AdapterHandle, ConnectionConfig, LinkState, WriteAck,
    WriteError, WriteRequest,
};
use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{
    AssetId, AssetPath, Property, QualityCode, QualityReason, Reading, RecordingSink, Timestamp,
    Value,
};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::serve::ServedPlant;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PRESS: &str = "acme/berlin/assembly/line-1/press-1";
/// Generous: a loaded 2-core machine builds sessions slowly in debug.
const WAIT: Duration = Duration::from_secs(20);

type Served = HashMap<(AssetId, Property, i64), Value>;

/// The one-line plant served over OPC UA, stepped every 50 ms in real time, remembering
/// every reading it served.
struct Sim {
    spec: PlantSpec,
    plant: Arc<tokio::sync::Mutex<ServedPlant>>,
    served: Arc<Mutex<Served>>,
    stepper: tokio::task::JoinHandle<()>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stepper.abort();
    }
}

impl Sim {
    async fn start() -> Sim {
        let spec = generate(PlantSize::ONE_LINE, 1);
        let start = Timestamp::now();
        let mut plant = ServedPlant::start(&spec, 7, start).await.expect("starts");
        plant.serve_opcua(&spec).await.expect("OPC UA starts");
        let plant = Arc::new(tokio::sync::Mutex::new(plant));
        let served = Arc::new(Mutex::new(HashMap::new()));
        let stepper = tokio::spawn({
            let plant = Arc::clone(&plant);
            let served = Arc::clone(&served);
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tick.tick().await;
                    let mut p = plant.lock().await;
                    let readings = p.step_to(Timestamp::now()).to_vec();
                    let mut s = served.lock().expect("not poisoned");
                    for r in readings {
                        s.insert((r.asset, r.property, r.source_ts.0), r.value);
                    }
                }
            }
        });
        Sim {
            spec,
            plant,
            served,
            stepper,
        }
    }

    async fn endpoint(&self) -> String {
        let p = self.plant.lock().await;
        p.opcua().expect("serving").sites()[0].endpoint.clone()
    }

    async fn addr(&self) -> SocketAddr {
        let p = self.plant.lock().await;
        p.opcua().expect("serving").sites()[0].addr
    }

    fn sensors_of(&self, machine: &str) -> Vec<AssetPath> {
        self.spec
            .assets()
            .into_iter()
            .filter(|a| {
                matches!(a.kind, AssetKind::Sensor { .. }) && a.path.as_str().starts_with(machine)
            })
            .map(|a| a.path)
            .collect()
    }
}

/// One tag line of the config.
fn tag(node: &str, asset: &str, property: &str, writable: bool) -> String {
    format!(
        "[[tags]]\nnode_id = \"ns=2;s={node}\"\nasset = \"{asset}\"\nproperty = \"{property}\"\nwritable = {writable}\n"
    )
}

fn value_tag(sensor: &AssetPath) -> String {
    tag(&format!("{sensor}/value"), sensor.as_str(), "value", false)
}

fn config(endpoint: &str, tags: &str) -> ConnectionConfig {
    let text = format!(
        "protocol = \"opcua\"\nname = \"berlin-opcua\"\nendpoint = \"{endpoint}\"\nsecurity_policy = \"none\"\ntimeout_ms = 3000\n{tags}"
    );
    toml::from_str(&text).expect("valid config")
}

/// A running adapter with its sink and the events it sent.
struct Running {
    handle: AdapterHandle,
    sink: Arc<RecordingSink>,
    events: Arc<Mutex<Vec<AdapterEvent>>>,
    token: CancellationToken,
}

impl Running {
    fn start(config: ConnectionConfig) -> Running {
        let sink = Arc::new(RecordingSink::with_limit(1_000_000));
        let (tx, mut rx) = mpsc::channel(ferrotwin_adapters::EVENT_QUEUE);
        let events = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn({
            let events = Arc::clone(&events);
            async move {
                while let Some(e) = rx.recv().await {
                    events.lock().expect("not poisoned").push(e);
                }
            }
        });
        let token = CancellationToken::new();
        let handle = ferrotwin_adapters::start(config, sink.clone(), tx, token.clone())
            .expect("config is valid");
        Running {
            handle,
            sink,
            events,
            token,
        }
    }

    fn events(&self) -> Vec<AdapterEvent> {
        self.events.lock().expect("not poisoned").clone()
    }

    fn count(&self, pred: impl Fn(&AdapterEventKind) -> bool) -> usize {
        self.events().iter().filter(|e| pred(&e.kind)).count()
    }

    async fn stop(mut self) {
        self.token.cancel();
        let join = self.handle.take_join().expect("joined once");
        tokio::time::timeout(WAIT, join)
            .await
            .expect("stops within the wait")
            .expect("no panic");
    }
}

/// Waits until `cond` holds, checking every 20 ms; panics with `what` after `WAIT`.
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_connected(k: &AdapterEventKind) -> bool {
    matches!(k, AdapterEventKind::Connected { .. })
}

fn is_disconnected(k: &AdapterEventKind) -> bool {
    matches!(k, AdapterEventKind::Disconnected { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_values_arrive_with_the_servers_source_timestamps() {
    let sim = Sim::start().await;
    let sensors = sim.sensors_of(PRESS);
    let mut tags: String = sensors.iter().map(value_tag).collect();
    tags += &tag(&format!("{PRESS}/state"), PRESS, "state", false);
    let run = Running::start(config(&sim.endpoint().await, &tags));
    let mut got: Vec<Reading> = Vec::new();
    let ids: Vec<AssetId> = sensors.iter().map(AssetPath::id).collect();
    wait_until("two values of every press sensor", || {
        got.extend(run.sink.take());
        let enough = ids
            .iter()
            .all(|id| got.iter().filter(|r| r.asset == *id).count() >= 2);
        async move { enough }
    })
    .await;
    assert_eq!(run.count(is_connected), 1);
    assert_eq!(run.handle.status().link(), LinkState::Connected);
    let served = sim.served.lock().expect("not poisoned").clone();
    for r in &got {
        assert_eq!(r.quality.code, QualityCode::Good, "{r:?}");
        assert_eq!(
            served.get(&(r.asset, r.property, r.source_ts.0)),
            Some(&r.value),
            "the value the simulator served at that source time: {r:?}"
        );
    }
    let snapshot = run.handle.status().snapshot();
    assert!(snapshot.received >= got.len() as u64);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_server_turns_tags_bad_and_a_new_server_on_the_port_brings_values_back() {
    let sim = Sim::start().await;
    let sensors = sim.sensors_of(PRESS);
    let tags: String = sensors.iter().map(value_tag).collect();
    let run = Running::start(config(&sim.endpoint().await, &tags));
    let first = sensors[0].id();
    wait_until("a first value", || {
        let has = run.sink.take().iter().any(|r| r.asset == first);
        async move { has }
    })
    .await;
    let addr = sim.addr().await;
    {
        let mut p = sim.plant.lock().await;
        p.opcua_mut().expect("serving").stop_site(0).await;
    }
    let mut bad: Vec<Reading> = Vec::new();
    wait_until("Disconnected and a Bad reading per sensor", || {
        bad.extend(
            run.sink
                .take()
                .into_iter()
                .filter(|r| r.quality.code == QualityCode::Bad),
        );
        let done = run.count(is_disconnected) == 1
            && sensors
                .iter()
                .all(|s| bad.iter().any(|r| r.asset == s.id()));
        async move { done }
    })
    .await;
    assert!(
        bad.iter()
            .all(|r| r.quality.reason == QualityReason::CommFailure),
        "{bad:?}"
    );
    assert_ne!(run.handle.status().link(), LinkState::Connected);
    // The PLC comes back on the same port.
    {
        let mut p = sim.plant.lock().await;
        p.serve_opcua_on(&sim.spec, &[addr])
            .await
            .expect("the port can be bound again");
    }
    wait_until("Connected again and Good values", || {
        let good = run
            .sink
            .take()
            .iter()
            .any(|r| r.asset == first && r.quality.code == QualityCode::Good);
        let connected = run.count(is_connected) == 2;
        async move { good && connected }
    })
    .await;
    assert_eq!(run.handle.status().link(), LinkState::Connected);
    assert!(run.handle.status().snapshot().connects >= 2);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_changes_the_simulated_machine_and_the_server_refuses_out_of_range() {
    let sim = Sim::start().await;
    let tags = tag(
        &format!("{PRESS}/speed_setpoint_pct"),
        PRESS,
        "speed_setpoint_pct",
        true,
    ) + &tag(&format!("{PRESS}/state"), PRESS, "state", false);
    let run = Running::start(config(&sim.endpoint().await, &tags));
    let press = AssetPath::parse(PRESS).expect("valid");
    wait_until("connected", || {
        let up = run.handle.status().link() == LinkState::Connected;
        async move { up }
    })
    .await;
    let req = |value| WriteRequest {
        asset: press.clone(),
        property: "speed_setpoint_pct".into(),
        value,
        by: "test".into(),
    };
    run.handle
        .write(req(Value::Int(150)))
        .await
        .expect("written");
    wait_until("the press runs at 150 %", || {
        let plant = Arc::clone(&sim.plant);
        let id = press.id();
        async move {
            let p = plant.lock().await;
            p.sim().speed_pcts().any(|(m, pct)| m == id && pct == 150)
        }
    })
    .await;
    let err = run
        .handle
        .write(req(Value::Int(201)))
        .await
        .expect_err("out of range");
    assert!(
        matches!(&err, WriteError::Refused { error, .. } if error.contains("BadOutOfRange")),
        "{err}"
    );
    let err = run
        .handle
        .write(req(Value::Int(-1)))
        .await
        .expect_err("not a UInt16");
    assert!(matches!(err, WriteError::BadValue { .. }), "{err}");
    let err = run
        .handle
        .write(WriteRequest {
            property: "state".into(),
            ..req(Value::Int(1))
        })
        .await
        .expect_err("read-only");
    assert!(matches!(err, WriteError::NotWritable { .. }), "{err}");
    // The handle refuses the read-only property itself; the task answered three.
    wait_until("three Written events", || {
        let n = run.count(|k| matches!(k, AdapterEventKind::Written { .. }));
        async move { n == 3 }
    })
    .await;
    let written: Vec<Result<WriteAck, String>> = run
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            AdapterEventKind::Written { by, outcome, .. } => {
                assert_eq!(by, "test");
                Some(outcome)
            }
            _ => None,
        })
        .collect();
    assert_eq!(written.len(), 3, "{written:?}");
    assert!(written[0] == Ok(WriteAck::Confirmed) && written[1].is_err() && written[2].is_err());
    let s = run.handle.status().snapshot();
    assert_eq!((s.writes_ok, s.writes_failed), (1, 2));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_node_id_fails_its_tag_while_the_others_flow() {
    let sim = Sim::start().await;
    let sensors = sim.sensors_of(PRESS);
    let ghost = format!("{PRESS}/ghost");
    let tags = value_tag(&sensors[0]) + &tag(&format!("{ghost}/value"), &ghost, "value", false);
    let run = Running::start(config(&sim.endpoint().await, &tags));
    let first = sensors[0].id();
    wait_until(
        "TagFailed for the ghost and values from the real sensor",
        || {
            let flowing = run.sink.take().iter().any(|r| r.asset == first);
            let failed = run.events().iter().any(|e| {
                matches!(&e.kind, AdapterEventKind::TagFailed { tag, error }
                if tag.contains("ghost") && error.contains("BadNodeIdUnknown"))
            });
            async move { flowing && failed }
        },
    )
    .await;
    let ghost_id = AssetPath::parse(&ghost).expect("valid").id();
    assert!(!run.sink.take().iter().any(|r| r.asset == ghost_id));
    assert!(run.handle.status().snapshot().errors >= 1);
    run.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_is_retried_and_stopping_ends_the_task() {
    // Nothing listens on the port of a listener just closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binds")
        .local_addr()
        .expect("addr")
        .port();
    let run = Running::start(config(
        &format!("opc.tcp://127.0.0.1:{port}/"),
        &tag("a/value", "acme/s/a/l/m/t", "value", false),
    ));
    wait_until("two failed attempts", || {
        let errors = run.handle.status().snapshot().errors;
        async move { errors >= 2 }
    })
    .await;
    assert_eq!(run.handle.status().link(), LinkState::Disconnected);
    assert_eq!(run.count(is_connected), 0);
    assert_eq!(
        run.count(is_disconnected),
        0,
        "never connected, nothing lost"
    );
    let status = Arc::clone(run.handle.status());
    run.stop().await;
    assert_eq!(status.link(), LinkState::Stopped);
}

#[test]
fn config_errors_name_the_connection_and_the_tag() {
    let parse = |extra: &str, tags: &str| {
        let text = format!(
            "protocol = \"opcua\"\nname = \"ua\"\nendpoint = \"opc.tcp://127.0.0.1:4840/\"\n{extra}\n{tags}"
        );
        toml::from_str::<ConnectionConfig>(&text).map(|c| c.targets())
    };
    let good = tag("x/value", "acme/s/a/l/m/t", "value", false);
    assert!(matches!(parse("security_policy = \"none\"", &good), Ok(Ok(t)) if t.len() == 1));
    // No message security only when the config names it.
    let e = parse("", &good)
        .expect("parses")
        .expect_err("no policy named");
    assert!(e.to_string().contains("security_policy"), "{e}");
    // A user is a name with a password, or a certificate with its key.
    let e = parse(
        "security_policy = \"none\"\nuser = { name = \"ft\" }",
        &good,
    )
    .expect("parses")
    .expect_err("name without password");
    assert!(e.to_string().contains("password"), "{e}");
    assert!(matches!(
        parse(
            "security_policy = \"none\"\nuser = { name = \"ft\", password_file = \"pw\" }",
            &good
        ),
        Ok(Ok(_))
    ));
    let e = parse(
        "security_policy = \"none\"",
        "[[tags]]\nnode_id = \"nonsense\"\nasset = \"acme/s/a/l/m/t\"\n",
    )
    .expect("parses")
    .expect_err("bad node id");
    assert!(
        e.to_string().contains("\"ua\"") && e.to_string().contains("nonsense"),
        "{e}"
    );
    let e = parse("security_policy = \"basic256sha256\"", &good)
        .expect("parses")
        .expect_err("missing cert");
    assert!(e.to_string().contains("client_cert"), "{e}");
    let e = parse(
        "security_policy = \"none\"\nsecurity_mode = \"sign\"",
        &good,
    )
    .expect("parses")
    .expect_err("mode without policy");
    assert!(e.to_string().contains("security_mode"), "{e}");
    assert!(
        parse("publishing_intervall_ms = 5", &good).is_err(),
        "unknown key"
    );
    let e = toml::from_str::<ConnectionConfig>(
        "protocol = \"opcua\"\nname = \"ua\"\nendpoint = \"http://x\"\nsecurity_policy = \"none\"\n",
    )
    .expect("parses")
    .targets()
    .expect_err("not opc.tcp");
    assert!(e.to_string().contains("opc.tcp"), "{e}");
    // An endpoint no connect could use is refused at start, not at every retry.
    let e = toml::from_str::<ConnectionConfig>(
        "protocol = \"opcua\"\nname = \"ua\"\nendpoint = \"opc.tcp://plc 1:4840/\"\nsecurity_policy = \"none\"\n",
    )
    .expect("parses")
    .targets()
    .expect_err("a space in the host");
    assert!(e.to_string().contains("opc.tcp://plc 1:4840/"), "{e}");
    for (endpoint, ok) in [
        ("opc.tcp://[::1]/", true),
        ("opc.tcp://[::1]:4840/", true),
        ("opc.tcp://plc-7.hall2:4840/UA/Server", true),
        ("opc.tcp://plc:0/", false),
        ("opc.tcp://plc:http/", false),
        ("opc.tcp://[::1/", false),
    ] {
        let c = toml::from_str::<ConnectionConfig>(&format!(
            "protocol = \"opcua\"\nname = \"ua\"\nendpoint = \"{endpoint}\"\nsecurity_policy = \"none\"\n{good}"
        ))
        .expect("parses");
        assert_eq!(c.targets().is_ok(), ok, "{endpoint}");
    }
    // Certificate files that cannot be read are named at start.
    let dir = tempfile::tempdir().expect("dir");
    let (cert, key) = (dir.path().join("c.der"), dir.path().join("k.pem"));
    let secured = format!(
        "security_policy = \"basic256sha256\"\nsecurity_mode = \"sign_and_encrypt\"\nclient_cert = {cert:?}\nclient_key = {key:?}\npki_dir = \"pki\""
    );
    let e = parse(&secured, &good)
        .expect("parses")
        .expect_err("no such files");
    assert!(
        e.to_string().contains("client_cert") && e.to_string().contains("c.der"),
        "{e}"
    );
    std::fs::write(&cert, b"cert").expect("write");
    std::fs::write(&key, b"key").expect("write");
    assert!(matches!(parse(&secured, &good), Ok(Ok(_))));
}

/// Takes batches only while open; counts the refused attempts.
#[derive(Default)]
struct GateSink {
    closed: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU64,
    first_refused: Mutex<Option<Vec<Reading>>>,
    taken: Mutex<Vec<Reading>>,
}

impl ferrotwin_models::IngestSink for GateSink {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), ferrotwin_models::PushBack> {
        use std::sync::atomic::Ordering;
        if self.closed.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            self.first_refused
                .lock()
                .expect("not poisoned")
                .get_or_insert_with(|| batch.clone());
            return Err(ferrotwin_models::PushBack {
                batch,
                why: ferrotwin_models::PushBackReason::Busy,
            });
        }
        self.taken.lock().expect("not poisoned").extend(batch);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_pushing_back_holds_the_adapter_and_the_held_batch_arrives_later() {
    use std::sync::atomic::Ordering;
    let sim = Sim::start().await;
    let sensors = sim.sensors_of(PRESS);
    let tags: String = sensors.iter().map(value_tag).collect();
    let sink = Arc::new(GateSink::default());
    let (tx, mut rx) = mpsc::channel(ferrotwin_adapters::EVENT_QUEUE);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let token = CancellationToken::new();
    let mut handle = ferrotwin_adapters::start(
        config(&sim.endpoint().await, &tags),
        sink.clone(),
        tx,
        token.clone(),
    )
    .expect("valid");
    wait_until("first values", || {
        let n = sink.taken.lock().expect("not poisoned").len();
        async move { n > 0 }
    })
    .await;
    sink.closed.store(true, Ordering::SeqCst);
    wait_until("the adapter retries its batch", || {
        let n = sink.refused.load(Ordering::SeqCst);
        async move { n >= 10 }
    })
    .await;
    let received = handle.status().snapshot().received;
    let before = sink.taken.lock().expect("not poisoned").len();
    wait_until("more retries", || {
        let n = sink.refused.load(Ordering::SeqCst);
        async move { n >= 20 }
    })
    .await;
    assert_eq!(
        handle.status().snapshot().received,
        received,
        "nothing taken"
    );
    assert_eq!(sink.taken.lock().expect("not poisoned").len(), before);
    sink.closed.store(false, Ordering::SeqCst);
    wait_until("values again", || {
        let n = sink.taken.lock().expect("not poisoned").len();
        async move { n > before }
    })
    .await;
    let taken = sink.taken.lock().expect("not poisoned").clone();
    // The batch held while the sink was closed came through first, untouched.
    let held = sink
        .first_refused
        .lock()
        .expect("not poisoned")
        .clone()
        .expect("a batch was refused");
    assert_eq!(&taken[before..before + held.len()], held.as_slice());
    assert_eq!(handle.status().link(), LinkState::Connected);
    token.cancel();
    let join = handle.take_join().expect("joined once");
    tokio::time::timeout(WAIT, join)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic256sha256_sign_and_encrypt_needs_only_config() {
    use opcua::crypto::{CertificateStore, SecurityPolicy, X509Data};
    use opcua::server::address_space::VariableBuilder;
    use opcua::server::diagnostics::NamespaceMetadata;
    use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
    use opcua::server::{ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerEndpoint};
    use opcua::types::{ApplicationDescription, DataTypeId, MessageSecurityMode, NodeId, ObjectId};

    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("client.der"), dir.path().join("client.pem"));
    // The certificate carries the adapter's application URI, as servers check.
    let desc = ApplicationDescription {
        application_uri: "urn:ferrotwin:adapter:secure".into(),
        application_name: "ferrotwin secure".into(),
        ..Default::default()
    };
    CertificateStore::create_certificate_and_key(
        &X509Data::from((desc, Some(vec!["127.0.0.1".to_owned()]))),
        true,
        &cert,
        &key,
    )
    .expect("client certificate");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let port = listener.local_addr().expect("addr").port();
    let endpoint = format!("opc.tcp://127.0.0.1:{port}/");
    let (server, handle) = ServerBuilder::new()
        .application_name("secure test server")
        .application_uri("urn:ferrotwin:secure-test")
        .host("127.0.0.1")
        .port(port)
        .pki_dir(dir.path().join("server-pki"))
        .create_sample_keypair(true)
        .trust_client_certs(true)
        .discovery_urls(vec![endpoint.clone()])
        .add_endpoint(
            "b256",
            ServerEndpoint::new(
                "/",
                SecurityPolicy::Basic256Sha256,
                MessageSecurityMode::SignAndEncrypt,
                &[ANONYMOUS_USER_TOKEN_ID.to_owned()],
            ),
        )
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: "urn:ferrotwin:secure-test:plant".into(),
                ..Default::default()
            },
            "secure",
        ))
        .build()
        .expect("server config");
    let nodes = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .expect("node manager");
    let ns = handle
        .get_namespace_index("urn:ferrotwin:secure-test:plant")
        .expect("namespace");
    let sensor = "acme/s/a/l/m/t";
    VariableBuilder::new(
        &NodeId::new(ns, format!("{sensor}/value")),
        "value",
        "value",
    )
    .data_type(DataTypeId::Double)
    .value(42.5)
    .organized_by(ObjectId::ObjectsFolder)
    .insert(&mut *nodes.address_space().write());
    let _stop = handle.token().clone().drop_guard();
    tokio::spawn(server.run_with(listener));
    let text = format!(
        "protocol = \"opcua\"\nname = \"secure\"\nendpoint = \"{endpoint}\"\n\
         security_policy = \"basic256sha256\"\nsecurity_mode = \"sign_and_encrypt\"\n\
         client_cert = {cert:?}\nclient_key = {key:?}\npki_dir = {pki:?}\ntrust_server_cert = true\n{tags}",
        pki = dir.path().join("client-pki"),
        tags = tag(&format!("{sensor}/value"), sensor, "value", false)
            .replace("ns=2", &format!("ns={ns}")),
    );
    let run = Running::start(toml::from_str(&text).expect("valid config"));
    let id = AssetPath::parse(sensor).expect("valid").id();
    wait_until("the value over an encrypted channel", || {
        let got = run
            .sink
            .take()
            .iter()
            .any(|r| r.asset == id && r.value == Value::Float(42.5));
        async move { got }
    })
    .await;
    run.stop().await;
}

/// Python's asyncua server admitting only the user-name token `ft`: the adapter activates its
/// session with the name and the password from a file and reads values; with a wrong
/// password it never connects and no value arrives (and the password is in no error).
/// Skipped loudly without `python3 -c 'import asyncua'` unless `CI` is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_name_token_against_a_foreign_server_that_requires_one() {
    let has_asyncua = std::process::Command::new("python3")
        .args(["-c", "import asyncua"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_asyncua {
        assert!(
            std::env::var_os("CI").is_none(),
            "python asyncua is missing on CI: .ci/run must pip install asyncua"
        );
        eprintln!("skipped: pip install asyncua");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/foreign/asyncua_users.py"
    );
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg("ua-s3cret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::time::timeout(WAIT, async {
            while let Some(l) = lines.next_line().await.expect("line") {
                if l.starts_with("ready") {
                    return;
                }
            }
        })
        .await
        .expect("the asyncua server starts");
    }
    let dir = tempfile::tempdir().expect("dir");
    let pw = dir.path().join("ua-password");
    let sensor = "acme/s/a/l/m/t";
    let cfg = |user: &str| {
        toml::from_str::<ConnectionConfig>(&format!(
            "protocol = \"opcua\"\nname = \"foreign\"\nendpoint = \"opc.tcp://127.0.0.1:{port}/\"\n\
             security_policy = \"none\"\ntimeout_ms = 3000\nuser = {user}\n\
             [[tags]]\nnode_id = \"ns=2;s=plant.press.temp\"\nasset = \"{sensor}\"\nproperty = \"value\"\n"
        ))
        .expect("config")
    };
    std::fs::write(&pw, "ua-s3cret\n").expect("password file");
    let run = Running::start(cfg(&format!("{{ name = \"ft\", password_file = {pw:?} }}")));
    let id = AssetPath::parse(sensor).expect("path").id();
    let mut got: Vec<Reading> = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.iter().filter(|r| r.asset == id).count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no values under the user-name token: {:?} {:?}",
            run.handle.status().snapshot(),
            run.events()
        );
        got.extend(run.sink.take());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.stop().await;
    let wrong = Running::start(cfg("{ name = \"ft\", password = \"not-the-password\" }"));
    wait_until("the server to refuse the wrong password", || {
        let refused = wrong.handle.status().snapshot().last_error.is_some();
        async move { refused }
    })
    .await;
    let snap = wrong.handle.status().snapshot();
    assert!(wrong.count(is_connected) == 0, "{:?}", wrong.events());
    assert!(wrong.sink.take().is_empty());
    assert!(
        !format!("{snap:?}{:?}", wrong.events()).contains("not-the-password"),
        "the password leaked"
    );
    wrong.stop().await;
    let _ = child.kill().await;
}
