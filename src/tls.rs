//! TLS for both hops of member -> gateway -> udc, built on rustls with the
//! aws-lc-rs provider, TLS 1.3 only.
//!
//! - [`server_config`]: the member-facing listener of the gateway and the
//!   UDC's listener. ALPN h2 and http/1.1; optional or required client
//!   certificates from one CA.
//! - [`client_config`]: the gateway's upstream link. Only the UDC's CA is
//!   trusted (no web roots); ALPN h2; the gateway's client certificate.
//! - Both take their own certificate from a [`ReloadableCert`]:
//!   [`ReloadableServer::reload`] / [`ReloadableClient::reload`] re-read the
//!   files and swap the certificate for new handshakes; open connections are
//!   untouched, and a failed reload keeps the old certificate. Trust anchors
//!   (the CA files) are read once, at start.
//! - [`peer_identity`]: who a verified client is (first DNS SAN, else CN);
//!   the UDC names gateways this way.
//! - [`dev_pki`]: a throwaway CA and leaf certificates for demos and tests.
//!
//! PEM is read with `rustls_pki_types::pem::PemObject`; every error names
//! the file and none contains key material.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnection, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocols offered by the servers, preferred first.
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// ALPN protocol of the upstream client.
pub const CLIENT_ALPN: &[u8] = b"h2";

/// Errors building TLS configurations. Each names the file concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {detail}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong (never key bytes).
        detail: String,
    },
    /// No `CERTIFICATE` section in a file that should hold certificates.
    #[error("{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// No private key section in a key file.
    #[error("{} holds no PEM private key (expected PKCS#8, SEC1 or PKCS#1)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is unusable, or does not match the certificate.
    #[error("{} cannot be used with {}: {source}", key.display(), cert.display())]
    Key {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("{} holds a CA certificate that cannot be trusted: {source}", path.display())]
    Ca {
        /// The CA file.
        path: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("client CA {}: {source}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// rustls's reason.
        source: rustls::server::VerifierBuilderError,
    },
    /// Inconsistent arguments or an unsupported protocol setting.
    #[error("tls configuration: {0}")]
    Config(String),
    /// A reloaded client certificate names another identity than the one
    /// in use: the peer would refuse everything sent under it (a gateway's
    /// batches name the gateway id its certificate must carry), so the old
    /// certificate stays.
    #[error("{} names {new:?}, not {old:?} as the certificate in use does", path.display())]
    IdentityChanged {
        /// The certificate file.
        path: PathBuf,
        /// The identity in use.
        old: Option<String>,
        /// The reloaded certificate's identity.
        new: Option<String>,
    },
    /// Generating a development certificate failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// Writing a development PKI file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The provider every configuration uses: aws-lc-rs, chosen explicitly so a
/// process-wide default never matters.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// ---------------------------------------------------------------------------
// PEM loading
// ---------------------------------------------------------------------------

fn pem_error(path: &Path, e: pem::Error, secret: bool) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        pem::Error::NoItemsFound if secret => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        pem::Error::NoItemsFound => TlsError::NoCertificate {
            path: path.to_path_buf(),
        },
        // Details of a bad key file could echo key bytes: keep them out.
        _ if secret => TlsError::Pem {
            path: path.to_path_buf(),
            detail: "malformed PEM section".into(),
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e, false))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e, false))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file. Warns if the file is readable by
/// group or others.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    warn_if_exposed(path);
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e, true))
}

