//! The CLI's client commands: thin clients of the gRPC API (`tree`, `get`, `watch`, `query`,
//! `history`, `events`, `ack`). They print for people; errors carry the server's message.

use std::fmt::Write;

use anyhow::{Context, Result};
use ferrotwin_models::Timestamp;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;
use ferrotwin_runtime::names;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub type Client = TwinServiceClient<InterceptedService<Channel, Bearer>>;

/// How to reach a runtime: its address and, with security on, TLS and credentials.
#[derive(Clone, Default)]
pub struct Connect {
    /// `host:port`, `http://…` or `https://…` (TLS is used with `https://` or `ca`).
    pub addr: String,
    /// A bearer token (a JWT or a service token `ftk.…`).
    pub token: Option<String>,
    /// PEM CA the server's certificate must chain to.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate and key (mTLS).
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry (default: the address's host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("domain", &self.domain)
            .finish()
    }
}

/// Adds `authorization: Bearer …` to every call (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub async fn connect(c: &Connect) -> Result<Client> {
    let tls = c.ca.is_some() || c.cert.is_some() || c.addr.starts_with("https://");
    let url = if c.addr.starts_with("http://") || c.addr.starts_with("https://") {
        c.addr.clone()
    } else if tls {
        format!("https://{}", c.addr)
    } else {
        format!("http://{}", c.addr)
    };
    let mut ep = Endpoint::from_shared(url.clone())
        .with_context(|| format!("{url} is not an address"))?
        .tcp_nodelay(true);
    if tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let mut t = ClientTlsConfig::new();
        if let Some(ca) = &c.ca {
            t = t.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&c.cert, &c.key) {
            (Some(cert), Some(key)) => {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => anyhow::bail!("give both --cert and --key for a client certificate"),
        }
        if let Some(d) = &c.domain {
            t = t.domain_name(d.clone());
        }
        ep = ep.tls_config(t).context("TLS settings")?;
    }
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("cannot reach a ferrotwin runtime at {url}"))?;
    let token = match &c.token {
        Some(t) => Some(
            format!("Bearer {}", t.trim())
                .parse()
                .context("the token has characters a header cannot carry")?,
        ),
        None => None,
    };
    Ok(TwinServiceClient::with_interceptor(channel, Bearer(token)))
}

/// `ferrotwin whoami`.
pub async fn whoami(client: &mut Client) -> Result<String> {
    let me = client
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut s = format!("{} (by {})\n", me.subject, me.method);
    for g in me.grants {
        let _ = writeln!(s, "  {:<9} on {}", g.role, g.paths.join(", "));
    }
    Ok(s)
}

/// `ferrotwin audit`: records in seq order, filtered.
pub async fn audit(client: &mut Client, req: pb::ListAuditRequest) -> Result<String> {
    let r = client.list_audit(req).await.map_err(status)?.into_inner();
    let mut s = String::new();
    for a in &r.records {
        let _ = writeln!(
            s,
            "{:>6} {} {:<20} {:<15} {:<11} {} {} -> {}",
            a.seq,
            Timestamp(a.ts_us),
            a.subject,
            a.source,
            a.action,
            a.target,
            if a.value.is_empty() { "-" } else { &a.value },
            a.result
        );
    }
    if r.records.is_empty() {
        s.push_str("no audit records match\n");
    }
    if r.next_after_seq > 0 {
        let _ = writeln!(s, "more: --after {}", r.next_after_seq);
    }
    Ok(s)
}

/// `ferrotwin audit verify`: the chain holds, or the first broken record (an error).
pub async fn audit_verify(client: &mut Client) -> Result<String> {
    let v = client
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if v.intact {
        Ok(format!(
            "audit log intact: {} records, hash chain holds\n",
            v.records
        ))
    } else {
        anyhow::bail!(
            "audit log BROKEN at record {}: {} ({} records checked)",
            v.broken_seq,
            v.broken_reason,
            v.records
        )
    }
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.code(), e.message())
}

