//! Local actions: the executor that carries out machines' rule firings, and the calls that
//! list rules and switch their modes.
//!
//! A firing comes off the bounded action queue (`twin::rules::ActionRequest`) and is carried
//! out through the manual write path, `TwinApi::write`, as the rule's own caller
//! (`Caller::rule`: engineer on its machine only): the same plant-spec checks, the audit
//! record before and after, the connection's checks and the PLC's answer. Every firing is an
//! `action` event (the rule, its trigger's event seq, what was written, the answer, the
//! latency from the triggering reading); the machine hears the result (`TwinMsg::ActionDone`)
//! and raises the rule's alarm when it failed. Writes to different PLCs run side by side, at
//! most `MAX_IN_FLIGHT` at once.

use std::sync::Arc;

use ferrotwin_models::rule::{RuleMode, RuleRun, RuleSpec};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetPath, Event, EventKind, Severity, Timestamp};
use ferrotwin_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ApiError, AuditEntry, TwinApi, bounded};
use crate::core::{ActionDone, TwinMsg, TwinState};
use crate::security::{Caller, Role};
use crate::twin::rules::{ActionRequest, rules_of};

/// Actions carried out at once (each waits on its PLC's answer, bounded by the connection's
/// write timeout).
pub const MAX_IN_FLIGHT: usize = 64;
/// Mode switches run one at a time (they are rare and human).
static SWITCHES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Most rules one `ListRules` answers with.
pub const MAX_LIST_RULES: usize = 10_000;

/// Runs the executor until `token` is cancelled (or every twin's sender is gone).
pub async fn run(api: TwinApi, mut rx: mpsc::Receiver<ActionRequest>, token: CancellationToken) {
    let api = Arc::new(api);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let req = tokio::select! {
            r = rx.recv() => r,
            () = token.cancelled() => None,
        };
        let Some(req) = req else { break };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let api = api.clone();
        tasks.spawn(async move {
            let _slot = slot;
            api.act(req).await;
        });
    }
    tasks.close();
    // The writes on their way end within their connections' timeouts.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait()).await;
}

impl TwinApi {
    /// Carries out one firing: the write (or, in dry-run, what it would be), the `action`
    /// event, the answer to the machine.
    async fn act(&self, req: ActionRequest) {
        let mut ok = true;
        let mut did = Vec::new();
        if let Some(w) = &req.write {
            let value = w.value.value();
            if req.dry_run {
                let refused = self.ctx.registry.by_path(&req.machine).and_then(|e| {
                    super::refused_by_spec(&e.def.kind, &req.machine, &w.property, value)
                });
                did.push(match refused {
                    None => format!("dry-run: would write {} = {value}; nothing written", w.property),
                    Some(why) => format!(
                        "dry-run: would write {} = {value}, which the plant spec refuses ({why}); nothing written",
                        w.property
                    ),
                });
            } else {
                let caller = Caller::rule(&req.rule, &req.machine);
                let answer = self
                    .write(
                        &caller,
                        pb::WritePropertyRequest {
                            path: req.machine.to_string(),
                            property: w.property.clone(),
                            value: Some(super::convert::value(value)),
                            by: String::new(),
                        },
                    )
                    .await;
                did.push(match answer {
                    Ok(r) => format!(
                        "wrote {} = {value}, PLC {} (via {})",
                        w.property, r.result, r.connection
                    ),
                    Err(e) => {
                        ok = false;
                        format!("write {} = {value} failed: {e}", w.property)
                    }
                });
            }
        }
        let answered = Timestamp::now();
        let from_reading = answered.millis_since(req.reading_ts).max(0);
        let from_firing = req.fired.elapsed();
        let trigger = if req.trigger_seq > 0 {
            format!("{} (event {})", req.trigger, req.trigger_seq)
        } else {
            req.trigger.clone()
        };
        let mut message = String::new();
        if let Some(e) = req.event.as_ref().filter(|e| !e.message.is_empty()) {
            message.push_str(&e.message);
            message.push_str(": ");
        }
        message.push_str(&format!(
            "rule {} fired{} on {trigger}",
            req.rule,
            if req.dry_run { " (dry-run)" } else { "" }
        ));
        if !did.is_empty() {
            message.push_str(": ");
            message.push_str(&did.join("; "));
        }
        message.push_str(&format!(
            "; {from_reading} ms from the reading, {:.1} ms from firing to answer",
            from_firing.as_secs_f64() * 1000.0
        ));
        let severity = match (&req.event, ok) {
            (_, false) => Severity::High,
            (Some(e), true) => e.severity,
            (None, true) => Severity::Info,
        };
        let mut ev = Event::new(
            req.machine.clone(),
            answered,
            EventKind::Action,
            severity,
            message,
        );
        ev.alarm = req.rule.to_string();
        self.ctx.emit(ev).await;
        let result = if did.is_empty() {
            "raised its event".to_owned()
        } else {
            did.join("; ")
        };
        if let Some(actor) = self
            .ctx
            .registry
            .by_path(&req.machine)
            .and_then(|e| e.actor())
        {
            let _ = actor.cast(TwinMsg::ActionDone(Box::new(ActionDone {
                rule: req.rule.to_string(),
                ok,
                result,
            })));
        }
    }

