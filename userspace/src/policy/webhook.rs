//! The approvals webhook: a generic JSON POST per held request, so chat
//! bots, ticketing or paging can tell approvers without polling.
//!
//! Plain HTTP/1.1 written by hand: the payload is one small JSON document
//! and the target is typically a local relay; a full HTTP client stack
//! would be most of the binary's dependencies for one request.

use std::time::Duration;

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::approval::PendingApproval;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL '{0}' is not http://host:port/path")]
    Url(String),
    #[error("webhook {url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("webhook {url} answered '{status}'")]
    Status { url: String, status: String },
    #[error("webhook {0} did not answer within 5s")]
    Timeout(String),
}

#[derive(Serialize)]
struct Payload<'a> {
    event: &'static str,
    #[serde(flatten)]
    request: &'a PendingApproval,
    /// How to decide, for humans reading the message.
    approve_with: String,
    deny_with: String,
}

/// POSTs the announcement of `request` to `url`.
///
/// # Errors
/// [`WebhookError`] if the URL is unusable, the server unreachable or it
/// answers anything but 2xx.
pub async fn announce(url: &str, request: &PendingApproval) -> Result<(), WebhookError> {
    tokio::time::timeout(TIMEOUT, post(url, request))
        .await
        .map_err(|_| WebhookError::Timeout(url.to_string()))?
}

async fn post(url: &str, request: &PendingApproval) -> Result<(), WebhookError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| WebhookError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(WebhookError::Url(url.into()));
    }
    let target = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let body = serde_json::to_vec(&Payload {
        event: "approval_requested",
        request,
        approve_with: format!("portcullis approvals approve {}", request.id),
        deny_with: format!("portcullis approvals deny {} --reason \"...\"", request.id),
    })
    .map_err(|e| WebhookError::Io {
        url: url.into(),
        source: std::io::Error::other(e),
    })?;
    let io = |source| WebhookError::Io {
        url: url.into(),
        source,
    };
    let mut stream = TcpStream::connect(&target).await.map_err(io)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: portcullis\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(&body).await.map_err(io)?;
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if code.len() == 3 && code.starts_with('2') {
        Ok(())
    } else {
        Err(WebhookError::Status {
            url: url.into(),
            status: status_line,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn pending() -> PendingApproval {
        PendingApproval {
            id: "abc1".into(),
            session: "s".into(),
            requester: "unix:bob".into(),
            requester_name: "bob".into(),
            resource: "pg".into(),
            rule: "r".into(),
            reason: "why".into(),
            statement: "DROP TABLE t".into(),
            approvers: "role dba".into(),
            max_window_secs: 0,
            requested_at: 1,
            expires_at: 2,
        }
    }

    #[tokio::test]
    async fn posts_json_and_checks_the_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut received = Vec::new();
            for status in ["204 No Content", "500 Oops"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len {
                            received.push(text.to_string());
                            break;
                        }
                    }
                }
                s.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            received
        });
        let url = format!("http://{addr}/hooks/approvals");
        announce(&url, &pending()).await.unwrap();
        let err = announce(&url, &pending()).await.unwrap_err();
        assert!(err.to_string().contains("500"), "{err}");
        let received = server.await.unwrap();
        assert!(received[0].starts_with("POST /hooks/approvals HTTP/1.1"));
        let body: serde_json::Value =
            serde_json::from_str(received[0].split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["event"], "approval_requested");
        assert_eq!(body["id"], "abc1");
        assert_eq!(body["statement"], "DROP TABLE t");
        assert!(announce("https://x/", &pending()).await.is_err());
    }
}