fn value_text(v: &Option<pb::Value>) -> String {
    match v.as_ref().and_then(|v| v.kind.as_ref()) {
        Some(pb::value::Kind::Float(f)) => format!("{f:.2}"),
        Some(pb::value::Kind::Int(i)) => i.to_string(),
        Some(pb::value::Kind::Bool(b)) => b.to_string(),
        None => "-".into(),
    }
}

fn quality_text(q: &Option<pb::Quality>) -> String {
    let Some(q) = q else { return "?".into() };
    let code = match pb::QualityCode::try_from(q.code).unwrap_or_default() {
        pb::QualityCode::Good => "good",
        pb::QualityCode::Uncertain => "uncertain",
        pb::QualityCode::Bad => "bad",
        pb::QualityCode::Unspecified => "?",
    };
    if q.reason.is_empty() {
        code.into()
    } else {
        format!("{code}: {}", q.reason)
    }
}

fn alarm_state_text(s: i32) -> &'static str {
    match pb::AlarmState::try_from(s).unwrap_or_default() {
        pb::AlarmState::Normal => "normal",
        pb::AlarmState::ActiveUnacked => "ACTIVE (unacked)",
        pb::AlarmState::ActiveAcked => "active (acked)",
        pb::AlarmState::ReturnedUnacked => "returned (unacked)",
        pb::AlarmState::Unspecified => "?",
    }
}

fn rollup_text(r: &pb::RollUp) -> String {
    let mut s = String::new();
    if r.machines > 0 {
        let _ = write!(s, "{}/{} running", r.running, r.machines);
    }
    if let Some(o) = r.mean_oee {
        let _ = write!(s, "  OEE {:.0}%", o * 100.0);
    }
    if r.throughput_per_h > 0.0 {
        let _ = write!(s, "  {:.0} parts/h", r.throughput_per_h);
    }
    if r.active_alarms > 0 {
        let names = ["info", "low", "medium", "high", "critical"];
        let parts: Vec<String> = r
            .alarms_by_severity
            .iter()
            .zip(names)
            .filter(|(n, _)| **n > 0)
            .map(|(n, name)| format!("{n} {name}"))
            .collect();
        let _ = write!(s, "  ! alarms: {}", parts.join(", "));
    }
    if let Some(h) = r.worst_health {
        let _ = write!(s, "  worst health {h:.0}");
    }
    if r.anomalies > 0 {
        let _ = write!(s, "  ? anomalies: {}", r.anomalies);
    }
    if r.worst_quality > pb::QualityCode::Good as i32 {
        let _ = write!(
            s,
            "  ~ worst quality: {}",
            quality_text(&Some(pb::Quality {
                code: r.worst_quality,
                reason: String::new()
            }))
        );
    }
    s
}