#[cfg(unix)]
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(file = %path.display(), "private key file is readable by group or others; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_exposed(_path: &Path) {}

/// A trust store holding exactly the certificates of `path`.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::Ca {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

// ---------------------------------------------------------------------------
// Reloadable certificate
// ---------------------------------------------------------------------------

/// A certificate chain and key read from two files, swappable at runtime.
/// Serves as the certificate resolver of a server or client config.
pub struct ReloadableCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    /// The key handed to new handshakes; replaced whole by `reload`.
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableCert {
    /// Reads `cert_path` (chain, leaf first) and `key_path`, and checks they
    /// belong together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let provider = provider();
        let key = certified_key(cert_path, key_path, &provider)?;
        Ok(ReloadableCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Re-reads both files. On success new handshakes use the new
    /// certificate; on failure the old one stays and the error is returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.reload_checked(|_, _| Ok(()))
    }

    /// [`Self::reload`], keeping the old certificate unless `check(old,
    /// new)` passes.
    fn reload_checked(
        &self,
        check: impl FnOnce(&CertifiedKey, &CertifiedKey) -> Result<(), TlsError>,
    ) -> Result<(), TlsError> {
        let key = certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        check(&self.get(), &key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        tracing::info!(cert = %self.cert_path.display(), "tls certificate reloaded");
        Ok(())
    }

    /// The certificate chain currently served (leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.get().cert.clone()
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl ResolvesClientCert for ReloadableCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    let ck = CertifiedKey::from_der(chain, der, provider).map_err(|source| TlsError::Key {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })?;
    // from_der lets an unknown consistency pass; we want a definite match.
    ck.keys_match().map_err(|source| TlsError::Key {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })?;
    Ok(ck)
}

// ---------------------------------------------------------------------------
// Server and client configurations
// ---------------------------------------------------------------------------

/// A server configuration whose certificate can be reloaded.
#[derive(Clone, Debug)]
pub struct ReloadableServer {
    config: Arc<ServerConfig>,
    cert: Arc<ReloadableCert>,
}

impl ReloadableServer {
    /// The rustls configuration (shared; the certificate inside follows
    /// reloads).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// A tokio acceptor over [`config`](Self::config).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// Re-reads the certificate and key files; see [`ReloadableCert::reload`].
    pub fn reload(&self) -> Result<(), TlsError> {
        self.cert.reload()
    }

    /// The certificate source, e.g. to inspect the served chain.
    pub fn cert(&self) -> &ReloadableCert {
        &self.cert
    }
}

/// Builds a TLS 1.3 server configuration (ALPN h2, http/1.1) serving the
/// certificate in `cert_path`/`key_path`. With `client_ca`, clients may
/// present a certificate from that CA, and must when `require_client_cert`;
/// without it no client certificate is asked for (and `require_client_cert`
/// is an error).
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
    require_client_cert: bool,
) -> Result<ReloadableServer, TlsError> {
    let provider = provider();
    let cert = Arc::new(ReloadableCert::load(cert_path, key_path)?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let mut v = WebPkiClientVerifier::builder_with_provider(roots, provider);
            if !require_client_cert {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|source| TlsError::Verifier {
                path: ca.to_path_buf(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None if require_client_cert => {
            return Err(TlsError::Config(
                "client certificates are required but no client CA is configured".into(),
            ));
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert.clone());
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(ReloadableServer {
        config: Arc::new(config),
        cert,
    })
}

/// A client configuration whose client certificate can be reloaded.
#[derive(Clone, Debug)]
pub struct ReloadableClient {
    config: Arc<ClientConfig>,
    cert: Arc<ReloadableCert>,
}

impl ReloadableClient {
    /// The rustls configuration.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// A tokio connector over [`config`](Self::config).
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }

    /// Re-reads the client certificate and key files. A certificate naming
    /// another identity ([`identity_from_der`]) than the one in use is
    /// refused ([`TlsError::IdentityChanged`]) and the old one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.cert.reload_checked(|old, new| {
            let (old, new) = (leaf_identity(old), leaf_identity(new));
            if old == new {
                Ok(())
            } else {
                Err(TlsError::IdentityChanged {
                    path: self.cert.cert_path.clone(),
                    old,
                    new,
                })
            }
        })
    }

    /// The identity ([`identity_from_der`]) of the client certificate in
    /// use.
    pub fn identity(&self) -> Option<String> {
        leaf_identity(&self.cert.get())
    }
}

/// Builds the upstream client configuration: TLS 1.3, ALPN h2, trusting only
/// the CA certificates in `ca_path`, authenticating with
/// `client_cert`/`client_key`.
pub fn client_config(
    ca_path: &Path,
    client_cert: &Path,
    client_key: &Path,
) -> Result<ReloadableClient, TlsError> {
    let provider = provider();
    let roots = load_roots(ca_path)?;
    let cert = Arc::new(ReloadableCert::load(client_cert, client_key)?);
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(cert.clone());
    config.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    Ok(ReloadableClient {
        config: Arc::new(config),
        cert,
    })
}

// ---------------------------------------------------------------------------
// Peer identity
// ---------------------------------------------------------------------------

/// The identity of a verified client: the first DNS name in its leaf
/// certificate's subjectAltName, or else its subject CN. `None` when the
/// client sent no certificate (rustls only exposes verified ones) or the
/// name is not printable ASCII.
pub fn peer_identity(conn: &ServerConnection) -> Option<String> {
    conn.peer_certificates()?
        .first()
        .and_then(|c| identity_from_der(c))
}

/// The identity of a certified key's leaf certificate.
fn leaf_identity(key: &CertifiedKey) -> Option<String> {
    key.cert.first().and_then(|c| identity_from_der(c))
}

/// [`peer_identity`] for a certificate in DER.
pub fn identity_from_der(der: &[u8]) -> Option<String> {
    let (cert, _) = der::expect(der, der::SEQUENCE)?;
    let (tbs, _) = der::expect(cert, der::SEQUENCE)?;
    let mut tbs = der::Reader(tbs);
    // [0] version (optional), then serial, signature, issuer, validity.
    let (first, _) = tbs.next()?;
    let skip = if first == der::VERSION { 4 } else { 3 };
    for _ in 0..skip {
        tbs.next()?;
    }
    let (subject_tag, subject) = tbs.next()?;
    if subject_tag != der::SEQUENCE {
        return None;
    }
    tbs.next()?; // subjectPublicKeyInfo
    let mut san = None;
    while let Some((tag, body)) = tbs.next() {
        if tag == der::EXTENSIONS {
            san = first_dns_san(body);
        }
    }
    san.or_else(|| subject_cn(subject))
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()))
}

