//! The control plane's own CA: created once by `control-plane init`, it
//! issues the control plane's server certificate and every replica's client
//! certificate from the replica's CSR (the replica's key never leaves its host).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use super::{ControlError, create_private, now_unix, read_private};

const CA_KEY: &str = "ca.key";
const CA_CERT: &str = "ca.crt";
const SERVER_KEY: &str = "server.key";
const SERVER_CERT: &str = "server.crt";

/// The CA lives ten years; the server certificate as long.
const CA_LIFETIME: Duration = Duration::from_hours(24 * 3650);

fn pki(what: &str) -> impl FnOnce(rcgen::Error) -> ControlError + '_ {
    move |e| ControlError::Pki(format!("{what}: {e}"))
}

fn time_at(unix: u64) -> Result<time::OffsetDateTime, ControlError> {
    let secs = i64::try_from(unix).map_err(|_| ControlError::Pki("time out of range".into()))?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| ControlError::Pki(format!("time: {e}")))
}

fn random_serial() -> Result<SerialNumber, ControlError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ControlError::Pki("no randomness for a serial number".into()))?;
    Ok(serial_from(bytes))
}

/// A serial of 126 random bits whose first byte is 0x40..=0x7f: positive,
/// and with no leading zero for DER to drop, so the serial a certificate
/// carries is the one recorded.
fn serial_from(mut bytes: [u8; 16]) -> SerialNumber {
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    out
}

/// The first certificate of a PEM text.
pub fn first_cert(pem: &[u8], path: &Path) -> Result<CertificateDer<'static>, ControlError> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| ControlError::Pki(format!("{} holds no certificate", path.display())))
}

/// The control plane's CA and where it lives.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

/// A certificate issued to a replica.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM.
    pub pem: String,
    /// Serial number (hex).
    pub serial: String,
    /// Expiry (Unix seconds).
    pub expires_unix: u64,
}

impl Ca {
    /// Creates a new CA and server certificate in `dir` (names and addresses
    /// the control plane is reached by in `sans`); refuses if one exists.
    pub fn init(dir: &Path, sans: &[String]) -> Result<(), ControlError> {
        std::fs::create_dir_all(dir).map_err(super::io_error(dir))?;
        let ca_key = KeyPair::generate().map_err(pki("CA key"))?;
        let mut ca = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Portcullis control plane CA");
        ca.distinguished_name = name;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = time_at(now_unix().saturating_sub(60))?;
        ca.not_after = time_at(now_unix() + CA_LIFETIME.as_secs())?;
        ca.serial_number = Some(random_serial()?);
        let ca_cert = ca.self_signed(&ca_key).map_err(pki("CA certificate"))?;
        let issuer = Issuer::new(ca, &ca_key);
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        names.extend(sans.iter().cloned());
        let server_key = KeyPair::generate().map_err(pki("server key"))?;
        let mut server = CertificateParams::new(names).map_err(pki("server names"))?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Portcullis control plane");
        server.distinguished_name = name;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.not_before = time_at(now_unix().saturating_sub(60))?;
        server.not_after = time_at(now_unix() + CA_LIFETIME.as_secs())?;
        server.serial_number = Some(random_serial()?);
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(pki("server certificate"))?;
        create_private(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes())?;
        create_private(&dir.join(CA_CERT), ca_cert.pem().as_bytes())?;
        create_private(&dir.join(SERVER_KEY), server_key.serialize_pem().as_bytes())?;
        create_private(&dir.join(SERVER_CERT), server_cert.pem().as_bytes())?;
        Ok(())
    }

    /// The CA of `dir`; its key must be mode 0600 (or stricter).
    pub fn open(dir: &Path) -> Result<Self, ControlError> {
        let key_path = dir.join(CA_KEY);
        let key_pem = String::from_utf8_lossy(&read_private(&key_path)?).into_owned();
        let key = KeyPair::from_pem(&key_pem).map_err(pki("CA key"))?;
        let cert_path = dir.join(CA_CERT);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(super::io_error(&cert_path))?;
        let cert_der = first_cert(cert_pem.as_bytes(), &cert_path)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            cert_pem,
            cert_der,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate: what a registration token pins.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }

    /// A client certificate for `replica`, for the public key of `csr_pem`,
    /// valid for `lifetime`. Nothing else of the request is trusted: the
    /// name, usages and constraints are the control plane's.
    pub fn issue(
        &self,
        csr_pem: &str,
        replica: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, ControlError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(pki("the signing request"))?;
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(pki("CA certificate"))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, replica);
        params.distinguished_name = name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = now_unix();
        let expires_unix = now + lifetime.as_secs().max(1);
        // Only this control plane verifies it, on the clock that issued it: no back-dating.
        params.not_before = time_at(now)?;
        params.not_after = time_at(expires_unix)?;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(pki("the replica certificate"))?;
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: super::hex(serial.as_ref()),
            expires_unix,
        })
    }

    /// The server's TLS configuration: its certificate and chain, and client
    /// certificates of this CA verified when offered (registration has none yet).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ControlError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| ControlError::Pki(format!("CA certificate: {e}")))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| ControlError::Pki(format!("client verifier: {e}")))?;
        let cert_path = self.dir.join(SERVER_CERT);
        let cert_pem = std::fs::read(&cert_path).map_err(super::io_error(&cert_path))?;
        let leaf = first_cert(&cert_pem, &cert_path)?;
        let key_path = self.dir.join(SERVER_KEY);
        let key = PrivateKeyDer::from_pem_slice(&read_private(&key_path)?)
            .map_err(|e| ControlError::Pki(format!("{}: {e}", key_path.display())))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ControlError::Pki(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![leaf, self.cert_der.clone()], key)
            .map_err(|e| ControlError::Pki(format!("server certificate: {e}")))?;
        Ok(Arc::new(config))
    }
}

/// A client configuration that trusts only the CA whose fingerprint a
/// registration token carries (first contact, as kubeadm's discovery hash):
/// the server must present that CA in its chain and a leaf it signed.
pub fn pinned_client(fingerprint: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, ControlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlError::Pki(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            fingerprint,
            provider,
        }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client configuration trusting `ca_pem` and presenting `cert_pem` / `key_pem`.
pub fn mtls_client(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ClientConfig>, ControlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| ControlError::Pki(format!("CA bundle: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ControlError::Pki(format!("CA bundle: {e}")))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ControlError::Pki(format!("replica certificate: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| ControlError::Pki(format!("replica key: {e}")))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlError::Pki(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| ControlError::Pki(format!("replica certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// Verifies the server against the one CA a token pins.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.fingerprint) else {
            return Err(rustls::Error::General(
                "the control plane's CA does not match the token's fingerprint".into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The replica name (common name) and serial (hex) of a client certificate.
pub fn identity(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some((name, super::hex(cert.raw_serial())))
}

/// Whether a recorded serial (hex) is the one a certificate presented.
/// Records from before serials kept their leading zero byte hold it, where
/// the certificate's DER integer does not.
pub fn same_serial(recorded: &str, presented: &str) -> bool {
    fn trim(mut s: &str) -> &str {
        while s.len() > 2 && s.starts_with("00") {
            s = &s[2..];
        }
        s
    }
    trim(recorded) == trim(presented)
}

/// Expiry (Unix seconds) of the first certificate of `pem`.
pub fn expiry(pem: &[u8]) -> Option<u64> {
    validity(pem).map(|(_, not_after)| not_after)
}

/// `(not before, not after)` (Unix seconds) of the first certificate of `pem`.
pub fn validity(pem: &[u8]) -> Option<(u64, u64)> {
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    Some((
        u64::try_from(v.not_before.timestamp()).ok()?,
        u64::try_from(v.not_after.timestamp()).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_recorded_is_the_one_the_certificate_presents() {
        let dir = std::env::temp_dir().join(format!("pc-ca-serial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Ca::init(&dir, &[]).expect("a new CA");
        let ca = Ca::open(&dir).expect("the CA");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "gw-a");
        let csr = params.serialize_request(&key).and_then(|r| r.pem()).expect("CSR");
        // A leading zero byte (1 serial in 128 before) is where they differed.
        for _ in 0..400 {
            let cert = ca.issue(&csr, "gw-a", Duration::from_mins(1)).expect("issued");
            let der = first_cert(cert.pem.as_bytes(), &dir).expect("DER");
            let (name, serial) = identity(&der).expect("identity");
            assert_eq!((name.as_str(), serial.as_str()), ("gw-a", cert.serial.as_str()));
        }
        let _ = std::fs::remove_dir_all(&dir);
        for first in [0x00, 0x3f, 0x80, 0xff] {
            let serial = serial_from([first; 16]);
            assert_eq!(serial.as_ref().len(), 16);
            assert!((0x40..=0x7f).contains(&serial.as_ref()[0]), "{first:#x}");
        }
        assert!(same_serial("003d7c", "3d7c"));
        assert!(!same_serial("3d7c", "3d7d"));
    }
}