    /// The rules of the machines at and below `path`, with their state.
    pub async fn list_rules(
        &self,
        caller: &Caller,
        req: pb::ListRulesRequest,
    ) -> Result<pb::ListRulesResponse, ApiError> {
        let prefix = if req.path.is_empty() {
            self.root()
        } else {
            Some(Self::parse_path("path", &req.path)?)
        };
        if let Some(p) = &prefix {
            self.entry(p)?;
        }
        let limit = match req.limit {
            0 => 1000,
            n => (n as usize).min(MAX_LIST_RULES),
        };
        let this = self.clone();
        let caller = caller.clone();
        tokio::task::spawn_blocking(move || {
            let mut rules = Vec::new();
            let mut truncated = false;
            let (machines, _) = this.scan(&caller, prefix.as_ref(), usize::MAX, |e| {
                matches!(e.def.kind, AssetKind::Machine { .. })
            });
            for m in machines {
                for r in this.rules_of_machine(&m) {
                    if rules.len() >= limit {
                        truncated = true;
                        break;
                    }
                    rules.push(r);
                }
            }
            pb::ListRulesResponse { rules, truncated }
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("list rules: {e}")))
    }

    /// A machine's rules as the API shows them: each spec with its state in the twin's
    /// last snapshot (an idle twin's rules are armed).
    fn rules_of_machine(&self, e: &crate::registry::TwinEntry) -> Vec<pb::Rule> {
        let AssetKind::Machine { spec, .. } = &e.def.kind else {
            return Vec::new();
        };
        let specs = rules_of(&self.ctx.registry, e.path(), &spec.rules);
        if specs.is_empty() {
            return Vec::new();
        }
        let snap = e.snapshot();
        let runs = match &snap.state {
            TwinState::Machine(m) => m.rules.clone(),
            _ => Vec::new(),
        };
        specs
            .iter()
            .map(|s| {
                let run = runs
                    .iter()
                    .find(|(n, _)| **n == *s.name)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_else(|| RuleRun::new(s.mode));
                rule_proto(e.path(), s, &run)
            })
            .collect()
    }