/// First dNSName of the subjectAltName extension in `[3] { SEQUENCE OF
/// Extension }`.
fn first_dns_san(explicit: &[u8]) -> Option<String> {
    let (exts, _) = der::expect(explicit, der::SEQUENCE)?;
    let mut exts = der::Reader(exts);
    while let Some((tag, ext)) = exts.next() {
        if tag != der::SEQUENCE {
            return None;
        }
        let mut ext = der::Reader(ext);
        let (oid_tag, oid) = ext.next()?;
        if oid_tag != der::OID || oid != der::OID_SAN {
            continue;
        }
        let mut value = ext.next()?;
        if value.0 == der::BOOLEAN {
            value = ext.next()?; // `critical`
        }
        if value.0 != der::OCTET_STRING {
            return None;
        }
        let (names, _) = der::expect(value.1, der::SEQUENCE)?;
        let mut names = der::Reader(names);
        while let Some((tag, name)) = names.next() {
            if tag == der::DNS_NAME {
                return String::from_utf8(name.to_vec()).ok();
            }
        }
        return None;
    }
    None
}

/// The first commonName in a Name (`SEQUENCE OF SET OF AttributeTypeAndValue`).
fn subject_cn(name: &[u8]) -> Option<String> {
    let mut rdns = der::Reader(name);
    while let Some((_, set)) = rdns.next() {
        let mut atvs = der::Reader(set);
        while let Some((_, atv)) = atvs.next() {
            let mut atv = der::Reader(atv);
            let (oid_tag, oid) = atv.next()?;
            if oid_tag == der::OID && oid == der::OID_CN {
                let (_, value) = atv.next()?;
                return String::from_utf8(value.to_vec()).ok();
            }
        }
    }
    None
}

