//! gRPC channels to the control plane over mesh TLS (tonic does not do the TLS here: our
//! connector does, so the server's SPIFFE ID can be checked and the client certificate can
//! change on renewal without rebuilding the channel).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::SpiffeId;

/// Produces the TLS client configuration for each new connection (the current certificate).
pub type ConfigSource = Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>;
/// Accepts or refuses the server's identity.
pub type ServerCheck = Arc<dyn Fn(Option<SpiffeId>) -> Result<(), String> + Send + Sync>;

/// A lazily connecting channel to `url` (`https://host:port`). Connection errors surface on
/// the first call, with the cause.
pub fn channel(
    url: &str,
    config: ConfigSource,
    check: ServerCheck,
) -> Result<tonic::transport::Channel, String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        format!("{url:?}: the control plane speaks TLS only; use https://HOST:PORT")
    })?;
    let authority = rest.trim_end_matches('/');
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| format!("{url:?} is not a URL (e.g. https://127.0.0.1:7443): {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |uri: http::Uri| {
        let (config, check) = (config(), check.clone());
        async move {
            let host = uri
                .host()
                .unwrap_or("127.0.0.1")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(crate::tls::peer_identity);
            check(id).map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Why a call failed: the transport's innermost cause when there is one, else the status message.
pub fn status_cause(s: &tonic::Status) -> String {
    match std::error::Error::source(s) {
        Some(e) => root_cause(e),
        None => s.message().to_string(),
    }
}

/// The innermost cause of an error: the useful part ("Connection refused (os error 111)").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        cause = s.to_string();
        next = s.source();
    }
    cause
}