/// One line describing a twin (without indentation).
pub fn twin_line(t: &pb::Twin) -> String {
    if let Some(s) = &t.sensor {
        let mut line = format!("{}  {}", t.name, value_text(&s.value));
        if !s.unit.is_empty() {
            let _ = write!(line, " {}", s.unit);
        }
        let q = quality_text(&s.quality);
        if q != "good" {
            let _ = write!(line, "  [{q}]");
        }
        for a in &s.alarms {
            if a.state != pb::AlarmState::Normal as i32 {
                let _ = write!(
                    line,
                    "  ! {} {} ({})",
                    a.name,
                    alarm_state_text(a.state),
                    names::severity(a.severity)
                );
            }
        }
        if s.anomalous {
            let _ = write!(
                line,
                "  ? anomaly (score {:.1})",
                s.anomaly_score.unwrap_or(0.0)
            );
        }
        return line;
    }
    let mut line = t.name.clone();
    if let Some(m) = &t.machine {
        let _ = write!(line, " ({})  {}", t.r#type, m.state);
        if let Some(o) = &m.oee {
            let _ = write!(line, "  OEE {:.0}%", o.oee * 100.0);
        }
        let _ = write!(line, "  good {}, scrap {}", m.good_count, m.scrap_count);
        if let Some(h) = m.health {
            let _ = write!(line, "  health {h:.0}");
        }
        if let Some(r) = m.rul_hours {
            let _ = write!(line, "  RUL {r:.1} h");
        }
        if m.anomalous {
            let _ = write!(
                line,
                "  ? anomaly (score {:.1})",
                m.anomaly_score.unwrap_or(0.0)
            );
        }
        if let Some(r) = &t.rollup
            && r.active_alarms > 0
        {
            let _ = write!(line, "  ! {} alarm(s)", r.active_alarms);
        }
    } else if let Some(r) = &t.rollup {
        let _ = write!(line, " [{}]  {}", names::level(t.level), rollup_text(r));
    }
    if t.restarts > 0 {
        let _ = write!(line, "  (restarted {}x)", t.restarts);
    }
    line
}

/// The machine's local-inference lines of `ferrotwin get` (empty while nothing is known).
fn inference_text(m: &pb::MachineState) -> String {
    let mut out = String::new();
    if let Some(h) = m.health {
        let _ = writeln!(out, "  health   {h:.1} / 100");
    }
    if let Some(r) = m.rul_hours {
        let _ = writeln!(
            out,
            "  RUL      {r:.1} h (band {:.1} .. {:.1} h)",
            m.rul_low_hours.unwrap_or(r),
            m.rul_high_hours.unwrap_or(r)
        );
    }
    if let Some(a) = m.anomaly_score {
        let open = if m.anomalous { "  ANOMALOUS" } else { "" };
        let _ = writeln!(out, "  anomaly  {a:.2}{open}");
    }
    if let Some(s) = m.model_score {
        let _ = writeln!(out, "  model    {s:.3}");
    }
    out
}

/// Renders `ferrotwin tree`: every twin under `path` down to `depth`, indented.
pub async fn tree(client: &mut Client, path: &str, depth: u32) -> Result<String> {
    let mut out = String::new();
    let mut token = String::new();
    let mut base: Option<usize> = None;
    loop {
        let resp = client
            .browse(pb::BrowseRequest {
                path: path.to_string(),
                depth,
                page_size: 5000,
                page_token: token.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        for t in &resp.twins {
            let d = t.path.split('/').count();
            let b = *base.get_or_insert(d);
            let _ = writeln!(out, "{}{}", "  ".repeat(d.saturating_sub(b)), twin_line(t));
        }
        if resp.next_page_token.is_empty() {
            return Ok(out);
        }
        token = resp.next_page_token;
    }
}

pub async fn get(client: &mut Client, path: &str) -> Result<String> {
    let t = client
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(path.to_string())),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = format!(
        "{}  [{}] {}  id {}\n",
        t.path,
        names::level(t.level),
        t.r#type,
        t.id
    );
    if let Some(s) = &t.sensor {
        let _ = writeln!(out, "  value    {} {}", value_text(&s.value), s.unit);
        let _ = writeln!(out, "  quality  {}", quality_text(&s.quality));
        let _ = writeln!(out, "  source   {}", fmt_us(s.source_ts_us));
        let _ = writeln!(out, "  server   {}", fmt_us(s.server_ts_us));
        if let Some(st) = &s.stats {
            let _ = writeln!(
                out,
                "  stats    n={} mean={:.3} sd={:.3} min={:.3} max={:.3}",
                st.count, st.mean, st.stddev, st.min, st.max
            );
        }
        for a in &s.alarms {
            let _ = writeln!(
                out,
                "  alarm    {} ({} {} {}, deadband {}, {}): {}",
                a.name,
                a.kind,
                if a.kind == "high" { ">" } else { "<" },
                a.limit,
                a.deadband,
                names::severity(a.severity),
                alarm_state_text(a.state)
            );
        }
        if s.rejected > 0 {
            let _ = writeln!(out, "  rejected {}", s.rejected);
        }
        if let Some(a) = s.anomaly_score {
            let open = if s.anomalous { "  ANOMALOUS" } else { "" };
            let _ = writeln!(out, "  anomaly  {a:.2}{open}");
        }
    }
    if let Some(m) = &t.machine {
        let _ = writeln!(
            out,
            "  state    {} since {}",
            m.state,
            fmt_us(m.state_since_us)
        );
        if let Some(o) = &m.oee {
            let _ = writeln!(
                out,
                "  OEE      {:.1}% (availability {:.1}%, performance {:.1}%, quality {:.1}%)",
                o.oee * 100.0,
                o.availability * 100.0,
                o.performance * 100.0,
                o.quality * 100.0
            );
        }
        let _ = writeln!(
            out,
            "  parts    {} good, {} scrap",
            m.good_count, m.scrap_count
        );
        let _ = write!(out, "{}", inference_text(m));
    }
    if let Some(r) = &t.rollup {
        let _ = writeln!(out, "  roll-up  {}", rollup_text(r));
    }
    if t.restarts > 0 {
        let _ = writeln!(out, "  restarts {}", t.restarts);
    }
    Ok(out)
}

/// `rank`: a field to rank by, highest first (`-field`: lowest first).
pub async fn query(
    client: &mut Client,
    expr: &str,
    limit: u32,
    rank: Option<&str>,
) -> Result<String> {
    let (order_by, ascending) = match rank {
        Some(r) => match r.strip_prefix('-') {
            Some(f) => (f.to_string(), true),
            None => (r.to_string(), false),
        },
        None => (String::new(), false),
    };
    let resp = client
        .query(pb::QueryRequest {
            query: expr.to_string(),
            page_size: limit,
            page_token: String::new(),
            order_by,
            ascending,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = String::new();
    for t in &resp.twins {
        let _ = writeln!(
            out,
            "{}  {}",
            t.path,
            twin_line(t).split_once("  ").map_or("", |x| x.1)
        );
    }
    let _ = writeln!(
        out,
        "{} twin(s){}",
        resp.twins.len(),
        if resp.next_page_token.is_empty() {
            ""
        } else {
            " (more: raise --limit)"
        }
    );
    Ok(out)
}

pub async fn history(
    client: &mut Client,
    path: &str,
    property: &str,
    since_s: u64,
    max_points: u32,
) -> Result<String> {
    let now_us = Timestamp::now().0;
    let twin = client
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(path.to_string())),
        })
        .await
        .map_err(status)?
        .into_inner();
    let unit = twin
        .sensor
        .as_ref()
        .map(|s| s.unit.clone())
        .unwrap_or_default();
    let resp = client
        .get_history(pb::GetHistoryRequest {
            path: path.to_string(),
            property: property.to_string(),
            from_us: now_us - (since_s as i64) * 1_000_000,
            to_us: 0,
            max_points,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = String::new();
    for p in &resp.points {
        if p.count > 1 {
            let _ = writeln!(
                out,
                "{}  {:>12.3} {unit}  (min {:.3} max {:.3}, {} pts)",
                fmt_us(p.ts_us),
                p.value,
                p.min,
                p.max,
                p.count
            );
        } else {
            let _ = writeln!(out, "{}  {:>12.3} {unit}", fmt_us(p.ts_us), p.value);
        }
    }
    let _ = writeln!(
        out,
        "{} point(s) from {} raw{}",
        resp.points.len(),
        resp.raw_points,
        if resp.downsampled {
            ", downsampled"
        } else {
            ""
        }
    );
    Ok(out)
}

pub async fn events(client: &mut Client, path: &str, limit: u32) -> Result<String> {
    let mut out = String::new();
    let mut after = 0;
    let mut all = Vec::new();
    // Page to the end and show the newest `limit`.
    loop {
        let resp = client
            .list_events(pb::ListEventsRequest {
                path: path.to_string(),
                after_seq: after,
                limit: 10_000,
                kind: String::new(),
                min_severity: 0,
            })
            .await
            .map_err(status)?
            .into_inner();
        all.extend(resp.events);
        if all.len() > limit as usize {
            let cut = all.len() - limit as usize;
            all.drain(..cut);
        }
        if resp.next_after_seq == 0 {
            break;
        }
        after = resp.next_after_seq;
    }
    for e in &all {
        let _ = writeln!(
            out,
            "{}  #{}  {:<8} {:<9} {}  {}",
            fmt_us(e.ts_us),
            e.seq,
            names::severity(e.severity),
            e.kind,
            e.path,
            e.message
        );
    }
    Ok(out)
}

pub async fn ack(
    client: &mut Client,
    path: &str,
    alarm: &str,
    by: &str,
    comment: &str,
) -> Result<String> {
    let a = client
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            path: path.to_string(),
            alarm: alarm.to_string(),
            by: by.to_string(),
            comment: comment.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .alarm
        .unwrap_or_default();
    Ok(format!(
        "{path}: alarm {} is now {}\n",
        a.name,
        alarm_state_text(a.state)
    ))
}

/// Parses a value as given on the command line: `true`/`false`, an integer, else a float.
pub fn parse_value(s: &str) -> Result<pb::Value> {
    let kind = match s {
        "true" => pb::value::Kind::Bool(true),
        "false" => pb::value::Kind::Bool(false),
        _ => match s.parse::<i64>() {
            Ok(i) => pb::value::Kind::Int(i),
            Err(_) => pb::value::Kind::Float(
                s.parse::<f64>()
                    .with_context(|| format!("{s:?} is not a number, true or false"))?,
            ),
        },
    };
    Ok(pb::Value { kind: Some(kind) })
}

pub async fn write(
    client: &mut Client,
    path: &str,
    property: &str,
    value: &str,
    by: &str,
) -> Result<String> {
    let r = client
        .write_property(pb::WritePropertyRequest {
            path: path.to_string(),
            property: property.to_string(),
            value: Some(parse_value(value)?),
            by: by.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(match r.result.as_str() {
        "unconfirmed" => format!(
            "{path}: {property} = {value} sent through {}: unconfirmed (the broker took it; the device reported nothing back)\n",
            r.connection
        ),
        _ => format!(
            "{path}: {property} = {value} written through {}: confirmed\n",
            r.connection
        ),
    })
}

/// `plant version 3 (applied 2026-12-04T… by user:alice), 1,234 assets`, and the TOML.
/// The rules of the machines at and below `path`, one line each, with their last firing.
pub async fn rules(client: &mut Client, path: &str) -> Result<String> {
    let r = client
        .list_rules(pb::ListRulesRequest {
            path: path.to_owned(),
            limit: 10_000,
        })
        .await
        .map_err(status)?
        .into_inner();
    if r.rules.is_empty() {
        return Ok(format!(
            "no rules at {}\n",
            if path.is_empty() { "the plant" } else { path }
        ));
    }
    let mut out = String::new();
    for rule in &r.rules {
        out.push_str(&rule_line(rule));
    }
    if r.truncated {
        out.push_str("… more rules: name a smaller subtree\n");
    }
    Ok(out)
}

fn rule_line(r: &pb::Rule) -> String {
    let mut out = format!(
        "{} {}: {} {}{}, fired {}",
        r.path,
        r.name,
        r.mode,
        r.phase,
        if r.failed { " FAILED" } else { "" },
        r.firings
    );
    if r.limited > 0 {
        out.push_str(&format!(" (held back {})", r.limited));
    }
    out.push_str(&format!(
        "\n    when {} then {}; re-arm {}\n",
        r.when, r.then, r.rearm
    ));
    if let Some(t) = r.last_fired_us {
        out.push_str(&format!("    last {}: {}\n", Timestamp(t), r.last_result));
    }
    out
}

/// Switches `RULE=MODE` of the machine at `path`.
pub async fn set_rule_mode(client: &mut Client, path: &str, set: &str, by: &str) -> Result<String> {
    let Some((rule, mode)) = set.split_once('=') else {
        anyhow::bail!("--set: write RULE=MODE, e.g. overheat-stop=dry-run");
    };
    let r = client
        .set_rule_mode(pb::SetRuleModeRequest {
            path: path.to_owned(),
            rule: rule.to_owned(),
            mode: mode.to_owned(),
            by: by.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = format!("{path} {rule}: {} → {mode}\n", r.previous);
    if let Some(rule) = &r.rule {
        out.push_str(&rule_line(rule));
    }
    Ok(out)
}

pub async fn plant(client: &mut Client, show: bool) -> Result<String> {
    let p = client
        .get_plant(pb::GetPlantRequest { with_spec: show })
        .await
        .map_err(status)?
        .into_inner();
    let mut out = format!(
        "plant version {} (applied {} by {}), {} assets\n",
        p.version,
        Timestamp(p.applied_us),
        p.applied_by,
        p.assets
    );
    if show {
        out.push('\n');
        out.push_str(&p.plant_toml);
    }
    Ok(out)
}

/// A dry run against the running version (or `expect_version`), its changes printed; then,
/// unless `dry_run`, the apply against that same version.
pub async fn apply(
    client: &mut Client,
    plant_toml: &str,
    site_toml: Option<&str>,
    dry_run: bool,
    expect_version: Option<u64>,
    by: &str,
) -> Result<String> {
    let base = match expect_version {
        Some(v) => v,
        None => {
            client
                .get_plant(pb::GetPlantRequest { with_spec: false })
                .await
                .map_err(status)?
                .into_inner()
                .version
        }
    };
    let request = |dry_run: bool| pb::ApplyPlantRequest {
        plant_toml: plant_toml.to_owned(),
        base_version: base,
        dry_run,
        by: by.to_owned(),
        site_toml: site_toml.unwrap_or_default().to_owned(),
    };
    let plan = client
        .apply_plant(request(true))
        .await
        .map_err(status)?
        .into_inner();
    let mut out = String::new();
    if plan.summary == "+0 −0 ~0" && plan.connections.is_empty() {
        let _ = writeln!(out, "plant version {base}: nothing to change");
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "against plant version {base}: {} assets ({} lines)",
        plan.summary, plan.changes_total
    );
    for c in &plan.changes {
        let mark = match c.op.as_str() {
            "added" => '+',
            "removed" => '-',
            _ => '~',
        };
        let _ = writeln!(out, "{mark} {}  {}", c.path, c.detail);
    }
    if plan.changes_total > plan.changes.len() as u64 {
        let _ = writeln!(
            out,
            "… and {} more",
            plan.changes_total - plan.changes.len() as u64
        );
    }
    for c in &plan.connections {
        let _ = writeln!(out, "connection {} {}", c.name, c.op);
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    if dry_run {
        out.push_str("dry run: nothing applied\n");
        return Ok(out);
    }
    // The plan is on the screen before the change is made.
    print!("{out}");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    out.clear();
    let done = client
        .apply_plant(request(false))
        .await
        .map_err(status)?
        .into_inner();
    let _ = writeln!(out, "applied: plant version {} → {}", base, done.version);
    Ok(out)
}

pub async fn fleet_push(
    client: &mut Client,
    site: &str,
    plant_toml: String,
    site_toml: String,
    by: &str,
) -> Result<String> {
    let r = client
        .push_template(pb::PushTemplateRequest {
            site: site.to_owned(),
            plant_toml,
            site_toml,
            by: by.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(if r.new_version {
        format!(
            "{site}: template v{} kept; the site applies it now, or on its next connection\n",
            r.version
        )
    } else {
        format!("{site}: the same as template v{}; nothing new\n", r.version)
    })
}

pub async fn fleet_status(client: &mut Client) -> Result<String> {
    let r = client
        .fleet_status(pb::FleetStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut out = String::new();
    for s in r.sites {
        let state = match (s.desired, s.applied) {
            (0, _) => "no template".to_owned(),
            (d, a) if d == a => "up to date".to_owned(),
            (d, 0) => format!("pending (v{d} not applied yet)"),
            (d, _) => format!("behind (v{d} not applied yet)"),
        };
        let _ = writeln!(
            out,
            "{}  desired v{}  applied v{}  {}{}{}",
            s.site,
            s.desired,
            s.applied,
            state,
            if s.connected { "" } else { "  (not connected)" },
            if s.error.is_empty() {
                String::new()
            } else {
                format!("\n    error: {}", s.error)
            }
        );
    }
    Ok(out)
}

pub async fn fleet_rollback(client: &mut Client, site: &str, to: u64, by: &str) -> Result<String> {
    let r = client
        .rollback_template(pb::RollbackTemplateRequest {
            site: site.to_owned(),
            to_version: to,
            by: by.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    Ok(format!(
        "{site}: rolled back as template v{}; the site applies it now, or on its next connection\n",
        r.version
    ))
}

pub async fn replication(client: &mut Client) -> Result<String> {
    let s = client
        .get_replication_status(pb::GetReplicationStatusRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut out = format!("role: {}\n", s.role);
    if let Some(l) = s.link {
        let _ = writeln!(
            out,
            "site {} -> {} ({}){}",
            l.site,
            l.enterprise,
            if l.connected {
                "connected"
            } else {
                "not connected"
            },
            if l.last_error.is_empty() {
                String::new()
            } else {
                format!(", last error: {}", l.last_error)
            }
        );
        let _ = writeln!(
            out,
            "outbox: {} batches, {} bytes, oldest unacked {} ms; seq {} acked {}; sent {} batches / {} bytes in {} connections; compacted {}, events dropped {}",
            l.outbox_batches,
            l.outbox_bytes,
            l.oldest_unacked_age_ms,
            l.last_seq,
            l.acked_seq,
            l.batches_sent,
            l.bytes_sent,
            l.connects,
            l.compacted,
            l.dropped_events
        );
    }
    for m in s.sites {
        let age = if m.age_ms < 0 {
            "never synced".to_string()
        } else {
            format!("synced {} ms ago", m.age_ms)
        };
        let _ = writeln!(
            out,
            "{:<24} applied seq {:>8}  {age}  batches {}  duplicates {}  unknown twins {}  \
             event seq {}  duplicate events {}  event gaps {}  refused {}  skipped {}  rewinds {}  streams refused {}",
            m.site,
            m.applied_seq,
            m.batches,
            m.duplicates,
            m.unknown_twins,
            m.event_seq,
            m.duplicate_events,
            m.event_gaps,
            m.refused,
            m.skipped_batches,
            m.rewinds,
            m.streams_refused
        );
    }
    Ok(out)
}

pub async fn connections(client: &mut Client) -> Result<String> {
    let list = client
        .list_connections(pb::ListConnectionsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .connections;
    if list.is_empty() {
        return Ok("no PLC connections configured\n".into());
    }
    let mut out = String::new();
    for c in list {
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<13} {:<28} tags {:>6}  received {:>10}  rejected {:>6}  errors {:>6}  connects {:>4}  writes {}/{}{}",
            c.name,
            c.protocol,
            c.link,
            c.endpoint,
            c.tags,
            c.received,
            c.rejected,
            c.errors,
            c.connects,
            c.writes_ok,
            c.writes_ok + c.writes_failed,
            if c.last_error.is_empty() {
                String::new()
            } else {
                format!("  last error: {}", c.last_error)
            }
        );
    }
    Ok(out)
}

/// Prints changes under `path` as they come, until the stream ends or `max` items.
pub async fn watch(
    client: &mut Client,
    path: &str,
    events: bool,
    max: Option<usize>,
) -> Result<()> {
    let mut stream = client
        .watch(pb::WatchRequest {
            path: path.to_string(),
            events,
            skip_snapshot: true,
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut n = 0;
    while let Some(item) = stream.message().await.map_err(status)? {
        match item.item {
            Some(pb::watch_response::Item::Change(t)) => println!(
                "{}  {}",
                fmt_us(t.updated_us),
                t.path.clone() + "  " + twin_line(&t).split_once("  ").map_or("", |x| x.1)
            ),
            Some(pb::watch_response::Item::Event(e)) => println!(
                "{}  EVENT {} {} {}: {}",
                fmt_us(e.ts_us),
                names::severity(e.severity),
                e.kind,
                e.path,
                e.message
            ),
            Some(pb::watch_response::Item::Lagged(l)) => {
                println!("-- lagged: {} change(s) skipped, resyncing", l.skipped)
            }
            _ => {}
        }
        n += 1;
        if max.is_some_and(|m| n >= m) {
            break;
        }
    }
    Ok(())
}

/// A timestamp for people; 0 (never set) is "-".
fn fmt_us(us: i64) -> String {
    if us == 0 {
        "-".into()
    } else {
        ferrotwin_models::Timestamp(us).to_string()
    }
}