/// Just enough DER to find names in an X.509 certificate; every read is
/// bounds-checked and returns `None` on malformed input.
mod der {
    pub(super) const SEQUENCE: u8 = 0x30;
    pub(super) const BOOLEAN: u8 = 0x01;
    pub(super) const OCTET_STRING: u8 = 0x04;
    pub(super) const OID: u8 = 0x06;
    pub(super) const VERSION: u8 = 0xA0;
    pub(super) const EXTENSIONS: u8 = 0xA3;
    /// `[2] IMPLICIT IA5String` in GeneralName.
    pub(super) const DNS_NAME: u8 = 0x82;
    /// 2.5.29.17 subjectAltName.
    pub(super) const OID_SAN: &[u8] = &[0x55, 0x1D, 0x11];
    /// 2.5.4.3 commonName.
    pub(super) const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

    /// Sequential reader of TLVs.
    pub(super) struct Reader<'a>(pub(super) &'a [u8]);

    impl<'a> Reader<'a> {
        /// The next `(tag, contents)`, or `None` at the end or on bad input.
        pub(super) fn next(&mut self) -> Option<(u8, &'a [u8])> {
            let (&tag, rest) = self.0.split_first()?;
            let (&first, rest) = rest.split_first()?;
            let (len, rest) = if first < 0x80 {
                (usize::from(first), rest)
            } else {
                let n = usize::from(first & 0x7F);
                if n == 0 || n > 4 || rest.len() < n {
                    return None;
                }
                let len = rest[..n]
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
                (len, &rest[n..])
            };
            if rest.len() < len {
                return None;
            }
            let (body, rest) = rest.split_at(len);
            self.0 = rest;
            Some((tag, body))
        }
    }

    /// Reads one TLV that must have `tag`; returns its contents and the rest.
    pub(super) fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let mut r = Reader(input);
        match r.next()? {
            (t, body) if t == tag => Some((body, r.0)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Development PKI
// ---------------------------------------------------------------------------

/// A throwaway PKI for demos and tests: one CA, one server certificate and
/// client certificates, written as PEM files with keys at mode 0600. Not for
/// production: the CA key sits next to the certificates.
pub mod dev_pki {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use zeroize::Zeroizing;

    use super::TlsError;

    /// Names of the files written by [`generate`].
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct DevPki {
        /// `ca.pem`: the CA certificate (trust anchor for both sides).
        pub ca_cert: PathBuf,
        /// `ca.key`: the CA key.
        pub ca_key: PathBuf,
        /// `server.pem`: server certificate for `localhost`, `127.0.0.1`
        /// and any extra names.
        pub server_cert: PathBuf,
        /// `server.key`.
        pub server_key: PathBuf,
        /// `client-<name>.pem` / `client-<name>.key` per client name.
        pub clients: Vec<(String, PathBuf, PathBuf)>,
    }

    /// Whether `name` is usable as a client name and file-name part:
    /// `[a-z0-9._-]{1,64}`, not starting with `.`.
    pub fn valid_name(name: &str) -> bool {
        (1..=64).contains(&name.len())
            && !name.starts_with('.')
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    }

    fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
        move |source| TlsError::Generate {
            what: what.to_string(),
            source,
        }
    }

    fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
        let err = |source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            opts.mode(mode);
            let mut f = opts.open(path).map_err(err)?;
            // `mode` only applies to new files: fix an existing one too.
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(err)?;
            f.write_all(contents).map_err(err)?;
            f.sync_all().map_err(err)
        }
        #[cfg(not(unix))]
        {
            let _ = mode;
            let mut f = opts.open(path).map_err(err)?;
            f.write_all(contents).map_err(err)?;
            f.sync_all().map_err(err)
        }
    }

    fn write_key(path: &Path, key: &KeyPair) -> Result<(), TlsError> {
        let pem = Zeroizing::new(key.serialize_pem());
        write(path, pem.as_bytes(), 0o600)
    }

    fn leaf(
        names: Vec<String>,
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
        issuer: &Issuer<'_, KeyPair>,
        what: &str,
    ) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
        let mut params = CertificateParams::new(names).map_err(gen_err(what))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(gen_err(what))?;
        let cert = params.signed_by(&key, issuer).map_err(gen_err(what))?;
        Ok((cert, key))
    }

    /// Writes a fresh CA, a server certificate (SANs `localhost`,
    /// `127.0.0.1` and `server_names`) and one client certificate per
    /// `client_names` entry (DNS SAN and CN = the name) into `dir`,
    /// creating it. Existing files of the same names are replaced.
    pub fn generate(
        dir: &Path,
        server_names: &[String],
        client_names: &[String],
    ) -> Result<DevPki, TlsError> {
        for name in client_names {
            if !valid_name(name) {
                return Err(TlsError::Config(format!(
                    "client name `{name}` must be 1 to 64 characters from [a-z0-9._-]"
                )));
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;

        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("ca"))?;
        ca.distinguished_name
            .push(DnType::CommonName, "dapgw dev CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().map_err(gen_err("ca"))?;
        let ca_cert = ca.self_signed(&ca_key).map_err(gen_err("ca"))?;
        let pki = DevPki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            clients: client_names
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        dir.join(format!("client-{n}.pem")),
                        dir.join(format!("client-{n}.key")),
                    )
                })
                .collect(),
        };
        write(&pki.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
        write_key(&pki.ca_key, &ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        names.extend(server_names.iter().cloned());
        let (cert, key) = leaf(
            names,
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
            "server certificate",
        )?;
        write(&pki.server_cert, cert.pem().as_bytes(), 0o644)?;
        write_key(&pki.server_key, &key)?;

        for (name, cert_path, key_path) in &pki.clients {
            let what = format!("client certificate {name}");
            let (cert, key) = leaf(
                vec![name.clone()],
                name,
                ExtendedKeyUsagePurpose::ClientAuth,
                &issuer,
                &what,
            )?;
            write(cert_path, cert.pem().as_bytes(), 0o644)?;
            write_key(key_path, &key)?;
        }
        Ok(pki)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_reader_refuses_truncation() {
        let mut r = der::Reader(&[0x30, 0x05, 0x01]);
        assert!(r.next().is_none());
        let mut r = der::Reader(&[0x30, 0x85, 1, 1, 1, 1, 1]);
        assert!(r.next().is_none(), "5-byte lengths refused");
        let mut r = der::Reader(&[0x04, 0x81, 0x01, 0xAA]);
        assert_eq!(r.next(), Some((0x04, &[0xAA][..])));
        assert!(identity_from_der(&[]).is_none());
        assert!(identity_from_der(&[0x30, 0x00]).is_none());
    }

    #[test]
    fn identity_of_generated_certs() {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            dev_pki::generate(dir.path(), &["udc.internal".into()], &["gw-0017".into()]).unwrap();
        let client = load_certs(&pki.clients[0].1).unwrap();
        assert_eq!(identity_from_der(&client[0]).as_deref(), Some("gw-0017"));
        let server = load_certs(&pki.server_cert).unwrap();
        assert_eq!(identity_from_der(&server[0]).as_deref(), Some("localhost"));
        // The CA has no SAN: its CN is used.
        let ca = load_certs(&pki.ca_cert).unwrap();
        assert_eq!(
            identity_from_der(&ca[0]),
            None,
            "CN with a space is not an identity"
        );
        // Every prefix of a certificate is refused without panicking.
        for n in 0..client[0].len() {
            let _ = identity_from_der(&client[0][..n]);
        }
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    type Pair = (
        server::TlsStream<tokio::io::DuplexStream>,
        client::TlsStream<tokio::io::DuplexStream>,
    );

    /// One handshake over an in-memory pipe.
    async fn handshake(
        acceptor: TlsAcceptor,
        connector: TlsConnector,
    ) -> Result<Pair, std::io::Error> {
        let (a, b) = duplex(64 * 1024);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        Ok((s?, c?))
    }

    /// A client that trusts `ca` and has no certificate of its own.
    fn anonymous_client(ca: &Path) -> TlsConnector {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(load_roots(ca).unwrap())
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    fn pki(dir: &Path) -> dev_pki::DevPki {
        dev_pki::generate(dir, &[], &["gw-1".into()]).unwrap()
    }

    #[tokio::test]
    async fn mutual_tls_names_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let p = pki(dir.path());
        let srv = server_config(&p.server_cert, &p.server_key, Some(&p.ca_cert), true).unwrap();
        let cli = client_config(&p.ca_cert, &p.clients[0].1, &p.clients[0].2).unwrap();
        let (mut s, mut c) = handshake(srv.acceptor(), cli.connector()).await.unwrap();
        let conn = s.get_ref().1;
        assert_eq!(peer_identity(conn).as_deref(), Some("gw-1"));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn client_certificates_required_or_optional() {
        let dir = tempfile::tempdir().unwrap();
        let p = pki(dir.path());
        let required =
            server_config(&p.server_cert, &p.server_key, Some(&p.ca_cert), true).unwrap();
        // The server's accept fails for a client without a certificate.
        let res = handshake(required.acceptor(), anonymous_client(&p.ca_cert)).await;
        assert!(res.is_err(), "anonymous client admitted");

        let optional =
            server_config(&p.server_cert, &p.server_key, Some(&p.ca_cert), false).unwrap();
        let (s, _c) = handshake(optional.acceptor(), anonymous_client(&p.ca_cert))
            .await
            .unwrap();
        assert_eq!(peer_identity(s.get_ref().1), None);

        let none = server_config(&p.server_cert, &p.server_key, None, false).unwrap();
        handshake(none.acceptor(), anonymous_client(&p.ca_cert))
            .await
            .unwrap();
        assert!(matches!(
            server_config(&p.server_cert, &p.server_key, None, true),
            Err(TlsError::Config(_))
        ));
    }

    #[tokio::test]
    async fn only_the_pinned_ca_is_trusted() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (pa, pb) = (pki(a.path()), pki(b.path()));
        let srv = server_config(&pa.server_cert, &pa.server_key, Some(&pa.ca_cert), true).unwrap();
        // The client pins B's CA: A's server is refused.
        let cli = client_config(&pb.ca_cert, &pb.clients[0].1, &pb.clients[0].2).unwrap();
        assert!(handshake(srv.acceptor(), cli.connector()).await.is_err());
        // A client certificate from another CA is refused by the server.
        let cli = client_config(&pa.ca_cert, &pb.clients[0].1, &pb.clients[0].2).unwrap();
        assert!(handshake(srv.acceptor(), cli.connector()).await.is_err());
    }

    /// A client certificate reloaded from its files keeps the identity in
    /// use: a renewal (same name, new key) is taken, a certificate of
    /// another name is refused and the old one stays.
    #[test]
    fn client_reload_keeps_the_identity() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let pa = pki(a.path());
        let renewed = pki(b.path());
        let other = dev_pki::generate(c.path(), &[], &["gw-2".into()]).unwrap();
        let live = tempfile::tempdir().unwrap();
        let (cert, key) = (live.path().join("c.pem"), live.path().join("k.pem"));
        let put = |p: &dev_pki::DevPki| {
            std::fs::copy(&p.clients[0].1, &cert).unwrap();
            std::fs::copy(&p.clients[0].2, &key).unwrap();
        };
        put(&pa);
        let cli = client_config(&pa.ca_cert, &cert, &key).unwrap();
        assert_eq!(cli.identity().as_deref(), Some("gw-1"));
        let first = cli.cert.chain();
        put(&other);
        match cli.reload() {
            Err(TlsError::IdentityChanged { old, new, .. }) => {
                assert_eq!(
                    (old.as_deref(), new.as_deref()),
                    (Some("gw-1"), Some("gw-2"))
                );
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(cli.identity().as_deref(), Some("gw-1"));
        assert_eq!(
            cli.cert.chain(),
            first,
            "the refused certificate is not in use"
        );
        put(&renewed);
        cli.reload().unwrap();
        assert_eq!(cli.identity().as_deref(), Some("gw-1"));
        assert_ne!(cli.cert.chain(), first, "the renewal is in use");
    }

    #[tokio::test]
    async fn reload_swaps_the_certificate_and_keeps_connections() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (pa, pb) = (pki(a.path()), pki(b.path()));
        let live = tempfile::tempdir().unwrap();
        let (cert, key) = (live.path().join("tls.pem"), live.path().join("tls.key"));
        std::fs::copy(&pa.server_cert, &cert).unwrap();
        std::fs::copy(&pa.server_key, &key).unwrap();
        let srv = server_config(&cert, &key, None, false).unwrap();
        let (mut s1, mut c1) = handshake(srv.acceptor(), anonymous_client(&pa.ca_cert))
            .await
            .unwrap();

        // Rotate to B's certificate.
        std::fs::copy(&pb.server_cert, &cert).unwrap();
        std::fs::copy(&pb.server_key, &key).unwrap();
        srv.reload().unwrap();
        assert!(
            handshake(srv.acceptor(), anonymous_client(&pa.ca_cert))
                .await
                .is_err()
        );
        handshake(srv.acceptor(), anonymous_client(&pb.ca_cert))
            .await
            .unwrap();

        // The connection made before the reload still carries data.
        c1.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        s1.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");

        // A broken key file: reload fails naming it, B keeps being served.
        let served = srv.cert().chain();
        std::fs::write(&key, "not a key").unwrap();
        let err = srv.reload().unwrap_err();
        assert!(err.to_string().contains("tls.key"), "{err}");
        assert_eq!(srv.cert().chain(), served);
        handshake(srv.acceptor(), anonymous_client(&pb.ca_cert))
            .await
            .unwrap();
        // A key from another certificate: refused as a mismatch.
        std::fs::copy(&pa.server_key, &key).unwrap();
        assert!(matches!(srv.reload(), Err(TlsError::Key { .. })));
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = pki(dir.path());
        let missing = dir.path().join("missing.pem");
        let err = server_config(&missing, &p.server_key, None, false).unwrap_err();
        assert!(
            matches!(err, TlsError::Read { .. }) && err.to_string().contains("missing.pem"),
            "{err}"
        );
        // A key file where certificates are expected holds no certificate.
        let err = load_certs(&p.server_key).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = load_key(&p.server_cert).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("server.pem"), "{err}");
        let err = client_config(&p.server_key, &p.clients[0].1, &p.clients[0].2).unwrap_err();
        assert!(err.to_string().contains("server.key"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn dev_pki_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p =
            dev_pki::generate(dir.path(), &["udc".into()], &["a".into(), "b.c".into()]).unwrap();
        for key in [&p.ca_key, &p.server_key, &p.clients[0].2, &p.clients[1].2] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(dev_pki::generate(dir.path(), &[], &["../evil".into()]).is_err());
        assert!(dev_pki::generate(dir.path(), &[], &["Upper".into()]).is_err());
    }

    #[test]
    fn cn_is_the_identity_without_a_san() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "dapgw");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gw-cn.example");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            identity_from_der(cert.der()).as_deref(),
            Some("gw-cn.example")
        );
    }
}
