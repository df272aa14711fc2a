//! Who is asking and what they may do: the `[security]` config, subjects and their grants
//! (roles scoped to path globs of the asset tree), the authenticator of bearer tokens and
//! client certificates (`authn`), and TLS for every listener and link (`tls`).
//!
//! Enforcement is not here: `TwinApi` asks a `Caller` before every read and every action, so
//! gRPC and HTTP share one set of checks. This module imports nothing of the crate.
//!
//! ```toml
//! [security]
//! insecure = false                    # allow a non-loopback listener without TLS and auth
//! [security.tls]                      # the server side of gRPC, HTTP and replication
//! cert = "pki/server.pem"
//! key = "pki/server-key.pem"
//! client_ca = "pki/ca.pem"            # client certificates (sites, users) verify against it
//! crl = "pki/crl.pem"                 # optional; revoked certificates fail the handshake
//! [security.jwt]                      # the customer's identity provider
//! jwks = "jwks.json"
//! issuer = "https://idp.example.com"
//! audience = "ferrotwin"
//! [[security.tokens]]                 # static service tokens, argon2-hashed
//! name = "scada"
//! hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! [[security.grants]]
//! subject = "group:berlin-operators"  # user:NAME, group:NAME, token:NAME, cert:NAME, site:PATH
//! role = "operator"
//! paths = ["acme/berlin/**"]
//! ```

pub mod authn;
pub mod conn;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrotwin_models::AssetPath;
use ferrotwin_models::glob::PathGlob;

pub use authn::{AuthError, Authenticator, Credentials};

/// A role, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read twins, history, events, status.
    Viewer,
    /// And acknowledge and shelve alarms.
    Operator,
    /// And write setpoints into PLCs.
    Engineer,
    /// And plant, config and audit.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Engineer => "engineer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "engineer" => Role::Engineer,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[security.grants]]` entry: `role` on the subtrees `paths` match, to `subject`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// `user:NAME` (a JWT's `sub`), `group:NAME` (in the JWT's groups claim), `token:NAME`
    /// (a service token), `cert:NAME` (a client certificate's common name), `site:PATH` (a
    /// site's certificate), or `*` (every authenticated subject).
    pub subject: String,
    pub role: Role,
    /// Path globs (`acme/berlin/**`; `**` alone is the whole plant).
    pub paths: Vec<String>,
}

/// A granted role on path globs.
#[derive(Debug, Clone)]
pub struct Grant {
    pub role: Role,
    pub paths: Vec<PathGlob>,
    /// The patterns as configured (for `WhoAmI`).
    pub patterns: Vec<String>,
}

impl Grant {
    pub fn new(role: Role, patterns: &[&str]) -> Result<Grant, String> {
        let paths = patterns
            .iter()
            .map(|p| PathGlob::parse(p).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Grant {
            role,
            paths,
            patterns: patterns.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    fn covers(&self, path: &str) -> bool {
        self.paths.iter().any(|g| g.matches(path))
    }
}

/// How a subject proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Security is off (loopback only): everyone is this one subject, with every role.
    Open,
    Jwt,
    ServiceToken,
    Certificate,
    /// A local action rule of this runtime acting on its machine (never a network caller).
    Rule,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Open => "open",
            Method::Jwt => "jwt",
            Method::ServiceToken => "service-token",
            Method::Certificate => "certificate",
            Method::Rule => "rule",
        }
    }
}

/// An authenticated subject and what it may do.
#[derive(Debug)]
pub struct Subject {
    /// `user:alice`, `token:scada`, `cert:plc-gw`, `site:acme/berlin`, or `anonymous`.
    pub name: String,
    pub method: Method,
    pub grants: Vec<Grant>,
}

impl Subject {
    /// The one subject of a runtime without security: every role everywhere.
    pub fn open() -> Arc<Subject> {
        static OPEN: std::sync::OnceLock<Arc<Subject>> = std::sync::OnceLock::new();
        OPEN.get_or_init(|| {
            Arc::new(Subject {
                name: "anonymous".into(),
                method: Method::Open,
                grants: vec![Grant::new(Role::Admin, &["**"]).expect("`**` is a glob")],
            })
        })
        .clone()
    }

    /// May this subject act as `role` on `path`?
    pub fn can(&self, role: Role, path: &AssetPath) -> bool {
        self.grants
            .iter()
            .any(|g| g.role >= role && g.covers(path.as_str()))
    }

