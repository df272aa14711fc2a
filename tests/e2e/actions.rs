//! Local actions end to end: rules in the plant spec, evaluated in the machine twins, acting
//! on the simulator's Modbus PLCs through the write path, with the enterprise link down.

use std::time::Duration;

use ferrotwin_cli::feeds;
use ferrotwin_models::spec::{MachineInstance, PlantSpec};
use ferrotwin_models::{AssetPath, Timestamp};
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::SiteReplication;
use ferrotwin_sim::generate::generate;
use ferrotwin_sim::scenario::Scenario;
use ferrotwin_sim::serve::ServedPlant;
use std::sync::Arc;
use tokio::task::JoinHandle;

use crate::common::*;

/// A two-line plant whose first line is two ovens (the second line: whatever the seed
/// makes), with `rules` (TOML of `[[machine_types.oven.rules]]` entries) on the oven type.
fn oven_plant(rules: &str) -> PlantSpec {
    oven_plant_with(rules, |_| {})
}

/// As `oven_plant`, `tweak` changing the plant before the rules are added.
fn oven_plant_with(rules: &str, tweak: impl FnOnce(&mut PlantSpec)) -> PlantSpec {
    let mut spec = generate(TWO_LINES, 3);
    tweak(&mut spec);
    spec.sites[0].areas[0].lines[0].machines = vec![MachineInstance {
        count: Some(2),
        ..MachineInstance::new("oven", "oven")
    }];
    let with_rules = format!("{}\n{rules}", spec.to_toml());
    PlantSpec::from_toml(&with_rules, "ovens").expect("a valid plant with rules")
}

fn oven(spec: &PlantSpec, i: usize) -> String {
    let s = &spec.sites[0];
    format!(
        "{}/{}/{}/{}/oven-{i}",
        spec.enterprise, s.name, s.areas[0].name, s.areas[0].lines[0].name
    )
}

struct Rig {
    plant: Arc<tokio::sync::Mutex<ServedPlant>>,
    stepper: JoinHandle<()>,
    site: Site,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn stop(self) {
        self.stepper.abort();
        self.site.rt.shutdown().await;
    }

    /// Stops the site and starts it again on its data dir with `spec` (the PLCs go on).
    async fn restart(mut self, spec: &PlantSpec) -> Rig {
        self.site.rt.shutdown().await;
        let opts = site_options(spec, &*self.plant.lock().await);
        self.site = start_plant_in(spec, self._dir.path(), opts).await;
        self
    }

    async fn run_enabled(&self, machine: &str) -> bool {
        let id = AssetPath::parse(machine).expect("valid").id();
        self.plant
            .lock()
            .await
            .sim()
            .machine_statuses()
            .find(|m| m.machine == id)
            .expect("a simulated machine")
            .run_enabled
    }

    async fn actions(&self, machine: &str) -> Vec<pb::Event> {
        let mut c = self.site.client.clone();
        events(&mut c, machine)
            .await
            .into_iter()
            .filter(|e| e.kind == "action")
            .collect()
    }

    async fn rules(&self, path: &str) -> Vec<pb::Rule> {
        self.site
            .client
            .clone()
            .list_rules(pb::ListRulesRequest {
                path: path.into(),
                limit: 0,
            })
            .await
            .expect("list rules")
            .into_inner()
            .rules
    }
}

/// The site's audit records, oldest first (the first 100).
async fn audit(
    c: &mut pb::twin_service_client::TwinServiceClient<tonic::transport::Channel>,
) -> Vec<pb::AuditRecord> {
    c.list_audit(pb::ListAuditRequest {
        limit: 100,
        ..Default::default()
    })
    .await
    .expect("audit")
    .into_inner()
    .records
}

