//! Authentication: a bearer token (a JWT of the customer's identity provider, or a static
//! service token `ftk.NAME.SECRET` checked against its argon2 hash) or a verified client
//! certificate becomes a `Subject` with its grants.
//!
//! A verified token is cached (bounded), so a call with a known token costs a map lookup; a
//! JWT's expiry and the revocation list are checked on every call, cached or not. Failed
//! attempts are counted per source address, and a source with too many in a minute is
//! refused without a check until the minute ends. Nothing here logs or returns a token.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::{Method, SecurityConfig, Subject};

/// Verified tokens and certificates kept; the cache is emptied when it is full.
const CACHE_ENTRIES: usize = 10_000;
/// Failed attempts from one address within `FAILURE_WINDOW` before it is refused.
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are tracked at most.
const FAILURE_ENTRIES: usize = 10_000;
/// How often the JWKS and revocation files are looked at for changes.
const FILE_CHECK: Duration = Duration::from_secs(1);
/// The SAN URI prefix naming a site in its certificate: `urn:ferrotwin:site:acme/berlin`.
pub const SITE_URI_PREFIX: &str = "urn:ferrotwin:site:";

/// What a connection and a request show of who sends them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The `Authorization: Bearer ...` value (without `Bearer `).
    pub bearer: Option<&'a str>,
    /// The client certificate (DER) the TLS handshake verified.
    pub peer_cert: Option<&'a [u8]>,
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `authorization: Bearer <token>` or a client certificate")]
    Missing,
    #[error("authentication failed: {0}")]
    Invalid(String),
    #[error("too many failed sign-ins from {addr}; retry in {retry_s} s")]
    RateLimited { addr: IpAddr, retry_s: u64 },
}

struct Cached {
    subject: Arc<Subject>,
    /// JWT expiry (seconds since the epoch); `None` for service tokens and certificates.
    exp: Option<u64>,
    jti: Option<String>,
}

/// A file reloaded when its modification time changes, checked at most every `FILE_CHECK`.
struct Watched<T> {
    path: PathBuf,
    mtime: Option<SystemTime>,
    checked: Instant,
    value: T,
}

impl<T> Watched<T> {
    fn load(path: &Path, parse: impl Fn(&str) -> Result<T, String>) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Ok(Watched {
            path: path.to_path_buf(),
            mtime: std::fs::metadata(path).and_then(|m| m.modified()).ok(),
            checked: Instant::now(),
            value: parse(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        })
    }

    /// Reloads when the file changed; a file that no longer parses keeps the last value
    /// (logged), so a half-written file never locks everyone out.
    fn refresh(&mut self, parse: impl Fn(&str) -> Result<T, String>) -> bool {
        if self.checked.elapsed() < FILE_CHECK {
            return false;
        }
        self.checked = Instant::now();
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if mtime == self.mtime {
            return false;
        }
        self.mtime = mtime;
        match std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse(&t))
        {
            Ok(v) => {
                self.value = v;
                tracing::info!(file = %self.path.display(), "security file reloaded");
                true
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "security file changed but does not load; keeping the previous one");
                false
            }
        }
    }
}

/// The identity provider's keys by `kid`, each with the one algorithm it may verify.
type Keys = Vec<(Option<String>, Algorithm, DecodingKey)>;

