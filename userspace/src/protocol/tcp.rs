//! The opaque TCP adapter: bytes both ways until both sides have closed,
//! or the identity the session was opened with ends (then both are closed:
//! an opaque stream has no way to say why).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::SessionContext;
use crate::proxy::upstream;

/// Per-direction buffer.
const BUFFER: usize = 16 * 1024;

/// Connects to the original destination and copies in both directions.
pub async fn serve(ctx: &SessionContext, client: TcpStream) -> Result<(), String> {
    let destination = ctx
        .origin
        .as_ref()
        .ok_or("the tcp adapter only serves redirected clients")?
        .original_destination;
    let server = upstream::connect(destination, ctx.gateway.exempt_mark)
        .await
        .map_err(|e| format!("upstream {destination}: {e}"))?;
    ctx.start
        .durable()
        .await
        .map_err(|e| format!("the session's start could not be recorded: {e}"))?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let relayed = &ctx.relayed;
    let both = async {
        tokio::try_join!(
            pump(client_read, server_write, &relayed.from_client),
            pump(server_read, client_write, &relayed.from_server),
        )
    };
    tokio::select! {
        copied = both => copied.map(|_| ()).map_err(|e| e.to_string()),
        reason = ctx.identity_ended(None) => Err(format!("the identity ended: {reason}")),
    }
}

/// Copies `from` to `to` until `from` closes, then closes `to`'s sending
/// side (the other direction may go on), counting what was written as it
/// is written: a write that fails part way still counts what went out.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    moved: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let mut sent = 0;
        while sent < n {
            let written = to.write(&buf[sent..n]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            moved.fetch_add(written as u64, Ordering::Relaxed);
            sent += written;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pump_counts_what_it_wrote_and_closes_on_end() {
        let (mut near, far) = tokio::io::duplex(64);
        let (mut out_far, out_near) = tokio::io::duplex(4096);
        let moved = AtomicU64::new(0);
        let copy = pump(far, out_near, &moved);
        let feed = async {
            near.write_all(&[7; 1000]).await.unwrap();
            drop(near);
            let mut got = Vec::new();
            out_far.read_to_end(&mut got).await.unwrap();
            got
        };
        let (copied, got) = tokio::join!(copy, feed);
        copied.unwrap();
        assert_eq!(got, vec![7; 1000]);
        assert_eq!(moved.load(Ordering::Relaxed), 1000);
    }

    /// Takes `room` bytes, a few at a time, then fails.
    struct FailsAfter {
        room: usize,
    }

    impl AsyncWrite for FailsAfter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.room == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
            }
            let n = buf.len().min(self.room).min(7);
            self.room -= n;
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_write_that_fails_part_way_counts_what_went_out() {
        let moved = AtomicU64::new(0);
        let copied = pump(&[9u8; 100][..], FailsAfter { room: 30 }, &moved).await;
        assert_eq!(
            copied.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
        assert_eq!(moved.load(Ordering::Relaxed), 30);
    }
}
