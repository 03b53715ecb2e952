//! The relay: bytes both ways, as they come, with statement tracking and,
//! when a policy is configured, the [`inspect`](super::inspect) hook in the
//! path.
//!
//! Each direction reads into a bounded buffer, lets the [`Scanner`] and the
//! tracker look at the messages in it, and writes the whole buffer on at
//! once: one write per read, never one per message (a result of a million
//! rows is a few thousand writes, not a million), and never more than one
//! buffer per direction in memory. A slow reader therefore stalls the
//! writer's socket, then the relay, then the upstream's socket: back-pressure
//! all the way to the server, which is what TCP is for.
//!
//! With a policy, the hook takes the scanner's place: it reads the same
//! buffer and writes its rewritten version (judged, held or replaced
//! statements; masked rows). Whether there is a hook is checked once per
//! buffer; without one, nothing else changes.

use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    task::{JoinError, JoinHandle},
};

use super::{
    frame::Scanner,
    inspect::{Guard, Judge, Results},
    statements::{self, Requests, Responses},
    wire, PgError, PgStream,
};
use crate::protocol::{IdentityEnded, Relayed};

/// Per-direction buffer: large enough to batch a burst of rows into one
/// write, small enough that thousands of sessions stay cheap.
pub const BUFFER: usize = 64 * 1024;

/// A Terminate message, as every client sends it.
const TERMINATE: &[u8] = &[b'X', 0, 0, 0, 4];

/// The to-client direction's state, kept outside its future so that the
/// session's end can tell where the client's stream stands.
struct ToClient {
    scanner: Scanner,
    results: Option<Results>,
    /// A write to the client is under way (it may have been cut short).
    writing: bool,
}

impl ToClient {
    /// Nothing half-sent: the client may be told something.
    fn at_boundary(&self) -> bool {
        !self.writing
            && match &self.results {
                Some(results) => results.at_boundary(),
                None => self.scanner.at_boundary(),
            }
    }
}

/// Relays until either side closes. A client Terminate, a client hang-up
/// or an upstream hang-up end the session normally; `identity_ended` ends
/// it with a FATAL error to the client. With a `policy`, its
/// [`inspect`](super::inspect) hook judges and masks on the way.
///
/// Returns the upstream when the client ended with a Terminate that left
/// it reusable (nothing outstanding, no transaction open, both streams
/// between messages): that Terminate is not forwarded, and the caller may
/// hand the upstream to another session.
///
/// The relay runs as a task of its own, aborted if this future is dropped
/// (the session cancelled at shutdown). A socket event then polls only
/// the relay, not the session's whole chain of futures above it (the
/// listener's, the shutdown watch, the adapter's set-up): about a
/// microsecond per transaction when statements are small.
pub async fn run(
    client: PgStream,
    upstream: PgStream,
    requests: Requests,
    responses: Responses,
    relayed: Arc<Relayed>,
    policy: Option<Guard>,
    identity_ended: IdentityEnded,
) -> Result<Option<PgStream>, PgError> {
    let relay = Relay {
        requests,
        responses,
        relayed,
        policy,
        identity_ended,
    };
    match (client, upstream) {
        // Owned halves of a TCP stream need no lock between them.
        (PgStream::Plain(client), PgStream::Plain(upstream)) => {
            let (client_read, client_write) = client.into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            let (reusable, read, write) = relay
                .spawn(client_read, client_write, upstream_read, upstream_write)
                .await?;
            Ok(reusable
                .then(|| read.reunite(write).ok().map(PgStream::Plain))
                .flatten())
        }
        (client, upstream) => {
            let (client_read, client_write) = tokio::io::split(client);
            let (upstream_read, upstream_write) = tokio::io::split(upstream);
            let (reusable, read, write) = relay
                .spawn(client_read, client_write, upstream_read, upstream_write)
                .await?;
            Ok(reusable.then(|| read.unsplit(write)))
        }
    }
}

/// A spawned task that goes when its handle does.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything a relay needs besides the two streams' halves.
struct Relay {
    requests: Requests,
    responses: Responses,
    relayed: Arc<Relayed>,
    policy: Option<Guard>,
    identity_ended: IdentityEnded,
}

impl Relay {
    /// Runs [`Relay::between`] as a task of its own; hands the upstream's
    /// halves back with its result, for reuse.
    async fn spawn<UR, UW>(
        self,
        client_read: impl AsyncRead + Unpin + Send + 'static,
        client_write: impl AsyncWrite + Unpin + Send + 'static,
        mut upstream_read: UR,
        mut upstream_write: UW,
    ) -> Result<(bool, UR, UW), PgError>
    where
        UR: AsyncRead + Unpin + Send + 'static,
        UW: AsyncWrite + Unpin + Send + 'static,
    {
        let task = tokio::spawn(async move {
            let result = self
                .between(
                    client_read,
                    client_write,
                    &mut upstream_read,
                    &mut upstream_write,
                )
                .await;
            (result, upstream_read, upstream_write)
        });
        match AbortOnDrop(task).await {
            Ok((result, read, write)) => Ok((result?, read, write)),
            Err(e) => Err(PgError::Io(std::io::Error::other(format!(
                "the relay task failed: {e}"
            )))),
        }
    }

