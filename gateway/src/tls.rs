//! TLS material: certificates and keys from files, and the rustls configs built from them.
//!
//! Private keys arrive already resolved from their secret references (see
//! `config::secret`, which refuses loose files with the fix to run).

use std::fs;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{CertPair, ConfigError, InboundTls, Origin, OutboundTls, Pem, TlsVersion};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn versions(min: TlsVersion, max: TlsVersion) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let mut v = Vec::new();
    if min <= TlsVersion::V12 && max >= TlsVersion::V12 {
        v.push(&rustls::version::TLS12);
    }
    if max >= TlsVersion::V13 {
        v.push(&rustls::version::TLS13);
    }
    v
}

fn certs(pem: &Pem, origin: &Origin) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let parsed: Result<Vec<_>, _> = match pem {
        Pem::File(path) => {
            let bytes =
                fs::read(path).map_err(|e| origin.error(format!("cannot read {}: {e}", path.display())))?;
            CertificateDer::pem_slice_iter(&bytes).collect()
        }
        Pem::Inline(text) => CertificateDer::pem_slice_iter(text.as_bytes()).collect(),
    };
    let where_ = match pem {
        Pem::File(p) => p.display().to_string(),
        Pem::Inline(_) => "the inline PEM".into(),
    };
    let list = parsed.map_err(|e| origin.error(format!("{where_} is not PEM certificates: {e}")))?;
    if list.is_empty() {
        return Err(origin.error(format!("{where_} holds no CERTIFICATE block")));
    }
    Ok(list)
}

/// Parses a private key resolved from its secret reference.
pub fn parse_key(pair: &CertPair) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_slice(pair.key.expose()).map_err(|e| {
        pair.origin
            .error(format!("the key holds no usable PEM private key: {e}"))
    })
}

fn certified_key(pair: &CertPair, provider: &CryptoProvider) -> Result<CertifiedKey, ConfigError> {
    let chain = certs(&pair.crt, &pair.origin)?;
    let key = parse_key(pair)?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        pair.origin
            .error(format!("certificate and key do not form a usable pair: {e}"))
    })
}

fn roots(pem: &Pem, origin: &Origin) -> Result<RootCertStore, ConfigError> {
    let mut store = RootCertStore::empty();
    for cert in certs(pem, origin)? {
        store
            .add(cert)
            .map_err(|e| origin.error(format!("CA certificate rejected: {e}")))?;
    }
    Ok(store)
}

/// Picks the certificate whose names match the client's SNI; the first one otherwise.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name().and_then(|n| ServerName::try_from(n).ok()) {
            for key in &self.keys {
                let Some(leaf) = key.cert.first() else { continue };
                let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
                    continue;
                };
                if cert.verify_is_valid_for_subject_name(&name).is_ok() {
                    return Some(key.clone());
                }
            }
        }
        self.keys.first().cloned()
    }
}

/// Builds the server config of a TLS listener.
pub fn server_config(tls: &InboundTls) -> Result<Arc<ServerConfig>, Vec<ConfigError>> {
    let provider = provider();
    let mut errors = Vec::new();
    let mut keys = Vec::new();
    for pair in &tls.certs {
        match certified_key(pair, &provider) {
            Ok(k) => keys.push(Arc::new(k)),
            Err(e) => errors.push(e),
        }
    }
    let verifier = match &tls.client_ca {
        Some(ca) => match roots(ca, &tls.origin) {
            Ok(store) => {
                let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone());
                let builder = if tls.require_client_cert {
                    builder
                } else {
                    builder.allow_unauthenticated()
                };
                match builder.build() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        errors.push(tls.origin.error(format!("client certificate verifier: {e}")));
                        None
                    }
                }
            }
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => None,
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions(tls.min, tls.max))
        .map_err(|e| vec![tls.origin.error(format!("TLS versions: {e}"))])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { keys }));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds the client config for a TLS upstream.
pub fn client_config(tls: &OutboundTls) -> Result<Arc<ClientConfig>, Vec<ConfigError>> {
    let provider = provider();
    let store = if let Some(ca) = &tls.ca {
        roots(ca, &tls.origin).map_err(|e| vec![e])?
    } else {
        let mut store = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = store.add(cert);
        }
        if store.is_empty() {
            return Err(vec![tls.origin.error(
                "no system CA certificates found; give trustedCA in a tls-outbound binding",
            )]);
        }
        store
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions(tls.min, tls.max))
        .map_err(|e| vec![tls.origin.error(format!("TLS versions: {e}"))])?
        .with_root_certificates(store);
    let mut config = match &tls.client {
        Some(pair) => {
            let chain = certs(&pair.crt, &pair.origin).map_err(|e| vec![e])?;
            let key = parse_key(pair).map_err(|e| vec![e])?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| vec![pair.origin.error(format!("client certificate and key: {e}"))])?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// A hash of the files behind an outbound TLS context, to notice rotated certificates on reload.
pub fn fingerprint(tls: &OutboundTls) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let add = |pem: &Pem, hasher: &mut std::collections::hash_map::DefaultHasher| match pem {
        Pem::File(path) => fs::read(path).unwrap_or_default().hash(hasher),
        Pem::Inline(text) => text.hash(hasher),
    };
    if let Some(ca) = &tls.ca {
        add(ca, &mut hasher);
    }
    if let Some(pair) = &tls.client {
        add(&pair.crt, &mut hasher);
        pair.key.expose().hash(&mut hasher);
    }
    hasher.finish()
}

/// The server name an upstream connection verifies.
pub fn upstream_name(sni: Option<&str>, host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(sni.unwrap_or(host).to_string())
        .map_err(|e| format!("`{}` is not a valid TLS server name: {e}", sni.unwrap_or(host)))
}
