//! Opening a Redis client from a Celery-style broker URL: `redis://`, `redis+unix://` and
//! `rediss://` (TLS, rustls) with the query parameters kombu reads for TLS:
//! `ssl_cert_reqs` (`required` / `CERT_REQUIRED` (the default here), `optional`, `none` /
//! `CERT_NONE`), `ssl_ca_certs` (a PEM file of the CAs to trust instead of the system's),
//! `ssl_certfile` + `ssl_keyfile` (a client certificate, PEM). They are taken out of the URL
//! before the rest goes to the redis crate.
//!
//! Not for: connection pooling or retries (the callers own their connections).

use super::super::{BrokerError, redact};
use redis::{ConnectionAddr, IntoConnectionInfo};

/// The TLS parameters of a broker URL.
#[derive(Debug, Default, PartialEq)]
struct TlsQuery {
    verify: bool,
    ca_certs: Option<String>,
    certfile: Option<String>,
    keyfile: Option<String>,
}

/// Splits kombu's `ssl_*` parameters off `url`: the URL for the redis crate, and the TLS
/// settings (verification on unless `ssl_cert_reqs` says `none`).
fn split_tls_query(url: &str) -> Result<(String, TlsQuery), BrokerError> {
    let (base, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (head, query) = base.split_once('?').unwrap_or((base, ""));
    let mut tls = TlsQuery { verify: fragment != Some("insecure"), ..TlsQuery::default() };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "ssl_cert_reqs" => match v.as_str() {
                "required" | "CERT_REQUIRED" | "optional" | "CERT_OPTIONAL" => tls.verify = true,
                "none" | "CERT_NONE" => tls.verify = false,
                other => {
                    return Err(BrokerError::UnsupportedUrl {
                        url: redact(url),
                        hint: format!("ssl_cert_reqs={other} is not one of required, optional, none"),
                    });
                }
            },
            "ssl_ca_certs" => tls.ca_certs = Some(v),
            "ssl_certfile" => tls.certfile = Some(v),
            "ssl_keyfile" => tls.keyfile = Some(v),
            _ => kept.push(pair),
        }
    }
    let mut out = head.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Ok((out, tls))
}

/// `%xx` escapes decoded (paths in query parameters).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = v.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_pem(url: &str, what: &'static str, path: &str) -> Result<Vec<u8>, BrokerError> {
    std::fs::read(path).map_err(|e| BrokerError::UnsupportedUrl {
        url: redact(url),
        hint: format!("cannot read {what} {path:?}: {e}"),
    })
}

/// A client for `url`.
pub(crate) fn client(url: &str) -> Result<redis::Client, BrokerError> {
    let open = |e| BrokerError::storage("open", e);
    if !url.starts_with("rediss://") {
        return redis::Client::open(url).map_err(open);
    }
    // rustls needs a process-wide crypto provider; the first broker installs ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (bare, tls) = split_tls_query(url)?;
    let mut info = bare.as_str().into_connection_info().map_err(open)?;
    if !tls.verify
        && let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone()
    {
        info = info.set_addr(ConnectionAddr::TcpTls { host, port, insecure: true, tls_params: None });
    }
    if tls.ca_certs.is_none() && tls.certfile.is_none() {
        return redis::Client::open(info).map_err(open);
    }
    let client_tls = match (&tls.certfile, &tls.keyfile) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_pem(url, "ssl_certfile", cert)?,
            client_key: read_pem(url, "ssl_keyfile", key)?,
        }),
        (None, None) => None,
        _ => {
            return Err(BrokerError::UnsupportedUrl {
                url: redact(url),
                hint: "ssl_certfile and ssl_keyfile go together".to_owned(),
            });
        }
    };
    let root_cert = tls.ca_certs.as_deref().map(|p| read_pem(url, "ssl_ca_certs", p)).transpose()?;
    redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert }).map_err(open)
}

/// One TLS connection to `url`, to report a handshake or certificate problem at once.
pub(super) async fn probe_tls(client: &redis::Client, url: &str) -> Result<(), BrokerError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
        .set_response_timeout(Some(std::time::Duration::from_secs(5)));
    let tls_error = |problem: String| BrokerError::Tls { url: redact(url), problem };
    let mut conn =
        client.get_multiplexed_async_connection_with_config(&config).await.map_err(|e| tls_error(e.to_string()))?;
    redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(|e| tls_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_ssl_parameters_are_read_and_removed() {
        let (url, tls) = split_tls_query(
            "rediss://:pw@h:6380/2?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=%2Fetc%2Fca.pem&protocol=3",
        )
        .unwrap();
        assert_eq!(url, "rediss://:pw@h:6380/2?protocol=3");
        assert_eq!(tls, TlsQuery { verify: true, ca_certs: Some("/etc/ca.pem".into()), ..TlsQuery::default() });
        let (url, tls) = split_tls_query("rediss://h/0?ssl_cert_reqs=none").unwrap();
        assert_eq!((url.as_str(), tls.verify), ("rediss://h/0", false));
        assert!(!split_tls_query("rediss://h/0#insecure").unwrap().1.verify);
        assert!(split_tls_query("rediss://h/0").unwrap().1.verify);
        assert!(split_tls_query("rediss://h/0?ssl_cert_reqs=maybe").is_err());
    }
}
