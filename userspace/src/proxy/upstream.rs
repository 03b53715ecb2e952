//! Upstream connections: marked so the kernel programs let them through.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` with SO_MARK = `mark`.
///
/// Setting the mark needs CAP_NET_ADMIN, which is what makes the exemption
/// unforgeable by ordinary processes, even ones running as our uid.
pub async fn connect(addr: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(addr).await
}
