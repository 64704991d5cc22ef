//! Certificates: the dev PKI, loading PEM files, and the rustls configurations of each link.
//!
//! A cluster has one CA. Every server holds one node certificate signed by it, valid for TLS server
//! and client authentication, which it presents on both sides of `roster-peer/1` (mutual TLS) and to
//! clients on `roster/1`. Clients verify the server against the CA file and present no certificate.
//!
//! Each CA gets a subject name with a random suffix, so a node given another cluster's CA fails with
//! an unknown-issuer error instead of a confusing bad signature.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The CA certificate file in a TLS directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key; needed only to sign more certificates.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The node certificate every server presents.
pub const NODE_CERT_FILE: &str = "node.pem";
/// The node certificate's private key.
pub const NODE_KEY_FILE: &str = "node-key.pem";

/// Names every node certificate is valid for, besides those asked for.
pub const DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A freshly generated CA and node certificate, as PEM text.
pub struct Pki {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub node_cert_pem: String,
    pub node_key_pem: String,
}

impl Pki {
    /// Generates a CA and a node certificate valid for [`DEFAULT_NAMES`] and `extra_names`.
    pub fn generate(extra_names: &[String]) -> Result<Self> {
        let fail = |e: rcgen::Error| Error::Internal(format!("certificate generation failed: {e}"));

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        let mut ca_name = DistinguishedName::new();
        ca_name.push(
            DnType::CommonName,
            format!("Roster cluster CA {:08x}", rand::random::<u32>()),
        );
        ca_name.push(DnType::OrganizationName, "Roster");
        ca_params.distinguished_name = ca_name;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().map_err(fail)?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(fail)?;

        let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|s| s.to_string()).collect();
        for name in extra_names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let mut node_params = CertificateParams::new(names).map_err(fail)?;
        let mut node_name = DistinguishedName::new();
        node_name.push(DnType::CommonName, "roster node");
        node_params.distinguished_name = node_name;
        node_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        node_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let node_key = KeyPair::generate().map_err(fail)?;
        let node_cert = node_params.signed_by(&node_key, &ca).map_err(fail)?;

        Ok(Pki {
            ca_cert_pem: ca.pem(),
            ca_key_pem,
            node_cert_pem: node_cert.pem(),
            node_key_pem: node_key.serialize_pem(),
        })
    }

    /// Writes the four PEM files into `dir` (created if missing); keys are readable by the owner only.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::InvalidArgument(format!("cannot create {}: {e}", dir.display())))?;
        write_file(&dir.join(CA_CERT_FILE), &self.ca_cert_pem, false)?;
        write_file(&dir.join(CA_KEY_FILE), &self.ca_key_pem, true)?;
        write_file(&dir.join(NODE_CERT_FILE), &self.node_cert_pem, false)?;
        write_file(&dir.join(NODE_KEY_FILE), &self.node_key_pem, true)?;
        Ok(())
    }

    /// The identity a server built from these certificates presents.
    pub fn node_identity(&self) -> Result<NodeIdentity> {
        Ok(NodeIdentity {
            ca: parse_certs(self.ca_cert_pem.as_bytes(), Path::new(CA_CERT_FILE))?,
            chain: parse_certs(self.node_cert_pem.as_bytes(), Path::new(NODE_CERT_FILE))?,
            key: PrivateKeyDer::from_pem_slice(self.node_key_pem.as_bytes())
                .map_err(|e| Error::Internal(format!("generated key does not parse: {e}")))?,
        })
    }
}

/// Writes `text` to `path`, private to the owner when `secret`.
pub fn write_file(path: &Path, text: &str, secret: bool) -> Result<()> {
    let fail =
        |e: std::io::Error| Error::InvalidArgument(format!("cannot write {}: {e}", path.display()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    use std::io::Write;
    let mut file = options.open(path).map_err(fail)?;
    // A file that already existed keeps its mode on open: narrow it before the secret goes in.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    file.write_all(text.as_bytes()).map_err(fail)
}

/// What a server needs to speak TLS: the cluster CA, its certificate chain and its key.
#[derive(Debug)]
pub struct NodeIdentity {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl NodeIdentity {
    /// Loads `ca.pem`, `node.pem` and `node-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let ca = load_certs(&dir.join(CA_CERT_FILE))?;
        let chain = load_certs(&dir.join(NODE_CERT_FILE))?;
        let key_path = dir.join(NODE_KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot read a private key from {}: {e}{}",
                key_path.display(),
                hint_certs(dir)
            ))
        })?;
        Ok(NodeIdentity { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        roots_from(&self.ca)
    }
}

fn hint_certs(dir: &Path) -> String {
    format!(
        " (create a cluster's certificates with `roster certs --dir {}`)",
        dir.display()
    )
}

/// Loads every certificate in a PEM file; at least one must be there.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = fs::read(path).map_err(|e| {
        let dir = path.parent().map(PathBuf::from).unwrap_or_default();
        Error::InvalidArgument(format!(
            "cannot read {}: {e}{}",
            path.display(),
            hint_certs(&dir)
        ))
    })?;
    parse_certs(&text, path)
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// A root store holding `certs`.
pub fn roots_from(certs: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert.clone())
            .map_err(|e| Error::InvalidArgument(format!("CA certificate rejected: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(e: rustls::Error) -> Error {
    Error::InvalidArgument(format!("TLS configuration: {e}"))
}

/// TLS for a server's client endpoint (`roster/1`): server certificate only.
pub fn client_facing_server(identity: &NodeIdentity, alpn: &[u8]) -> Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_error)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// TLS for a server's peer endpoint (`roster-peer/1`): the peer must present a certificate from the
/// cluster CA.
pub fn peer_server(identity: &NodeIdentity, alpn: &[u8]) -> Result<rustls::ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(identity.roots()?, provider())
        .build()
        .map_err(|e| Error::InvalidArgument(format!("TLS client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_error)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// TLS for a server dialing a peer: verifies the peer against the cluster CA and presents the node
/// certificate.
pub fn peer_client(identity: &NodeIdentity, alpn: &[u8]) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(identity.roots()?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_error)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// TLS for an SDK client: verifies the session server against `roots`, presents nothing.
pub fn client(roots: Arc<RootCertStore>, alpn: &[u8]) -> Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}
