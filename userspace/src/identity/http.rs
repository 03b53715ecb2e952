//! The HTTP client every call to the identity provider goes through, and
//! the rule for which issuer URLs are acceptable.
//!
//! Redirects are not followed (a token endpoint that redirects is either
//! misconfigured or an attempt to send credentials elsewhere), proxies from
//! the environment are ignored (the daemon talks to the provider directly),
//! and TLS is rustls with the Mozilla root set (webpki-roots) plus the
//! configured `ca_file` (a provider behind a private CA): no OpenSSL.

use std::{net::IpAddr, path::Path, time::Duration};

use openidconnect::{reqwest, IssuerUrl};

use super::IdentityError;

/// How long one request to the provider may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The client for the provider; `ca_file` (PEM, one or more certificates)
/// is trusted in addition to the Mozilla roots.
pub fn client(ca_file: Option<&Path>) -> Result<reqwest::Client, IdentityError> {
    let mut builder = reqwest::ClientBuilder::new()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(REQUEST_TIMEOUT);
    if let Some(path) = ca_file {
        let unusable = |e: String| {
            IdentityError::Unavailable(format!(
                "[identity] ca_file {}: {e}; it must hold PEM certificates",
                path.display()
            ))
        };
        let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
        let certificates =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| unusable(e.to_string()))?;
        if certificates.is_empty() {
            return Err(unusable("no certificate found".into()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| IdentityError::Unavailable(format!("building the HTTP client: {e}")))
}

/// Parses an issuer URL: https, or plain http for a loopback host only (a
/// provider on the same machine, as in tests). Anything else over http
/// would let the network forge keys and tokens.
pub fn issuer_url(issuer: &str) -> Result<IssuerUrl, String> {
    let url = IssuerUrl::new(issuer.to_string())
        .map_err(|e| format!("[identity] issuer '{issuer}' is not a URL: {e}"))?;
    let parsed = url.url();
    match parsed.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(parsed.host()) => Ok(url),
        "http" => Err(format!(
            "[identity] issuer '{issuer}' uses http: tokens and keys must come over https (http is allowed for loopback providers only)"
        )),
        other => Err(format!(
            "[identity] issuer '{issuer}' has scheme '{other}': use https"
        )),
    }
}

fn is_loopback(host: Option<openidconnect::url::Host<&str>>) -> bool {
    use openidconnect::url::Host;
    match host {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_http_only_on_loopback() {
        assert!(issuer_url("https://login.example.com/realms/x").is_ok());
        assert!(issuer_url("http://127.0.0.1:8080").is_ok());
        assert!(issuer_url("http://[::1]:8080").is_ok());
        assert!(issuer_url("http://localhost:8080").is_ok());
        let err = issuer_url("http://login.example.com").unwrap_err();
        assert!(err.contains("loopback providers only"), "{err}");
        assert!(issuer_url("ftp://127.0.0.1").is_err());
        assert!(issuer_url("not a url").is_err());
    }
}
