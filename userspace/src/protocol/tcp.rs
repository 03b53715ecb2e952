//! The opaque TCP adapter: bytes both ways until either side closes, or
//! the identity the session was opened with ends (then both are closed:
//! an opaque stream has no way to say why).

use tokio::net::TcpStream;

use super::{Relayed, SessionContext};
use crate::proxy::upstream;

/// Connects to the original destination and copies in both directions.
pub async fn serve(ctx: &SessionContext, mut client: TcpStream) -> Result<Relayed, String> {
    let destination = ctx
        .origin
        .as_ref()
        .ok_or("the tcp adapter only serves redirected clients")?
        .original_destination;
    let mut server = upstream::connect(destination, ctx.gateway.exempt_mark)
        .await
        .map_err(|e| format!("upstream {destination}: {e}"))?;
    ctx.start
        .durable()
        .await
        .map_err(|e| format!("the session's start could not be recorded: {e}"))?;
    let (from_client, from_server) = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            copied.map_err(|e| e.to_string())?
        }
        reason = ctx.identity_ended(None) => return Err(format!("the identity ended: {reason}")),
    };
    Ok(Relayed {
        from_client,
        from_server,
    })
}
