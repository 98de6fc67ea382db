//! `http` / `https`: `GET path` over a fresh connection, `Host` from `host` (default: the
//! target), the status checked against `expect_status`. https sends `host` as SNI and, unless a
//! CA bundle is configured, accepts any certificate (a health check asks "does it answer", not
//! "is it who it claims": the backend's address already came from a trusted source); with
//! `ca_file` the chain and the name are verified.

use crate::LockExt as _;
use crate::model::check::Probe;
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::tcp::{connect, preview};
use crate::health::state::{Failure, FailureKind};

pub const USER_AGENT_VALUE: &str = concat!("weir-health-check/", env!("CARGO_PKG_VERSION"));

pub async fn probe(
    target: SocketAddr,
    probe: &Probe,
    tls: Option<Arc<ClientConfig>>,
) -> Result<(), Failure> {
    let stream = connect(target).await?;
    let host = probe.host.clone().unwrap_or_else(|| target.to_string());
    let status = match tls {
        None => request(stream, &host, &probe.path).await?,
        Some(config) => {
            let name = server_name(&host, target);
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| tls_failure(&e))?;
            request(stream, &host, &probe.path).await?
        }
    };
    if probe.expect_status.contains(status) {
        Ok(())
    } else {
        Err(Failure::new(
            FailureKind::BadStatus,
            format!("status {status}, expected {}", probe.expect_status),
        ))
    }
}

/// Largest response head read for the status line.
const MAX_HEAD: usize = 16 * 1024;

/// Sends the request and returns the response's status, read from its status line (nothing
/// after it is read: the connection closes with a reset). A request of one write and a status
/// line parsed by `httparse`, rather than a full HTTP client: at thousands of probes a second a
/// client's connection machinery costs several times the probe itself. `path` and `host` are
/// checked when the config is (no whitespace or control characters).
async fn request<S>(mut io: S, host: &str, path: &str) -> Result<u16, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT_VALUE}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    io.write_all(req.as_bytes())
        .await
        .map_err(|e| Failure::io("sending the request", &e))?;
    io.flush()
        .await
        .map_err(|e| Failure::io("sending the request", &e))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::io("reading the response", &e))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                Failure::new(FailureKind::Reset, "closed before the response")
            } else {
                Failure::new(
                    FailureKind::BadResponse,
                    format!("closed inside the response head: {:?}", preview(&buf)),
                )
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(code) = status(&buf)? {
            return Ok(code);
        }
    }
}

/// The status of the response whose first bytes are `buf`, once its status line is there
/// (None: read more).
pub(crate) fn status(buf: &[u8]) -> Result<Option<u16>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(buf);
    // The status line is all a check needs; it is there once the code is. httparse takes
    // any three digits; a status is 100-999 (found by fuzzing: `HTTP/1.1 000` read as 0).
    match response.code {
        Some(code) if code >= 100 => return Ok(Some(code)),
        Some(code) => {
            return Err(Failure::new(
                FailureKind::BadResponse,
                format!("status {code:03} is not an HTTP status: {:?}", preview(buf)),
            ));
        }
        None => {}
    }
    match parsed {
        Ok(_) if buf.len() < MAX_HEAD => Ok(None),
        Ok(_) => Err(Failure::new(
            FailureKind::BadResponse,
            format!("no status line in the first {MAX_HEAD} bytes"),
        )),
        Err(e) => Err(Failure::new(
            FailureKind::BadResponse,
            format!("not an HTTP response ({e}): {:?}", preview(buf)),
        )),
    }
}

fn tls_failure(e: &std::io::Error) -> Failure {
    // rustls errors come wrapped in io::Error(InvalidData); socket errors stay socket errors.
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => Failure::new(FailureKind::Tls, format!("TLS: {tls}")),
        None if e.kind() == std::io::ErrorKind::InvalidData => {
            Failure::new(FailureKind::Tls, format!("TLS: {e}"))
        }
        None => Failure::io("TLS handshake", e),
    }
}

/// The TLS server name: `host` without a port when it is a DNS name (sent as SNI and checked
/// against the certificate), else the target's address (no SNI; an IP SAN is checked).
fn server_name(host: &str, target: SocketAddr) -> ServerName<'static> {
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    ServerName::try_from(bare.to_string())
        .unwrap_or_else(|_| ServerName::IpAddress(target.ip().into()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS client settings: one that accepts any certificate, and one per CA bundle (re-read when
/// the file changes, so a rotated CA takes effect without a restart).
#[derive(Default)]
pub struct TlsConfigs {
    any: Mutex<Option<Arc<ClientConfig>>>,
    by_ca: Mutex<HashMap<PathBuf, (FileStamp, Arc<ClientConfig>)>>,
}

type FileStamp = (Option<SystemTime>, u64);

impl TlsConfigs {
    pub fn get(&self, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, Failure> {
        let Some(path) = ca_file else {
            let mut any = self.any.locked();
            return Ok(any.get_or_insert_with(accept_any).clone());
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            Failure::new(FailureKind::Tls, format!("CA file {}: {e}", path.display()))
        })?;
        let stamp = (meta.modified().ok(), meta.len());
        let mut cache = self.by_ca.locked();
        if let Some((s, config)) = cache.get(path)
            && *s == stamp
        {
            return Ok(config.clone());
        }
        let config = verifying(path).map_err(|e| {
            Failure::new(FailureKind::Tls, format!("CA file {}: {e}", path.display()))
        })?;
        cache.insert(path.to_path_buf(), (stamp, config.clone()));
        Ok(config)
    }
}

/// The certificates of a PEM bundle (an error when it holds none).
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

fn verifying(path: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_ca(path)? {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn accept_any() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AcceptAny(provider.clone()));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        });
    // The ring provider supports the default versions; this cannot fail.
    Arc::new(config.unwrap_or_else(|e| unreachable!("TLS defaults: {e}")))
}

/// Accepts any certificate but still checks the handshake signatures against it.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        let t: SocketAddr = "198.18.1.11:8443".parse().unwrap();
        let name = |h: &str| format!("{:?}", server_name(h, t));
        assert!(name("example.internal").contains("example.internal"));
        assert!(name("example.internal:8443").contains("\"example.internal\""));
        assert!(name("198.18.1.11:8443").contains("IpAddress"));
        assert!(name("[fd00::1]:443").contains("IpAddress"));
        assert!(name("fd00::1").contains("IpAddress"));
    }
}