fn parse_jwks(text: &str) -> Result<Keys, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref c => return Err(format!("keys[{i}]: curve {c:?} is not supported")),
            },
            AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            // A symmetric key in a JWKS would let anyone who can read it sign tokens, and
            // is the classic algorithm-confusion target.
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "keys[{i}]: symmetric (oct) keys are refused; publish the provider's public keys"
                ));
            }
            _ => return Err(format!("keys[{i}]: key type not supported")),
        };
        let alg = match &jwk.common.key_algorithm {
            Some(ka) => {
                let a: Algorithm = format!("{ka:?}")
                    .parse()
                    .map_err(|_| format!("keys[{i}]: alg {ka:?} cannot sign tokens"))?;
                let family_ok = matches!(
                    (implied, a),
                    (
                        Algorithm::RS256,
                        Algorithm::RS256
                            | Algorithm::RS384
                            | Algorithm::RS512
                            | Algorithm::PS256
                            | Algorithm::PS384
                            | Algorithm::PS512
                    ) | (Algorithm::ES256, Algorithm::ES256)
                        | (Algorithm::ES384, Algorithm::ES384)
                        | (Algorithm::EdDSA, Algorithm::EdDSA)
                );
                if !family_ok {
                    return Err(format!("keys[{i}]: alg {a:?} does not fit the key type"));
                }
                a
            }
            None => implied,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
        keys.push((jwk.common.key_id.clone(), alg, key));
    }
    if keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    Ok(keys)
}

