//! The relay: bytes both ways, as they come, with statement tracking.
//!
//! Each direction reads into a bounded buffer, lets the [`Scanner`] and the
//! tracker look at the messages in it, and writes the whole buffer on at
//! once: one write per read, never one per message (a result of a million
//! rows is a few thousand writes, not a million), and never more than one
//! buffer per direction in memory. A slow reader therefore stalls the
//! writer's socket, then the relay, then the upstream's socket: back-pressure
//! all the way to the server, which is what TCP is for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    frame::Scanner,
    statements::{self, Requests, Responses},
    wire, PgError, PgStream,
};

/// Per-direction buffer: large enough to batch a burst of rows into one
/// write, small enough that thousands of sessions stay cheap.
const BUFFER: usize = 64 * 1024;

/// Byte counts, shared so they survive whichever direction ends first.
#[derive(Default)]
pub struct Counters {
    pub from_client: AtomicU64,
    pub from_server: AtomicU64,
}

/// Relays until either side closes. A client Terminate, a client hang-up
/// or an upstream hang-up end the session normally.
pub async fn run(
    client: PgStream,
    upstream: PgStream,
    requests: Requests,
    responses: Responses,
    counters: &Counters,
) -> Result<(), PgError> {
    let (client_read, mut client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let mut to_client_scanner = Scanner::new(statements::upstream_inspects);
    let writing = AtomicBool::new(false);
    let result = {
        let to_upstream = client_to_upstream(client_read, upstream_write, requests, counters);
        let to_client = upstream_to_client(
            upstream_read,
            &mut client_write,
            &mut to_client_scanner,
            &writing,
            responses,
            counters,
        );
        tokio::select! {
            result = to_upstream => result,
            result = to_client => result,
        }
    };
    // A client that broke the protocol gets a FATAL error, as PostgreSQL
    // would send it, unless that would land inside a half-sent message.
    if let Err(PgError::ClientProtocol(problem)) = &result {
        if !writing.load(Ordering::Relaxed) && to_client_scanner.at_boundary() {
            let mut out = BytesMut::new();
            let message = format!("invalid message from the client: {problem}");
            wire::encode(&wire::error_response("FATAL", "08P01", &message), &mut out);
            let _ = client_write.write_all(&out).await;
            let _ = client_write.flush().await;
        }
    }
    result
}

async fn client_to_upstream(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut requests: Requests,
    counters: &Counters,
) -> Result<(), PgError> {
    let mut scanner = Scanner::new(statements::client_inspects);
    let mut buf = BytesMut::with_capacity(BUFFER);
    loop {
        buf.clear();
        if from.read_buf(&mut buf).await? == 0 {
            // A client that hangs up without Terminate: PostgreSQL treats
            // the closed socket the same way.
            let _ = to.shutdown().await;
            return Ok(());
        }
        scanner
            .feed(&buf, |kind, body| requests.on_message(kind, body))
            .map_err(|e| PgError::ClientProtocol(e.to_string()))?;
        to.write_all(&buf).await?;
        to.flush().await?;
        counters
            .from_client
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if requests.terminated && scanner.at_boundary() {
            let _ = to.shutdown().await;
            return Ok(());
        }
    }
}

async fn upstream_to_client(
    mut from: impl AsyncRead + Unpin,
    to: &mut (impl AsyncWrite + Unpin),
    scanner: &mut Scanner,
    writing: &AtomicBool,
    mut responses: Responses,
    counters: &Counters,
) -> Result<(), PgError> {
    responses.defer_records();
    let mut buf = BytesMut::with_capacity(BUFFER);
    loop {
        buf.clear();
        if from.read_buf(&mut buf).await? == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        scanner
            .feed(&buf, |kind, body| responses.on_message(kind, body))
            .map_err(|e| PgError::Upstream(format!("malformed stream from the upstream: {e}")))?;
        writing.store(true, Ordering::Relaxed);
        to.write_all(&buf).await?;
        to.flush().await?;
        writing.store(false, Ordering::Relaxed);
        responses.flush_records();
        counters
            .from_server
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
    }
}
