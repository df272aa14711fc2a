//! TLS for the listeners (rustls with ring): the server's certificate and key, the CA that
//! signs client certificates and its CRL, all from PEM files and reloaded when they change.
//! An accept loop does the handshakes off the server's path, each within a deadline, so a
//! client that sends nothing (or plaintext) holds no slot for long.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::TlsConfig;
use super::conn::{ConnLimits, Guarded};

/// A TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshaken connections not yet taken by the server.
const READY_QUEUE: usize = 64;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(certs)
}

/// The CA certificates of `path` as a root store.
pub fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: not a CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no private key: {e}", path.display()))
}

/// The CRLs of `path`, PEM or one DER CRL. A file that holds none is an error: a
/// configured CRL that silently checks nothing would turn revocation off.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let pem = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read CRLs: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM CRLs: {e}", path.display()))?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    let der = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    // A DER CRL is an ASN.1 SEQUENCE; rustls checks the rest when it parses it.
    if der.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(der)]);
    }
    Err(format!(
        "{}: holds no CRL (PEM \"X509 CRL\" blocks or one DER CRL)",
        path.display()
    ))
}

/// The server config of `cfg`, announcing `alpn` (`h2` for gRPC, `http/1.1` for HTTP).
pub fn server_config(cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
    let certs = read_certs(&cfg.cert)?;
    let key = read_key(&cfg.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let roots = Arc::new(read_roots(ca)?);
            let mut v = WebPkiClientVerifier::builder_with_provider(roots, provider());
            if let Some(crl) = &cfg.crl {
                v = v.with_crls(read_crls(crl)?);
            }
            if !cfg.require_client_cert {
                v = v.allow_unauthenticated();
            }
            let v = v
                .build()
                .map_err(|e| format!("{}: client verifier: {e}", ca.display()))?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut sc = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: certificate and key do not fit: {e}", cfg.key.display()))?;
    sc.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(sc)
}

/// A server's TLS setup, rebuilt when one of its files changes.
pub struct ServerTls {
    cfg: TlsConfig,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<rustls::ServerConfig>>,
    mtimes: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

impl ServerTls {
    pub fn load(cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ServerTls>, String> {
        let sc = server_config(cfg, alpn)?;
        let tls = ServerTls {
            cfg: cfg.clone(),
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
            current: RwLock::new(Arc::new(sc)),
            mtimes: std::sync::Mutex::new(Vec::new()),
        };
        *tls.mtimes.lock().expect("mtimes lock") = tls.file_times();
        Ok(Arc::new(tls))
    }

    fn file_times(&self) -> Vec<Option<SystemTime>> {
        let c = &self.cfg;
        [
            Some(&c.cert),
            Some(&c.key),
            c.client_ca.as_ref(),
            c.crl.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
    }

    /// Rebuilds the config when a file changed; a broken new set keeps the old one (logged).
    pub fn reload_if_changed(&self) -> bool {
        let times = self.file_times();
        let mut last = self.mtimes.lock().expect("mtimes lock");
        if *last == times {
            return false;
        }
        *last = times;
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        match server_config(&self.cfg, &alpn) {
            Ok(sc) => {
                *self.current.write().expect("tls config lock") = Arc::new(sc);
                tracing::info!(cert = %self.cfg.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                false
            }
        }
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls config lock").clone())
    }

    /// Checks the files every `reload_interval_ms` until `token` is cancelled.
    pub fn spawn_reload(self: &Arc<Self>, token: CancellationToken) {
        let me = self.clone();
        let every = Duration::from_millis(self.cfg.reload_interval_ms.max(100));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || m.reload_if_changed()).await;
            }
        });
    }
}

/// Accepted TCP connections after a successful TLS handshake, until `token` is cancelled.
/// A connection is first admitted by `limits` (one past a cap is closed at once); each
/// handshake runs in its own task within `HANDSHAKE_TIMEOUT`; a failed one (plaintext, an
/// unknown or revoked client certificate) is logged at debug and dropped. The stream then
/// owes its first `first_bytes` and may stay `idle` (see `conn::Guarded`).
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    token: CancellationToken,
    limits: Arc<ConnLimits>,
    first_bytes: usize,
    idle: Option<Duration>,
) -> mpsc::Receiver<Result<Guarded<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, addr) = tokio::select! {
                () = token.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = limits.admit(addr.ip()) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx
                            .send(Ok(Guarded::new(s, permit, first_bytes, idle)))
                            .await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    rx
}