fn parse_revoked(text: &str) -> Result<HashSet<String>, String> {
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// Turns credentials into a subject, per the `[security]` config.
pub struct Authenticator {
    /// `None`: security off, everyone is `Subject::open()`.
    config: Option<SecurityConfig>,
    jwks: Option<Mutex<Watched<Keys>>>,
    revoked: Option<Mutex<Watched<HashSet<String>>>>,
    cache: Mutex<HashMap<Vec<u8>, Cached>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("open", &self.config.is_none())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// No security: every caller is the open subject.
    pub fn open() -> Authenticator {
        Authenticator {
            config: None,
            jwks: None,
            revoked: None,
            cache: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Checks the config and loads the key files (an error names the file).
    pub fn new(config: &SecurityConfig) -> Result<Authenticator, String> {
        config.validate()?;
        if !config.authenticates() {
            return Ok(Authenticator::open());
        }
        let (jwks, revoked) = match &config.jwt {
            Some(j) => (
                Some(Mutex::new(Watched::load(&j.jwks, parse_jwks)?)),
                match &j.revoked {
                    Some(p) => Some(Mutex::new(Watched::load(p, parse_revoked)?)),
                    None => None,
                },
            ),
            None => (None, None),
        };
        Ok(Authenticator {
            config: Some(config.clone()),
            jwks,
            revoked,
            cache: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    pub fn is_open(&self) -> bool {
        self.config.is_none()
    }

    /// The subject `creds` prove, or why not. A failure counts against the source address.
    pub fn authenticate(&self, creds: Credentials<'_>) -> Result<Arc<Subject>, AuthError> {
        let Some(config) = &self.config else {
            return Ok(Subject::open());
        };
        let ip = creds.addr.map(|a| a.ip());
        if let Some(ip) = ip {
            self.check_rate(ip)?;
        }
        let r = match (creds.bearer, creds.peer_cert) {
            (Some(token), _) => self.bearer(config, token),
            (None, Some(der)) => self.certificate(config, der),
            (None, None) => Err(AuthError::Missing),
        };
        // Only a credential that does not verify counts; none at all is not an attempt.
        if matches!(r, Err(AuthError::Invalid(_)))
            && let Some(ip) = ip
        {
            self.count_failure(ip);
        }
        r
    }

    fn check_rate(&self, ip: IpAddr) -> Result<(), AuthError> {
        let f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((n, since)) = f.get(&ip) else {
            return Ok(());
        };
        let elapsed = since.elapsed();
        if *n >= MAX_FAILURES && elapsed < FAILURE_WINDOW {
            return Err(AuthError::RateLimited {
                addr: ip,
                retry_s: FAILURE_WINDOW.saturating_sub(elapsed).as_secs() + 1,
            });
        }
        Ok(())
    }

    fn count_failure(&self, ip: IpAddr) {
        let mut f = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if f.len() >= FAILURE_ENTRIES {
            f.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if f.len() >= FAILURE_ENTRIES {
                f.clear();
            }
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    fn cached(&self, key: &[u8]) -> Option<Result<Arc<Subject>, AuthError>> {
        let cache = self.cache.lock().expect("token cache is never poisoned");
        let c = cache.get(key)?;
        if let Some(exp) = c.exp
            && now_s() > exp
        {
            return Some(Err(AuthError::Invalid("token expired".into())));
        }
        if let Some(jti) = &c.jti
            && self.is_revoked(jti)
        {
            return Some(Err(AuthError::Invalid("token revoked".into())));
        }
        Some(Ok(c.subject.clone()))
    }

    fn remember(&self, key: Vec<u8>, c: Cached) {
        let mut cache = self.cache.lock().expect("token cache is never poisoned");
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, c);
    }

    fn is_revoked(&self, jti: &str) -> bool {
        let Some(r) = &self.revoked else { return false };
        let mut r = r.lock().expect("revocation list is never poisoned");
        r.refresh(parse_revoked);
        r.value.contains(jti)
    }

    fn bearer(&self, config: &SecurityConfig, token: &str) -> Result<Arc<Subject>, AuthError> {
        let mut key = Vec::with_capacity(token.len() + 1);
        key.push(b't');
        key.extend_from_slice(token.as_bytes());
        if let Some(r) = self.cached(&key) {
            return r;
        }
        let cached = if let Some(rest) = token.strip_prefix("ftk.") {
            service_token(config, rest)?
        } else {
            self.jwt(config, token)?
        };
        let subject = cached.subject.clone();
        self.remember(key, cached);
        Ok(subject)
    }

    fn jwt(&self, config: &SecurityConfig, token: &str) -> Result<Cached, AuthError> {
        let (Some(j), Some(jwks)) = (&config.jwt, &self.jwks) else {
            return Err(AuthError::Invalid(
                "bearer token is not a service token (ftk.NAME.SECRET) and no identity provider is configured".into(),
            ));
        };
        let bad = |m: String| AuthError::Invalid(m);
        // `alg: none` and unknown algorithms fail here: they are not `Algorithm`s.
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| bad(format!("not a JWT: {e}")))?;
        let (alg, key) = {
            let mut ks = jwks.lock().expect("jwks is never poisoned");
            if ks.refresh(parse_jwks) {
                // A key taken out of the JWKS takes its tokens with it, cached or not.
                self.cache
                    .lock()
                    .expect("token cache is never poisoned")
                    .clear();
            }
            let found = ks
                .value
                .iter()
                .filter(|(kid, _, _)| {
                    header.kid.is_none() || kid.as_deref() == header.kid.as_deref()
                })
                .find(|(_, alg, _)| *alg == header.alg)
                .map(|(_, alg, key)| (*alg, key.clone()));
            found.ok_or_else(|| {
                bad(format!(
                    "no key of the identity provider verifies alg {:?}{}",
                    header.alg,
                    header
                        .kid
                        .as_deref()
                        .map(|k| format!(" with kid {k:?}"))
                        .unwrap_or_default()
                ))
            })?
        };
        let mut v = Validation::new(alg);
        v.set_issuer(&[&j.issuer]);
        v.set_audience(&[&j.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = j.leeway_s;
        v.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| bad(format!("JWT refused: {e}")))?;
        let claims = data.claims;
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or_else(|| bad("JWT: `sub` must be a string of 1 to 256 bytes".into()))?;
        let groups: Vec<String> = match claims.get(&j.groups_claim) {
            None => Vec::new(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(_) => {
                return Err(bad(format!(
                    "JWT: claim {:?} must be a list of group names",
                    j.groups_claim
                )));
            }
        };
        let jti = claims
            .get("jti")
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        if let Some(jti) = &jti
            && self.is_revoked(jti)
        {
            return Err(bad("token revoked".into()));
        }
        // A NumericDate may be fractional; a JWT without one is not cached for ever.
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .filter(|e| e.is_finite() && *e >= 0.0)
            .map(|e| e.ceil() as u64)
            .ok_or_else(|| bad("JWT: `exp` is not a number of seconds".into()))?;
        let name = format!("user:{sub}");
        Ok(Cached {
            subject: Arc::new(Subject {
                grants: config.grants_of(&name, &groups),
                name,
                method: Method::Jwt,
            }),
            exp: Some(exp.saturating_add(j.leeway_s)),
            jti,
        })
    }

    fn certificate(&self, config: &SecurityConfig, der: &[u8]) -> Result<Arc<Subject>, AuthError> {
        let mut key = Vec::with_capacity(der.len() + 1);
        key.push(b'c');
        key.extend_from_slice(der);
        if let Some(r) = self.cached(&key) {
            return r;
        }
        let name = certificate_subject(der).map_err(AuthError::Invalid)?;
        let subject = Arc::new(Subject {
            grants: config.grants_of(&name, &[]),
            name,
            method: Method::Certificate,
        });
        self.remember(
            key,
            Cached {
                subject: subject.clone(),
                exp: None,
                jti: None,
            },
        );
        Ok(subject)
    }
}

/// A service token `NAME.SECRET` (after `ftk.`), checked against the configured hash.
fn service_token(config: &SecurityConfig, rest: &str) -> Result<Cached, AuthError> {
    use argon2::PasswordVerifier;
    /// One argon2 check at a time in the process (each costs ~19 MiB and tens of ms): a
    /// flood of new tokens queues here instead of taking every core.
    static ARGON: Mutex<()> = Mutex::new(());
    /// Checked for an unknown name too, so the answer's timing does not tell which names
    /// exist.
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let bad = || AuthError::Invalid("unknown or wrong service token".into());
    let (name, secret) = rest.split_once('.').ok_or_else(bad)?;
    let known = config.tokens.iter().find(|t| t.name == name);
    let hash_text = match known {
        Some(t) => t.hash.clone(),
        None => DUMMY
            .get_or_init(|| hash_secret("not a token").unwrap_or_default())
            .clone(),
    };
    let check = || {
        let _one = ARGON
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        argon2::PasswordHash::new(&hash_text).is_ok_and(|hash| {
            argon2::Argon2::default()
                .verify_password(secret.as_bytes(), &hash)
                .is_ok()
        })
    };
    // Off the async worker where the runtime allows it: other tasks move on meanwhile.
    let ok = match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(check)
        }
        _ => check(),
    };
    if !ok || known.is_none() {
        return Err(bad());
    }
    let name = format!("token:{name}");
    Ok(Cached {
        subject: Arc::new(Subject {
            grants: config.grants_of(&name, &[]),
            name,
            method: Method::ServiceToken,
        }),
        exp: None,
        jti: None,
    })
}

/// The subject a verified client certificate names: `site:PATH` from a SAN URI
/// `urn:ferrotwin:site:PATH`, else `cert:` and its common name.
pub fn certificate_subject(der: &[u8]) -> Result<String, String> {
    let uris = site_uris(der)?;
    if let Some(site) = uris.first() {
        return Ok(format!("site:{site}"));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|s| !s.is_empty())
        .ok_or("client certificate has neither a site URI nor a common name")?;
    Ok(format!("cert:{cn}"))
}

/// The sites (`acme/berlin`) a certificate's SAN URIs name.
pub fn site_uris(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(u) = n
                && let Some(site) = u.strip_prefix(SITE_URI_PREFIX)
            {
                out.push(site.to_owned());
            }
        }
    }
    Ok(out)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Hashes a service token's secret for `[[security.tokens]]` (argon2id, random salt).
pub fn hash_secret(secret: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A new service token for `name`: (the token clients send, the hash for the config).
pub fn new_service_token(name: &str) -> Result<(String, String), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "token name {name:?}: use letters, digits, '-' and '_' only"
        ));
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok((format!("ftk.{name}.{secret}"), hash_secret(&secret)?))
}
