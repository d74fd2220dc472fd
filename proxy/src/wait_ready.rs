//! `trellis-proxy wait-ready`: polls the proxy's `GET /ready` until it answers 200, then exits.
//!
//! In classic (non-native) sidecar mode Kubernetes starts the next container only once the
//! proxy container's postStart hook returns, so this hook keeps the app from starting (and
//! making calls) before the proxy can carry them. It speaks just enough HTTP/1.1 over a blocking
//! socket for the proxy's own admin server: no runtime, no client library.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::cli::WaitReadyArgs;

/// Time between two polls.
pub const INTERVAL: Duration = Duration::from_millis(200);
/// Upper bound of one poll (connect, request, answer): a stuck admin server still gets polled
/// again, and the last error says what went wrong.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// The admin server's answers are a line of text; anything longer is cut.
const ANSWER_LIMIT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum WaitReadyError {
    #[error(
        "the proxy was not ready after {timeout:?}: polled http://{addr}/ready {attempts} times; last {last}"
    )]
    TimedOut {
        addr: SocketAddr,
        timeout: Duration,
        attempts: u32,
        last: Last,
    },
}

/// The last answer (or failure) before giving up.
#[derive(Debug)]
pub enum Last {
    Answer(Answer),
    Error(String),
}

impl std::fmt::Display for Last {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Last::Answer(a) if a.body.is_empty() => write!(f, "answer: {}", a.status),
            Last::Answer(a) => write!(f, "answer: {} {:?}", a.status, a.body),
            Last::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// What `/ready` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The body's first line ("not ready: draining").
    pub body: String,
}

pub fn run(args: &WaitReadyArgs) -> Result<(), WaitReadyError> {
    let addr = poll_addr(args.admin_addr);
    let waited = wait(addr, args.timeout, INTERVAL)?;
    tracing::info!(%addr, ?waited, "the proxy is ready");
    Ok(())
}

/// Polls `http://addr/ready` every `interval` until it answers 200 (returns how long that took)
/// or `timeout` has passed.
pub fn wait(
    addr: SocketAddr,
    timeout: Duration,
    interval: Duration,
) -> Result<Duration, WaitReadyError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let bound = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(10), ATTEMPT_TIMEOUT);
        let last = match poll(addr, bound) {
            Ok(answer) if answer.status == 200 => return Ok(start.elapsed()),
            Ok(answer) => Last::Answer(answer),
            Err(e) => Last::Error(e),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WaitReadyError::TimedOut {
                addr,
                timeout,
                attempts,
                last,
            });
        }
        tracing::debug!(%addr, %last, "not ready yet");
        std::thread::sleep(interval.min(left));
    }
}

/// A wildcard admin address (the injector sets `0.0.0.0:4191` so kubelet can reach it) is
/// reached on loopback.
fn poll_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// One `GET /ready`, bounded by `bound` for each of connect, write and read.
fn poll(addr: SocketAddr, bound: Duration) -> Result<Answer, String> {
    let mut stream = TcpStream::connect_timeout(&addr, bound).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(bound))
        .and_then(|()| stream.set_write_timeout(Some(bound)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET /ready HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: trellis-proxy wait-ready\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // `Connection: close`: the answer ends when the server closes the connection.
    stream
        .take(ANSWER_LIMIT)
        .read_to_end(&mut raw)
        .map_err(|e| e.to_string())?;
    parse_answer(&raw)
}

/// Status and first body line of an HTTP/1.1 response.
fn parse_answer(raw: &[u8]) -> Result<Answer, String> {
    let text = String::from_utf8_lossy(raw);
    let status_line = text.lines().next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        format!("not an HTTP/1.1 answer (is this the proxy's admin port?): {status_line:?}")
    })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// An admin server stand-in that answers each connection with the next of `statuses`
    /// (then with the last one for ever), and counts the requests for /ready.
    fn admin_answering(statuses: &'static [u16]) -> (SocketAddr, std::sync::mpsc::Receiver<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, requests) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 1024];
                let n = conn.read(&mut buf).unwrap_or(0);
                if buf[..n].starts_with(b"GET /ready HTTP/1.1\r\n") {
                    let _ = seen.send(());
                }
                let status = statuses[i.min(statuses.len() - 1)];
                let body = match status {
                    200 => "ready\n",
                    _ => "not ready: starting\n",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (addr, requests)
    }

    #[test]
    fn waits_through_503s_until_ready() {
        let (addr, requests) = admin_answering(&[503, 503, 200]);
        let waited = wait(addr, Duration::from_secs(5), Duration::from_millis(20)).unwrap();
        assert_eq!(requests.try_iter().count(), 3);
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    #[test]
    fn gives_up_after_the_timeout_naming_the_address_and_the_last_answer() {
        let (addr, _requests) = admin_answering(&[503]);
        let start = Instant::now();
        let err = wait(addr, Duration::from_millis(300), Duration::from_millis(50)).unwrap_err();
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
            "{elapsed:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("http://{addr}/ready")), "{msg}");
        assert!(
            msg.ends_with("last answer: 503 \"not ready: starting\""),
            "{msg}"
        );
    }

    #[test]
    fn gives_up_naming_the_last_error_when_nothing_listens() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = wait(addr, Duration::from_millis(100), Duration::from_millis(20)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("http://{addr}/ready")), "{msg}");
        assert!(msg.contains("last error: "), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    #[test]
    fn a_wildcard_admin_address_is_polled_on_loopback() {
        assert_eq!(
            poll_addr("0.0.0.0:4191".parse().unwrap()),
            "127.0.0.1:4191".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            poll_addr("[::]:4191".parse().unwrap()),
            "[::1]:4191".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            poll_addr("10.0.0.7:4191".parse().unwrap()),
            "10.0.0.7:4191".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn answers_that_are_not_http_are_named() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 503 Service Unavailable\r\na: b\r\n\r\nnot ready: draining\n"),
            Ok(Answer {
                status: 503,
                body: "not ready: draining".into()
            })
        );
        assert!(
            parse_answer(b"SSH-2.0-OpenSSH_9.6\r\n")
                .unwrap_err()
                .contains("not an HTTP/1.1 answer")
        );
    }
}
