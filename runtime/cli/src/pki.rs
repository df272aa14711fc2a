//! A small certificate authority for `ferrotwin demo --secure` and the tests: a CA, server
//! certificates (DNS and IP names), site certificates (SAN URI `urn:ferrotwin:site:PATH`),
//! user certificates (a common name) and a CRL, as PEM files in one folder. ECDSA P-256.
//! Not for production: a plant's PKI issues real certificates; ferrotwin only reads files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};

use ferrotwin_runtime::security::TlsConfig;
use ferrotwin_runtime::security::authn::SITE_URI_PREFIX;

/// A certificate and key written to `cert`/`key`, with its serial (for a CRL).
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    next_serial: std::cell::Cell<u64>,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A private key: readable by its owner only.
fn write_key(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

impl Pki {
    /// A new CA in `dir` (`ca.pem`, `ca-key.pem`).
    pub fn create(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ferrotwin demo CA");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.serial_number = Some(SerialNumber::from(1u64));
        let cert = p.self_signed(&key)?;
        write(&dir.join("ca.pem"), &cert.pem())?;
        write_key(&dir.join("ca-key.pem"), &key.serialize_pem())?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(p, key),
            next_serial: std::cell::Cell::new(2),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn issue(&self, file: &str, mut p: CertificateParams, cn: &str) -> Result<Issued> {
        let serial = self.next_serial.get();
        self.next_serial.set(serial + 1);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.serial_number = Some(SerialNumber::from(serial));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        write(&c, &cert.pem())?;
        write_key(&k, &key.serialize_pem())?;
        Ok(Issued {
            cert: c,
            key: k,
            serial,
        })
    }

    /// A server certificate for `hosts` (DNS names or IP addresses).
    pub fn server(&self, file: &str, hosts: &[&str]) -> Result<Issued> {
        let mut p =
            CertificateParams::new(hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, p, hosts.first().copied().unwrap_or("server"))
    }

    /// A site's client certificate: SAN URI `urn:ferrotwin:site:<site>`.
    pub fn site(&self, file: &str, site: &str) -> Result<Issued> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = vec![SanType::URI(format!("{SITE_URI_PREFIX}{site}").try_into()?)];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, p, site)
    }

    /// A user's (or a program's) client certificate with common name `cn`.
    pub fn user(&self, file: &str, cn: &str) -> Result<Issued> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, p, cn)
    }

    /// The `[security.tls]` of a runtime serving `server` (a certificate of this CA) and
    /// verifying client certificates of this CA.
    pub fn server_tls(&self, server: Issued) -> TlsConfig {
        TlsConfig {
            cert: server.cert,
            key: server.key,
            client_ca: Some(self.ca()),
            require_client_cert: false,
            crl: None,
            reload_interval_ms: 2000,
        }
    }

    /// Writes `crl.pem` revoking `serials`.
    pub fn crl(&self, serials: &[u64]) -> Result<PathBuf> {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2025, 1, 1),
            next_update: date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(self.next_serial.get()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: date_time_ymd(2025, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        let path = self.dir.join("crl.pem");
        write(&path, &crl.pem()?)?;
        Ok(path)
    }
}
