//! Recovers where a redirected connection was originally going (SO_ORIGINAL_DST).
//!
//! iptables `REDIRECT` rewrites the destination to the proxy's listener; conntrack remembers the
//! original, and the kernel hands it back through `getsockopt(SO_ORIGINAL_DST)` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6). A connection that was not redirected reports its own local
//! address (or nothing, without conntrack): the listener treats both as "no original destination".

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// The destination the client originally dialled.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}