    /// Does some grant give `role` anywhere (for calls not about one asset)?
    pub fn has_role(&self, role: Role) -> bool {
        self.grants.iter().any(|g| g.role >= role)
    }
}

/// Who is calling: the subject and where from. Every `TwinApi` call takes one.
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: Arc<Subject>,
    pub addr: Option<SocketAddr>,
}

impl Caller {
    /// A caller of a runtime without security (also the runtime's own tools in-process).
    pub fn open(addr: Option<SocketAddr>) -> Caller {
        Caller {
            subject: Subject::open(),
            addr,
        }
    }

    pub fn name(&self) -> &str {
        &self.subject.name
    }

    pub fn is_open(&self) -> bool {
        self.subject.method == Method::Open
    }

    pub fn can(&self, role: Role, path: &AssetPath) -> bool {
        self.subject.can(role, path)
    }

    pub fn can_read(&self, path: &AssetPath) -> bool {
        self.subject.can(Role::Viewer, path)
    }

    /// A local action rule `rule` acting on its machine `machine`: engineer there, nowhere
    /// else. Made in process by the action executor; no credential turns into it.
    pub fn rule(rule: &str, machine: &AssetPath) -> Caller {
        let glob = PathGlob::parse(machine.as_str()).expect("an asset path is a glob of itself");
        Caller {
            subject: Arc::new(Subject {
                name: format!("rule:{rule}"),
                method: Method::Rule,
                grants: vec![Grant {
                    role: Role::Engineer,
                    paths: vec![glob],
                    patterns: vec![machine.to_string()],
                }],
            }),
            addr: None,
        }
    }

    /// The source address for the audit log (`-` when unknown).
    pub fn source(&self) -> String {
        self.addr.map_or_else(|| "-".into(), |a| a.ip().to_string())
    }
}

/// `[security.tls]`: this runtime's certificate and what it trusts of its clients.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this server.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates. Without it clients show none.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Require a client certificate on every connection (else only replication needs one).
    #[serde(default)]
    pub require_client_cert: bool,
    /// PEM certificate revocation lists of `client_ca`.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// How often the files are checked for changes (they are reloaded without restart).
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_ms() -> u64 {
    2000
}

/// `[security.jwt]`: bearer JWTs of the customer's identity provider.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JWKS file (`{"keys": [...]}`) with the provider's public keys (RSA, EC or Ed25519;
    /// symmetric keys are refused). Reloaded when it changes.
    pub jwks: PathBuf,
    pub issuer: String,
    pub audience: String,
    /// The claim holding the subject's groups (a list of strings).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// A file of revoked token ids (`jti`), one per line: refused from the next call on,
    /// cached or not. Reloaded when it changes.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_leeway() -> u64 {
    30
}

/// `[[security.tokens]]`: a static service token, stored as its argon2 hash. The token a
/// client sends is `ftk.NAME.SECRET` (`ferrotwin token NAME` makes one).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceToken {
    pub name: String,
    pub hash: String,
}

/// The `[security]` section. Absent: security off, which only loopback listeners accept.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Let listeners on non-loopback addresses run without TLS or authentication (logged
    /// loudly at every start).
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub tokens: Vec<ServiceToken>,
    #[serde(default)]
    pub grants: Vec<GrantConfig>,
}

