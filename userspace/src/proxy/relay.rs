//! The opaque TCP adapter: bytes both ways until either side closes.

use tokio::net::TcpStream;

/// Bytes moved in each direction.
pub struct Relayed {
    pub from_client: u64,
    pub from_server: u64,
}

/// Copies in both directions until both sides are done.
pub async fn tcp(mut client: TcpStream, mut server: TcpStream) -> std::io::Result<Relayed> {
    let (from_client, from_server) =
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(Relayed {
        from_client,
        from_server,
    })
}
