//! The opaque TCP adapter: bytes both ways until either side closes.

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
    let (from_client, from_server) = tokio::io::copy_bidirectional(&mut client, &mut server)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Relayed {
        from_client,
        from_server,
    })
}