impl SecurityConfig {
    /// Does a caller have to authenticate (some way to do so is configured)?
    pub fn authenticates(&self) -> bool {
        self.jwt.is_some()
            || !self.tokens.is_empty()
            || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// Resolves relative file names against `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert);
            fix(&mut t.key);
            if let Some(p) = &mut t.client_ca {
                fix(p);
            }
            if let Some(p) = &mut t.crl {
                fix(p);
            }
        }
        if let Some(j) = &mut self.jwt {
            fix(&mut j.jwks);
            if let Some(p) = &mut j.revoked {
                fix(p);
            }
        }
    }

    /// Checks what can be checked without the files: grants parse, names are unique.
    pub fn validate(&self) -> Result<(), String> {
        for (i, g) in self.grants.iter().enumerate() {
            let kinds = ["user:", "group:", "token:", "cert:", "site:"];
            if g.subject != "*" && !kinds.iter().any(|k| g.subject.starts_with(k)) {
                return Err(format!(
                    "grants[{i}].subject: {:?} must be user:NAME, group:NAME, token:NAME, cert:NAME, site:PATH or *",
                    g.subject
                ));
            }
            if g.paths.is_empty() {
                return Err(format!("grants[{i}].paths: give at least one path glob"));
            }
            for p in &g.paths {
                PathGlob::parse(p).map_err(|e| format!("grants[{i}].paths: {e}"))?;
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tokens {
            if t.name.is_empty() || t.name.contains('.') {
                return Err(format!(
                    "tokens: name {:?} must be non-empty without '.'",
                    t.name
                ));
            }
            if !names.insert(&t.name) {
                return Err(format!("tokens: {:?} is named twice", t.name));
            }
            argon2::PasswordHash::new(&t.hash)
                .map_err(|e| format!("tokens.{}: hash is not a PHC string: {e}", t.name))?;
        }
        Ok(())
    }

    /// The grants of a subject named `name` that belongs to `groups`.
    pub fn grants_of(&self, name: &str, groups: &[String]) -> Vec<Grant> {
        self.grants
            .iter()
            .filter(|g| {
                g.subject == "*"
                    || g.subject == name
                    || g.subject
                        .strip_prefix("group:")
                        .is_some_and(|n| groups.iter().any(|x| x == n))
            })
            .filter_map(|g| {
                let pats: Vec<&str> = g.paths.iter().map(String::as_str).collect();
                Grant::new(g.role, &pats).ok()
            })
            .collect()
    }
}

/// The token of an `Authorization` value `Bearer TOKEN` (the scheme in any case).
pub fn bearer_of(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Refuses a listener that would expose the plant: a non-loopback address without TLS and
/// authentication, unless `insecure` says so (then it warns, at every start).
pub fn check_listener(
    what: &str,
    addr: SocketAddr,
    security: Option<&SecurityConfig>,
) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    let (tls, auth, insecure) = match security {
        Some(s) => (s.tls.is_some(), s.authenticates(), s.insecure),
        None => (false, false, false),
    };
    if tls && auth {
        return Ok(());
    }
    if insecure {
        tracing::warn!(
            listener = what,
            %addr,
            tls,
            authentication = auth,
            "INSECURE: listening on a non-loopback address without TLS and authentication, because [security] insecure = true; anyone on the network can read the plant and write setpoints"
        );
        return Ok(());
    }
    Err(format!(
        "{what} on {addr}: a non-loopback listener needs TLS ([security.tls]) and authentication ([security.jwt], [[security.tokens]] or client certificates); set [security] insecure = true to run without (not for production)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> AssetPath {
        AssetPath::parse(s).expect("path")
    }

    #[test]
    fn a_grant_covers_its_subtree_and_lower_roles_only() {
        let s = Subject {
            name: "user:eve".into(),
            method: Method::Jwt,
            grants: vec![Grant::new(Role::Engineer, &["acme/berlin/**"]).expect("glob")],
        };
        assert!(s.can(Role::Viewer, &path("acme/berlin")));
        assert!(s.can(Role::Engineer, &path("acme/berlin/assembly/line-1/m1")));
        assert!(!s.can(Role::Admin, &path("acme/berlin")));
        assert!(!s.can(Role::Viewer, &path("acme/paris/assembly")));
        assert!(!s.can(Role::Viewer, &path("acme")));
    }

    #[test]
    fn non_loopback_listeners_need_tls_and_auth_or_insecure() {
        let any: SocketAddr = "0.0.0.0:50051".parse().expect("addr");
        let lo: SocketAddr = "127.0.0.1:50051".parse().expect("addr");
        assert!(check_listener("grpc", lo, None).is_ok());
        let err = check_listener("grpc", any, None).expect_err("open on 0.0.0.0");
        assert!(
            err.contains("0.0.0.0:50051") && err.contains("insecure"),
            "{err}"
        );
        let insecure = SecurityConfig {
            insecure: true,
            ..Default::default()
        };
        assert!(check_listener("grpc", any, Some(&insecure)).is_ok());
    }

    #[test]
    fn config_errors_name_the_field() {
        let c: SecurityConfig = toml::from_str(
            "[[grants]]\nsubject = \"alice\"\nrole = \"viewer\"\npaths = [\"**\"]\n",
        )
        .expect("toml");
        let e = c.validate().expect_err("subject without kind");
        assert!(e.contains("grants[0].subject"), "{e}");
        let bad: Result<SecurityConfig, _> =
            toml::from_str("[[grants]]\nsubject = \"user:a\"\nrole = \"root\"\npaths = [\"**\"]\n");
        assert!(bad.is_err());
    }
}