/// A site polling `plant` over Modbus TCP every 50 ms and replicating to an enterprise that
/// is not there.
fn site_options(spec: &PlantSpec, plant: &ServedPlant) -> ferrotwin_runtime::RuntimeOptions {
    let mut opts = options();
    opts.connections = feeds::modbus_connections(spec, plant, 50, |_| true).expect("configs");
    // Replication to a port nobody listens on: every action happens with the link down.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut r = SiteReplication::new(format!("http://{dead}"));
    r.reconnect_min_ms = 20;
    r.reconnect_max_ms = 200;
    opts.replication = Some(r);
    opts
}

/// The plant served over Modbus TCP (polled every 50 ms), `overheat` scheduling an
/// overheating of that oven from the start; the site replicates to an enterprise that is
/// not there (the link is down the whole test).
async fn rig(spec: PlantSpec, overheat: Option<&str>) -> Rig {
    let faults = overheat
        .map(|m| {
            format!(
                "[[faults]]\nasset = \"{m}\"\nkind = \"overheating\"\nat = \"0s\"\nduration = \"10m\"\n"
            )
        })
        .unwrap_or_default();
    let scenario = Scenario::from_toml(
        &format!("version = 1\nrandom_faults = false\n{faults}"),
        std::path::Path::new("scenario.toml"),
        &spec,
    )
    .expect("a valid scenario");
    let plant = ServedPlant::start_with_scenario(&spec, 5, Timestamp::now(), &scenario)
        .await
        .expect("PLCs start");
    let opts = site_options(&spec, &plant);
    let plant = Arc::new(tokio::sync::Mutex::new(plant));
    let stepper = {
        let plant = plant.clone();
        tokio::spawn(async move {
            loop {
                plant
                    .lock()
                    .await
                    .tick(Timestamp::now())
                    .await
                    .expect("the plant steps");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let dir = tempfile::tempdir().expect("dir");
    let site = start_plant_in(&spec, dir.path(), opts).await;
    Rig {
        plant,
        stepper,
        site,
        _dir: dir,
    }
}

const OVERHEAT_STOP: &str = r#"
[[machine_types.oven.rules]]
name = "overheat-stop"
mode = "MODE"
when = { alarm = "*.high", severity = "critical" }
then = { write = { property = "run_enable", value = false }, event = { severity = "high", message = "oven stopped: zone overheating" } }
rearm = "cleared"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overheating_oven_is_stopped_by_its_rule_over_modbus_with_the_enterprise_link_down() {
    let spec = oven_plant(&OVERHEAT_STOP.replace("MODE", "enabled"));
    let (hot, cool) = (oven(&spec, 1), oven(&spec, 2));
    let rig = rig(spec, Some(&hot)).await;
    assert!(rig.run_enabled(&hot).await);
    // The zone heats past its critical limit; after the alarm's on-delay the rule writes
    // the run enable coil, and the simulated oven stops.
    let fired = wait_for(90, "the rule's action event", || async {
        rig.actions(&hot)
            .await
            .into_iter()
            .find(|e| e.message.contains("wrote run_enable = false"))
    })
    .await;
    assert_eq!(fired.alarm, "overheat-stop");
    assert_eq!(fired.severity, pb::Severity::High as i32, "{fired:?}");
    for part in [
        "oven stopped: zone overheating: rule overheat-stop fired on alarm *.high active, critical or worse (event ",
        "PLC confirmed (via ",
        " ms from the reading",
    ] {
        assert!(
            fired.message.contains(part),
            "{part:?} in {}",
            fired.message
        );
    }
    // The trigger is the alarm's own event.
    let seq: u64 = fired
        .message
        .split("(event ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .expect("the trigger's seq");
    let mut c = rig.site.client.clone();
    let trigger = events(&mut c, &hot)
        .await
        .into_iter()
        .find(|e| e.seq == seq)
        .expect("the trigger event");
    assert_eq!(
        (trigger.kind.as_str(), trigger.alarm.as_str()),
        ("alarm", "high")
    );
    assert!(
        trigger.path.starts_with(&hot) && trigger.message.contains("raised"),
        "{trigger:?}"
    );
    wait_for(10, "the coil applied by the simulated oven", || async {
        (!rig.run_enabled(&hot).await).then_some(())
    })
    .await;
    wait_for(60, "the stopped oven's twin idle", || {
        let (mut c, m) = (c.clone(), hot.clone());
        async move {
            let t = get(&mut c, &m).await;
            (t.machine.as_ref()?.state == "idle").then_some(())
        }
    })
    .await;
    // Once: the alarm still holds, the rule is latched until it clears.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fired: Vec<_> = rig
        .actions(&hot)
        .await
        .into_iter()
        .filter(|e| e.message.contains("fired"))
        .collect();
    assert_eq!(fired.len(), 1, "{fired:?}");
    let rules = rig.rules(&hot).await;
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(
        (r.phase.as_str(), r.firings, r.failed),
        ("latched", 1, false),
        "{r:?}"
    );
    assert!(r.last_result.contains("PLC confirmed"), "{r:?}");
    // The other oven did not overheat: armed, never fired, still running.
    let other = rig.rules(&cool).await;
    assert_eq!((other[0].phase.as_str(), other[0].firings), ("armed", 0));
    assert!(rig.run_enabled(&cool).await);
    assert!(rig.actions(&cool).await.is_empty());
    // All of it with the enterprise out of reach.
    let status = c
        .get_replication_status(pb::GetReplicationStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let link = status.link.expect("a site link");
    assert!(!link.connected && link.outbox_batches > 0, "{link:?}");
    // The write is on the audit log as the rule's, as a manual write would be.
    let audit = audit(&mut c).await;
    let writes: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "write" && a.subject == "rule:overheat-stop")
        .map(|a| (a.target.clone(), a.result.clone()))
        .collect();
    assert_eq!(
        writes,
        [
            (format!("{hot}.run_enable"), "requested".to_string()),
            (format!("{hot}.run_enable"), "ok".to_string())
        ]
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_rule_records_what_it_would_do_and_writes_nothing_until_enabled() {
    let spec = oven_plant(&OVERHEAT_STOP.replace("MODE", "dry-run"));
    let hot = oven(&spec, 1);
    let rig = rig(spec, Some(&hot)).await;
    let fired = wait_for(90, "the dry run's action event", || async {
        rig.actions(&hot)
            .await
            .into_iter()
            .find(|e| e.message.contains("fired (dry-run)"))
    })
    .await;
    assert!(
        fired
            .message
            .contains("dry-run: would write run_enable = false; nothing written"),
        "{}",
        fired.message
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rig.run_enabled(&hot).await, "a dry run wrote to the PLC");
    let mut c = rig.site.client.clone();
    // No write reached the audit log or the event log.
    assert!(!events(&mut c, &hot).await.iter().any(|e| e.kind == "write"));
    // Switched at run time: audited, evented, listed. Enabled, the latched rule acts once
    // its condition clears and comes back; disabled, never.
    let r = c
        .set_rule_mode(pb::SetRuleModeRequest {
            path: hot.clone(),
            rule: "overheat-stop".into(),
            mode: "disabled".into(),
            by: "ann".into(),
        })
        .await
        .expect("switched")
        .into_inner();
    assert_eq!(r.previous, "dry-run");
    let rule = r.rule.expect("the rule");
    assert_eq!(
        (rule.mode.as_str(), rule.phase.as_str()),
        ("disabled", "armed")
    );
    let err = c
        .set_rule_mode(pb::SetRuleModeRequest {
            path: hot.clone(),
            rule: "no-such-rule".into(),
            mode: "enabled".into(),
            by: "ann".into(),
        })
        .await
        .expect_err("no such rule");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(err.message().contains("overheat-stop"), "{err}");
    let err = c
        .set_rule_mode(pb::SetRuleModeRequest {
            path: hot.clone(),
            rule: "overheat-stop".into(),
            mode: "on".into(),
            by: "ann".into(),
        })
        .await
        .expect_err("no such mode");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Enabled again while the alarm still holds: armed (disabled re-arms), it acts now.
    c.set_rule_mode(pb::SetRuleModeRequest {
        path: hot.clone(),
        rule: "overheat-stop".into(),
        mode: "enabled".into(),
        by: "ann".into(),
    })
    .await
    .expect("enabled");
    wait_for(30, "the enabled rule's write", || async {
        rig.actions(&hot)
            .await
            .into_iter()
            .find(|e| e.message.contains("wrote run_enable = false"))
    })
    .await;
    wait_for(10, "the coil applied by the simulated oven", || async {
        (!rig.run_enabled(&hot).await).then_some(())
    })
    .await;
    let switched: Vec<_> = rig
        .actions(&hot)
        .await
        .into_iter()
        .filter(|e| e.message.contains("switched"))
        .map(|e| e.message)
        .collect();
    assert_eq!(
        switched,
        [
            "rule overheat-stop switched dry-run → disabled by ann",
            "rule overheat-stop switched disabled → enabled by ann"
        ]
    );
    let audit = audit(&mut c).await;
    let modes: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "rule-mode" && a.result == "ok")
        .map(|a| a.value.as_str())
        .collect();
    assert_eq!(modes, ["disabled", "enabled"]);
    // The web page's JSON: the rule with its mode and last firing, the actions by kind.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    rig.site.rt.serve_http(listener).expect("serve http");
    let get = |url: String| async move {
        let r = reqwest::get(&url).await.expect("request");
        assert_eq!(r.status().as_u16(), 200, "{url}");
        r.json::<serde_json::Value>().await.expect("json")
    };
    let line = hot.rsplit_once('/').expect("a machine under a line").0;
    let page = get(format!("{base}/api/v1/rules?path={line}")).await;
    let row = page["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["path"] == hot.as_str())
        .expect("the hot oven's rule, listed from its line")
        .clone();
    assert_eq!(row["name"], "overheat-stop", "{row}");
    assert_eq!(row["mode"], "enabled", "{row}");
    assert!(row["firings"].as_u64().expect("firings") >= 1, "{row}");
    assert!(
        row["last_result"]
            .as_str()
            .is_some_and(|t| t.contains("wrote run_enable = false")),
        "{row}"
    );
    let evs = get(format!("{base}/api/v1/events?path={hot}&kind=action")).await;
    let evs = evs["events"].as_array().expect("events");
    assert!(!evs.is_empty() && evs.iter().all(|e| e["kind"] == "action"));
    rig.stop().await;
}

/// An engineer's switch outlives a restart: the rule comes back in the mode it was switched
/// to, not the spec's, until a spec that changes the rule's mode says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_switched_at_run_time_keeps_its_mode_across_restarts_until_the_spec_changes_it() {
    let spec = oven_plant(&OVERHEAT_STOP.replace("MODE", "enabled"));
    let m = oven(&spec, 1);
    let rig = rig(spec.clone(), None).await;
    let mode = |rules: Vec<pb::Rule>| {
        rules
            .into_iter()
            .find(|r| r.name == "overheat-stop")
            .map(|r| r.mode)
            .expect("the rule")
    };
    assert_eq!(mode(rig.rules(&m).await), "enabled");
    rig.site
        .client
        .clone()
        .set_rule_mode(pb::SetRuleModeRequest {
            path: m.clone(),
            rule: "overheat-stop".into(),
            mode: "disabled".into(),
            by: "ann".into(),
        })
        .await
        .expect("switched");
    let rig = rig.restart(&spec).await;
    assert_eq!(
        mode(rig.rules(&m).await),
        "disabled",
        "kept across a restart"
    );
    // The other oven was never switched.
    assert_eq!(mode(rig.rules(&oven(&spec, 2)).await), "enabled");
    // The spec now says dry-run: the newer word wins over the switch.
    let dry = oven_plant(&OVERHEAT_STOP.replace("MODE", "dry-run"));
    let rig = rig.restart(&dry).await;
    assert_eq!(mode(rig.rules(&m).await), "dry-run");
    let rig = rig.restart(&spec).await;
    assert_eq!(
        mode(rig.rules(&m).await),
        "enabled",
        "the old switch is gone"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_and_max_firings_bound_a_rule_and_its_own_write_never_retriggers_it() {
    // `machines = 1` holds on every machine, all the time.
    let spec = oven_plant(
        r#"
[[machine_types.oven.rules]]
name = "tick"
when = { query = "machines = 1" }
then = { event = { severity = "low", message = "tick" } }
rearm = { cooldown_ms = 200 }
max_firings = { count = 3, window_ms = 600000 }

[[machine_types.oven.rules]]
name = "keep-enabled"
when = { query = "machines = 1" }
then = { write = { property = "run_enable", value = true } }
"#,
    );
    let m = oven(&spec, 1);
    let rig = rig(spec, None).await;
    let held = wait_for(30, "the rule held back by max_firings", || async {
        rig.actions(&m)
            .await
            .into_iter()
            .find(|e| e.alarm == "tick" && e.message.contains("held back"))
    })
    .await;
    assert!(
        held.message
            .contains("rule tick held back: it fired 3 times in 600000 ms (max_firings)"),
        "{}",
        held.message
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let actions = rig.actions(&m).await;
    let ticks: Vec<_> = actions
        .iter()
        .filter(|e| e.alarm == "tick" && e.message.starts_with("tick: rule tick fired"))
        .collect();
    assert_eq!(ticks.len(), 3, "{ticks:?}");
    // Cooled down between firings: at least 200 ms apart.
    for w in ticks.windows(2) {
        assert!(w[1].ts_us - w[0].ts_us >= 200_000, "{ticks:?}");
    }
    // Held back once, and then quiet: limited until the window passes.
    assert_eq!(
        actions
            .iter()
            .filter(|e| e.message.contains("held back"))
            .count(),
        1
    );
    let rules = rig.rules(&m).await;
    let tick = rules.iter().find(|r| r.name == "tick").expect("listed");
    assert_eq!(
        (tick.phase.as_str(), tick.firings, tick.limited),
        ("limited", 3, 1)
    );
    // The write's own effects (its confirmation, the readings after) find the rule latched:
    // it wrote once, though its condition held throughout.
    let keep: Vec<_> = actions
        .iter()
        .filter(|e| e.alarm == "keep-enabled")
        .collect();
    assert_eq!(keep.len(), 1, "{keep:?}");
    assert!(
        keep[0]
            .message
            .contains("wrote run_enable = true, PLC confirmed"),
        "{keep:?}"
    );
    let keep = rules
        .iter()
        .find(|r| r.name == "keep-enabled")
        .expect("listed");
    assert_eq!((keep.phase.as_str(), keep.firings), ("latched", 1));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plc_that_refuses_the_write_raises_the_rules_alarm_on_the_machine() {
    // The plant spec takes up to 300 %; the simulated PLC refuses anything above 200 %
    // (Modbus IllegalDataValue).
    let spec = oven_plant_with(
        r#"
[[machine_types.oven.rules]]
name = "overdrive"
when = { query = "machines = 1" }
then = { write = { property = "speed_setpoint_pct", value = 250 } }
"#,
        |spec| {
            let oven_type = spec.machine_types.get_mut("oven").expect("oven");
            oven_type
                .setpoints
                .iter_mut()
                .find(|s| s.name == "speed_setpoint_pct")
                .expect("listed")
                .max = Some(300.0);
        },
    );
    let m = oven(&spec, 1);
    let rig = rig(spec, None).await;
    let failed = wait_for(30, "the refused action", || async {
        rig.actions(&m)
            .await
            .into_iter()
            .find(|e| e.alarm == "overdrive")
    })
    .await;
    assert!(
        failed
            .message
            .contains("write speed_setpoint_pct = 250 failed:"),
        "{}",
        failed.message
    );
    assert_eq!(failed.severity, pb::Severity::High as i32);
    let mut c = rig.site.client.clone();
    // The machine's own alarm, in its roll-up until acknowledged.
    let alarm = events(&mut c, &m)
        .await
        .into_iter()
        .find(|e| e.kind == "alarm" && e.alarm == "rule:overdrive")
        .expect("the rule's alarm");
    assert!(
        alarm.message.contains("the rule's action failed"),
        "{alarm:?}"
    );
    let rules = rig.rules(&m).await;
    assert!(rules[0].failed, "{rules:?}");
    wait_for(10, "the alarm in the machine's roll-up", || {
        let (mut c, m) = (c.clone(), m.clone());
        async move {
            let t = get(&mut c, &m).await;
            let r = t.rollup?;
            (r.unacked_alarms >= 1).then_some(())
        }
    })
    .await;
    c.acknowledge_alarm(pb::AcknowledgeAlarmRequest {
        path: m.clone(),
        alarm: "rule:overdrive".into(),
        by: "ann".into(),
        ..Default::default()
    })
    .await
    .expect("acknowledged");
    assert!(!rig.rules(&m).await[0].failed);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_no_connection_can_carry_out_is_refused_at_start_naming_rule_and_property() {
    let spec = oven_plant(
        r#"
[[machine_types.oven.rules]]
name = "overheat-stop"
when = { alarm = "*.high" }
then = { write = { property = "run_enable", value = false } }

[[machine_types.oven.rules]]
name = "odd-query"
when = { query = "no-such-sensor > 3" }
then = { event = { severity = "low" } }
"#,
    );
    let dir = tempfile::tempdir().expect("dir");
    let err = ferrotwin_runtime::Runtime::start(&spec, dir.path(), options())
        .await
        .err()
        .expect("refused at start")
        .to_string();
    for part in [
        format!(
            "{}: rule \"overheat-stop\" writes \"run_enable\", which no connection writes",
            oven(&spec, 1)
        ),
        format!("{}: rule \"overheat-stop\"", oven(&spec, 2)),
        "rule \"odd-query\": when.query".to_string(),
        "no-such-sensor".to_string(),
    ] {
        assert!(err.contains(&part), "{part} in {err}");
    }
    // Disabled, it starts (and can be enabled only where a connection writes it).
    let spec = oven_plant(
        r#"
[[machine_types.oven.rules]]
name = "overheat-stop"
mode = "disabled"
when = { alarm = "*.high" }
then = { write = { property = "run_enable", value = false } }
"#,
    );
    let site = start_plant_in(&spec, dir.path(), options()).await;
    let err = site
        .client
        .clone()
        .set_rule_mode(pb::SetRuleModeRequest {
            path: oven(&spec, 1),
            rule: "overheat-stop".into(),
            mode: "enabled".into(),
            by: "ann".into(),
        })
        .await
        .expect_err("no writer");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("no connection writes"), "{err}");
    site.rt.shutdown().await;
}

#[test]
fn rules_that_cannot_work_are_refused_at_load_naming_type_rule_and_field() {
    for (rule, says) in [
        (
            "when = { alarm = \"*.low\" }\nthen = { event = { severity = \"low\" } }",
            "no sensor of the machine has an alarm \"*.low\"",
        ),
        (
            "when = { alarm = \"*.high\" }\nthen = { write = { property = \"spindle\", value = 1 } }",
            "then.write.property \"spindle\" is no setpoint of the machine",
        ),
        (
            "when = { alarm = \"*.high\" }\nthen = { write = { property = \"speed_setpoint_pct\", value = 999 } }",
            "then.write.value",
        ),
        (
            "when = { health_below = 40 }\nthen = { event = { severity = \"low\" } }\nrearm = \"acknowledged\"",
            "rearm = \"acknowledged\" needs an alarm condition",
        ),
        (
            "when = { alarm = \"*.high\" }\nthen = {}",
            "then: give a write, an event, or both",
        ),
    ] {
        let text = format!(
            "{}\n[[machine_types.oven.rules]]\nname = \"r\"\n{rule}\n",
            generate(TWO_LINES, 3).to_toml()
        );
        let err = PlantSpec::from_toml(&text, "p")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("machine type \"oven\": rule \"r\""), "{err}");
        assert!(err.contains(says), "{says} in {err}");
    }
}
