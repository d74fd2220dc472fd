//! Raw client-side bytes for hostile-input tests: TCP connections opened from inside a pod,
//! writes and floods that read back whatever the peer answers (and whether it closed),
//! hand-written HTTP/2 frames, and a real TLS ClientHello to truncate or corrupt.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Pod;

// ---- raw sockets ----

/// A TCP connection opened from inside `pod` (its app's view: iptables applies).
pub fn connect(pod: &Pod, addr: SocketAddr) -> TcpStream {
    pod.netns().enter(move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    })
}

/// What came back on a raw connection.
pub struct Reply {
    /// What the peer sent back (at most 8 MiB kept).
    pub data: Vec<u8>,
    /// The peer closed (FIN or RST) within the wait.
    pub closed: bool,
    /// From the first write to the end of reading.
    pub elapsed: Duration,
    /// How many bytes of the request were written before the peer stopped reading.
    pub written: usize,
}

impl Reply {
    /// The status of the first HTTP/1 response in the reply, 0 if none.
    pub fn status(&self) -> u16 {
        let text = String::from_utf8_lossy(&self.data);
        text.strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Writes `bytes`, then reads until the peer closes or `wait` passes (at most 8 MiB kept).
pub fn send_and_read(mut stream: TcpStream, bytes: &[u8], wait: Duration) -> Reply {
    let start = Instant::now();
    let written = match stream.write_all(bytes) {
        Ok(()) => bytes.len(),
        Err(_) => 0,
    };
    let mut reply = read_until_closed(&stream, start + wait);
    reply.elapsed = start.elapsed();
    reply.written = written;
    reply
}

/// Writes `bytes` from a second thread (so a server that stops reading cannot block the test
/// for ever: writes time out after 5 s) while reading everything that comes back.
pub fn flood(stream: TcpStream, bytes: &[u8], wait: Duration) -> Reply {
    let start = Instant::now();
    let mut writer = stream.try_clone().expect("clone the socket");
    writer
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    let bytes = bytes.to_vec();
    let written = std::thread::spawn(move || {
        let mut sent = 0;
        for chunk in bytes.chunks(16 * 1024) {
            if writer.write_all(chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut reply = read_until_closed(&stream, start + wait);
    reply.written = written.join().expect("writer thread");
    reply.elapsed = start.elapsed();
    reply
}

/// Reads from `stream` until the peer closes it or `deadline` passes.
fn read_until_closed(mut stream: &TcpStream, deadline: Instant) -> Reply {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut closed = false;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(
                left.clamp(Duration::from_millis(10), Duration::from_millis(200)),
            ))
            .expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) if data.len() < 8 << 20 => data.extend_from_slice(&buf[..n]),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    Reply {
        data,
        closed,
        elapsed: Duration::ZERO,
        written: 0,
    }
}

/// Whether the peer has closed `stream` (a read returns EOF or an error rather than blocking).
pub fn peer_closed(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 1024];
    let mut reader: &TcpStream = stream;
    let closed = match reader.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

// ---- hand-written HTTP/2 frames ----

/// `:method GET`, `:scheme http`, `:path /` (static table), `:authority x` (literal).
pub const GET_HEADER_BLOCK: [u8; 6] = [0x82, 0x86, 0x84, 0x01, 0x01, b'x'];

/// The client connection preface and an empty SETTINGS frame.
pub fn h2_start() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out
}

/// One HTTP/2 frame: the 9-byte header (`payload`'s length, `kind`, `flags`, `stream`), then
/// `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HTTP/2 frame read back from the peer.
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// The complete HTTP/2 frames at the start of `data`; a trailing partial frame is ignored.
pub fn parse_frames(mut data: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while data.len() >= 9 {
        let len = (usize::from(data[0]) << 16) | (usize::from(data[1]) << 8) | usize::from(data[2]);
        if data.len() < 9 + len {
            break;
        }
        frames.push(Frame {
            kind: data[3],
            flags: data[4],
            payload: data[9..9 + len].to_vec(),
        });
        data = &data[9 + len..];
    }
    frames
}

/// The error code of the first GOAWAY frame.
pub fn goaway_code(frames: &[Frame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.kind == 0x7 && f.payload.len() >= 8)
        .map(|f| u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]))
}

/// A real TLS 1.3 ClientHello offering the mesh ALPN, captured from rustls.
pub fn client_hello() -> Vec<u8> {
    trellis_identity::install_crypto_provider();
    let roots = Arc::new(rustls::RootCertStore::empty());
    let config =
        trellis_identity::tls::client_config(roots, None, &[trellis_identity::tls::ALPN_H2])
            .expect("client config");
    let name = rustls::pki_types::ServerName::try_from("server").expect("a name");
    let mut conn = rustls::ClientConnection::new(config, name).expect("TLS client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    hello
}