    /// Switches a machine's rule to another mode (engineer on the machine, audited). A rule
    /// that writes is enabled only where a connection writes its property.
    pub async fn set_rule_mode(
        &self,
        caller: &Caller,
        req: pb::SetRuleModeRequest,
    ) -> Result<pb::SetRuleModeResponse, ApiError> {
        let by = Self::actor_name(caller, req.by, "switches the rule")?;
        bounded("rule", &req.rule, super::MAX_NAME_BYTES)?;
        let path = Self::parse_path("path", &req.path)?;
        let e = self.entry(&path)?;
        self.allow(caller, Role::Engineer, &path, "set a rule's mode")?;
        let AssetKind::Machine { spec, .. } = &e.def.kind else {
            return Err(ApiError::BadArgument(format!(
                "path: {path} is a {}; rules run on machines",
                e.level().as_str()
            )));
        };
        let mode = RuleMode::parse(&req.mode).ok_or_else(|| {
            ApiError::BadArgument(format!(
                "mode: {:?} is none of enabled, dry-run, disabled",
                req.mode
            ))
        })?;
        let specs = rules_of(&self.ctx.registry, &path, &spec.rules);
        let Some(rule) = specs.iter().find(|r| r.name == req.rule) else {
            return Err(ApiError::Twin(crate::core::TwinError::UnknownRule {
                asset: path.clone(),
                rule: req.rule.clone(),
                known: specs
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }));
        };
        if mode == RuleMode::Enabled
            && let Some(w) = &rule.then.write
            && !self.connections.writes(&path, &w.property)
        {
            return Err(ApiError::FailedPrecondition(format!(
                "{path} rule {:?} writes {:?}, which no connection writes: it can only be disabled or run dry",
                rule.name, w.property
            )));
        }
        let target = format!("{path} rule {}", rule.name);
        // One switch at a time, the twin's and the kept record's together: two engineers'
        // switches are kept in the order the twin took them.
        let _one = SWITCHES.lock().await;
        self.audit_intent(AuditEntry {
            subject: caller.name().to_owned(),
            source: caller.source(),
            action: "rule-mode",
            target: target.clone(),
            value: mode.as_str().to_owned(),
            result: "requested".into(),
        })
        .await?;
        let actor = e
            .actor()
            .ok_or_else(|| ApiError::Unavailable(format!("{path}: twin is restarting, retry")))?;
        let name = rule.name.clone();
        let answer = crate::core::ask(
            &actor,
            |reply| TwinMsg::SetRuleMode {
                rule: name,
                mode,
                reply,
            },
            super::TWIN_CALL_TIMEOUT,
        )
        .await
        .ok_or_else(|| ApiError::Unavailable(format!("{path}: twin did not answer")))
        .and_then(|r| r.map_err(ApiError::from));
        self.audit_result(
            caller,
            "rule-mode",
            target,
            mode.as_str().to_owned(),
            &answer,
        );
        let previous = answer?;
        // Kept across restarts (until the spec changes the rule's mode).
        let (store, machine, name, spec_mode) = (
            self.ctx.store.clone(),
            path.clone(),
            rule.name.clone(),
            rule.mode,
        );
        let kept = tokio::task::spawn_blocking(move || {
            store.put_rule_mode(&machine, &name, spec_mode, mode)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        if previous != mode {
            let ev = Event::new(
                path.clone(),
                Timestamp::now(),
                EventKind::Action,
                Severity::Low,
                format!("rule {} switched {previous} → {mode} by {by}", rule.name),
            );
            let mut ev = ev;
            ev.alarm = rule.name.clone();
            self.ctx.emit(ev).await;
        }
        if let Err(e) = kept {
            return Err(ApiError::Unavailable(format!(
                "{path} rule {} is now {mode}, but a restart would bring back its earlier mode: the switch could not be stored ({e})",
                rule.name
            )));
        }
        let rule = self
            .rules_of_machine(&e)
            .into_iter()
            .find(|r| r.name == req.rule);
        Ok(pb::SetRuleModeResponse {
            previous: previous.as_str().to_owned(),
            rule,
        })
    }
}

fn rule_proto(path: &AssetPath, s: &RuleSpec, run: &RuleRun) -> pb::Rule {
    let when = match s.condition() {
        Ok(c) => c.describe(),
        Err(e) => e,
    };
    let mut when = when;
    if s.for_ms > 0 {
        when.push_str(&format!(" for {} ms", s.for_ms));
    }
    if !s.only_in_states.is_empty() {
        let states: Vec<&str> = s.only_in_states.iter().map(|st| st.as_str()).collect();
        when.push_str(&format!(", only while {}", states.join(" or ")));
    }
    let mut rearm = s.rearm.to_string();
    if let Some(m) = s.max_firings {
        rearm.push_str(&format!("; at most {} in {} ms", m.count, m.window_ms));
    }
    pb::Rule {
        path: path.to_string(),
        name: s.name.clone(),
        mode: run.mode.as_str().to_owned(),
        phase: run.phase.as_str().to_owned(),
        when,
        then: s.describe_action(),
        rearm,
        firings: run.firings,
        limited: run.limited,
        last_fired_us: run.last_fired.map(|t| t.0),
        last_result: run.last_result.clone(),
        failed: run.failed,
    }
}