    /// Relays between the halves until either side closes; true when the
    /// upstream is left reusable (see [`run`]).
    async fn between(
        self,
        client_read: impl AsyncRead + Unpin,
        mut client_write: impl AsyncWrite + Unpin,
        upstream_read: impl AsyncRead + Unpin,
        upstream_write: impl AsyncWrite + Unpin,
    ) -> Result<bool, PgError> {
        let Self {
            requests,
            responses,
            relayed,
            policy,
            identity_ended,
        } = self;
        let (judge, results) = policy.map(Guard::split).unzip();
        let mut to_client = ToClient {
            scanner: Scanner::new(statements::upstream_inspects),
            results,
            writing: false,
        };
        let result = {
            let to_upstream =
                client_to_upstream(client_read, upstream_write, requests, judge, &relayed);
            let to_client = upstream_to_client(
                upstream_read,
                &mut client_write,
                &mut to_client,
                responses,
                &relayed,
            );
            tokio::select! {
                result = to_upstream => result,
                result = to_client => result.map(|()| false),
                reason = identity_ended => Err(PgError::IdentityEnded(reason)),
            }
        };
        // The upstream's stream must be between messages too.
        let result = result.map(|reusable| reusable && to_client.at_boundary());
        if let Some(results) = &mut to_client.results {
            results.finish();
        }
        // A client that broke the protocol, or whose identity ended, gets a
        // FATAL error, as PostgreSQL would send it, unless that would land
        // inside a half-sent message.
        let fatal = match &result {
            Err(PgError::ClientProtocol(problem)) => {
                Some(("08P01", format!("invalid message from the client: {problem}")))
            }
            Err(PgError::IdentityEnded(reason)) => Some((
                "57P01",
                format!(
                    "terminating connection: the identity this session was opened with has ended ({reason}); \
                     sign in again (`portcullis login`) and reconnect"
                ),
            )),
            _ => None,
        };
        if let (Some((sqlstate, message)), true) = (fatal, to_client.at_boundary()) {
            let mut out = BytesMut::new();
            wire::encode(&wire::error_response("FATAL", sqlstate, &message), &mut out);
            let _ = client_write.write_all(&out).await;
            let _ = client_write.flush().await;
        }
        result
    }
}

/// Client to upstream until the client hangs up or terminates; true when
/// it terminated leaving the upstream reusable (its Terminate not sent on).
async fn client_to_upstream(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut requests: Requests,
    mut judge: Option<Judge>,
    relayed: &Relayed,
) -> Result<bool, PgError> {
    let mut scanner = Scanner::new(statements::client_inspects);
    let mut buf = BytesMut::with_capacity(BUFFER);
    loop {
        buf.clear();
        if from.read_buf(&mut buf).await? == 0 {
            // A client that hangs up without Terminate: PostgreSQL treats
            // the closed socket the same way.
            let _ = to.shutdown().await;
            return Ok(false);
        }
        let at_boundary = match judge.as_mut() {
            None => {
                scanner
                    .feed(&buf, |kind, body| requests.on_message(kind, body))
                    .map_err(|e| PgError::ClientProtocol(e.to_string()))?;
                // A reusable upstream is not told to terminate. Nothing
                // may follow the Terminate in the read (PostgreSQL would
                // ignore it; here it would reach the next session).
                let forward = match buf.strip_suffix(TERMINATE) {
                    Some(before) if requests.reusable => before,
                    _ => {
                        requests.reusable = false;
                        &buf[..]
                    }
                };
                to.write_all(forward).await?;
                scanner.at_boundary()
            }
            Some(judge) => {
                judge.pass(&buf, &mut requests, &mut to).await?;
                judge.at_boundary()
            }
        };
        to.flush().await?;
        relayed
            .from_client
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if requests.terminated && at_boundary {
            if requests.reusable {
                return Ok(true);
            }
            let _ = to.shutdown().await;
            return Ok(false);
        }
    }
}

async fn upstream_to_client(
    mut from: impl AsyncRead + Unpin,
    to: &mut (impl AsyncWrite + Unpin),
    state: &mut ToClient,
    mut responses: Responses,
    relayed: &Relayed,
) -> Result<(), PgError> {
    responses.defer_records();
    let mut buf = BytesMut::with_capacity(BUFFER);
    loop {
        buf.clear();
        let read = match state.results.as_mut() {
            None => from.read_buf(&mut buf).await?,
            Some(results) => tokio::select! {
                read = from.read_buf(&mut buf) => read?,
                Some(()) = results.notice() => {
                    if let Some(notices) = results.notices_now() {
                        state.writing = true;
                        to.write_all(&notices).await?;
                        to.flush().await?;
                        state.writing = false;
                    }
                    continue;
                }
            },
        };
        if read == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let out: &[u8] = match state.results.as_mut() {
            None => {
                state
                    .scanner
                    .feed(&buf, |kind, body| responses.on_message(kind, body))
                    .map_err(|e| {
                        PgError::Upstream(format!("malformed stream from the upstream: {e}"))
                    })?;
                &buf
            }
            Some(results) => results.pass(&buf, &mut responses)?,
        };
        state.writing = true;
        to.write_all(out).await?;
        to.flush().await?;
        state.writing = false;
        responses.flush_records();
        relayed
            .from_server
            .fetch_add(read as u64, Ordering::Relaxed);
    }
}
