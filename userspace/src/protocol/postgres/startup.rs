//! The client's side of connection start-up: TLS or GSS encryption requests,
//! cancel requests, protocol version negotiation, and the startup packet.

use bytes::BytesMut;
use pgwire::messages::startup::NegotiateProtocolVersion;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::TlsAcceptor;

use super::{
    tls,
    wire::{self, Reader, MAX_STARTUP},
    PgError, PgStream,
};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// Negotiation packets (SSL, GSS) a client may send before its startup
/// packet; more is a client going round in circles.
const MAX_NEGOTIATIONS: usize = 4;

/// What the client wants.
pub enum Opening {
    /// Cancel the query running on the session with this key, then hang up.
    Cancel { pid: i32, secret: Vec<u8> },
    /// A session; the stream is encrypted if `tls`.
    Session(Startup),
}

pub struct Startup {
    pub stream: PgStream,
    pub tls: bool,
    /// Startup parameters in the client's order (user, database, options...).
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads packets until the client sends its startup packet or a cancel
/// request, answering SSLRequest with TLS when the listener has a
/// certificate and GSSENCRequest with 'N' (not supported: clients fall back).
/// A client may also start TLS at once, without SSLRequest (PostgreSQL 17's
/// `sslnegotiation=direct`).
pub async fn negotiate(client: TcpStream, tls: Option<&TlsAcceptor>) -> Result<Opening, PgError> {
    let mut encrypted = starts_tls(&client).await?;
    let mut stream = PgStream::Plain(client);
    if encrypted {
        stream = direct_tls(stream, tls).await?;
    }
    for _ in 0..MAX_NEGOTIATIONS {
        let packet = match read_packet(&mut stream).await {
            Ok(packet) => packet,
            Err(e) => {
                if let PgError::Protocol(message) = &e {
                    let _ = fatal(&mut stream, "08P01", message).await;
                }
                return Err(e);
            }
        };
        let mut r = Reader::new(&packet, "startup");
        let code = r.i32()?;
        match code {
            SSL_REQUEST if !encrypted => match tls {
                Some(acceptor) => {
                    stream.write_all(b"S").await?;
                    stream.flush().await?;
                    let accepted = acceptor.accept(stream).await.map_err(|e| {
                        PgError::Client(format!("TLS handshake with the client failed: {e}"))
                    })?;
                    stream = PgStream::tls(accepted);
                    encrypted = true;
                }
                None => {
                    stream.write_all(b"N").await?;
                    stream.flush().await?;
                }
            },
            GSSENC_REQUEST if !encrypted => {
                stream.write_all(b"N").await?;
                stream.flush().await?;
            }
            SSL_REQUEST | GSSENC_REQUEST => {
                let message = "encryption requested twice on one connection";
                let _ = fatal(&mut stream, "08P01", message).await;
                return Err(PgError::Protocol(message.into()));
            }
            CANCEL_REQUEST => {
                let pid = r.i32()?;
                let secret = r.rest().to_vec();
                return Ok(Opening::Cancel { pid, secret });
            }
            version => {
                let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
                if major != 3 {
                    let message = format!(
                        "unsupported frontend protocol {major}.{minor}: the gateway speaks 3.0"
                    );
                    let _ = fatal(&mut stream, "0A000", &message).await;
                    return Err(PgError::Protocol(message));
                }
                let params = read_params(&mut r)?;
                let unknown: Vec<String> = params
                    .iter()
                    .filter(|(k, _)| k.starts_with("_pq_."))
                    .map(|(k, _)| k.clone())
                    .collect();
                if minor > 0 || !unknown.is_empty() {
                    // As PostgreSQL does: tell the client the newest minor
                    // version we speak and which protocol options we ignore.
                    let mut out = BytesMut::new();
                    wire::encode(&NegotiateProtocolVersion::new(0, unknown), &mut out);
                    stream.write_all(&out).await?;
                }
                let params = params
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with("_pq_."))
                    .collect();
                return Ok(Opening::Session(Startup {
                    stream,
                    tls: encrypted,
                    params,
                }));
            }
        }
    }
    let message = "too many encryption requests before the startup packet";
    let _ = fatal(&mut stream, "08P01", message).await;
    Err(PgError::Protocol(message.into()))
}

/// Whether the client's first byte begins a TLS handshake record. No
/// start-up packet begins with it: its length would be over 369 MB.
async fn starts_tls(client: &TcpStream) -> Result<bool, PgError> {
    const TLS_HANDSHAKE: u8 = 0x16;
    let mut first = [0u8; 1];
    Ok(client.peek(&mut first).await? == 1 && first[0] == TLS_HANDSHAKE)
}

/// TLS started by the client without SSLRequest. It must name PostgreSQL
/// by ALPN, as PostgreSQL requires: otherwise a TLS client of another
/// protocol (a browser, say) could be led to talk to this one.
async fn direct_tls(stream: PgStream, tls: Option<&TlsAcceptor>) -> Result<PgStream, PgError> {
    let Some(acceptor) = tls else {
        // A TLS client cannot read a plaintext error: it sees the close.
        return Err(PgError::Client(
            "the client started TLS directly (sslnegotiation=direct), and this listener has \
             no certificate: set tls_cert and tls_key on it"
                .into(),
        ));
    };
    let accepted = acceptor
        .accept(stream)
        .await
        .map_err(|e| PgError::Client(format!("TLS handshake with the client failed: {e}")))?;
    let named_postgres = accepted.get_ref().1.alpn_protocol() == Some(tls::ALPN);
    let mut stream = PgStream::tls(accepted);
    if !named_postgres {
        let message = "TLS started directly without ALPN \"postgresql\": refused (PostgreSQL \
                       clients send it with sslnegotiation=direct)";
        let _ = fatal(&mut stream, "08P01", message).await;
        return Err(PgError::Protocol(message.into()));
    }
    Ok(stream)
}

/// One untyped start-up packet (length-prefixed), without its length.
async fn read_packet(stream: &mut PgStream) -> Result<Vec<u8>, PgError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(PgError::Protocol(format!(
            "invalid startup packet length {len}: is this a PostgreSQL client?"
        )));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

fn read_params(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, PgError> {
    let mut params = Vec::new();
    loop {
        let key = r.cstr()?;
        if key.is_empty() {
            return Ok(params);
        }
        let value = r.cstr()?;
        params.push((key, value));
    }
}

/// Sends a FATAL ErrorResponse; the caller closes the connection.
pub async fn fatal(stream: &mut PgStream, sqlstate: &str, message: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    wire::encode(&wire::error_response("FATAL", sqlstate, message), &mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}
