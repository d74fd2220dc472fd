//! A packet capture on the mesh's bridge, to check what really crosses the wire between pods
//! (no tcpdump needed): a raw AF_PACKET socket in the hub namespace records every frame for a
//! while.

use std::time::{Duration, Instant};

use super::Netns;

/// Every frame seen on the hub namespace's interfaces (the bridge and the pods' veth ends)
/// while it runs, concatenated.
pub struct Capture {
    handle: std::thread::JoinHandle<Vec<u8>>,
}

impl Capture {
    /// Starts capturing for `duration` (bounded: the capture stops by itself).
    pub fn start(hub: &Netns, duration: Duration) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = hub.spawn_thread(move || {
            let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
            // SAFETY: plain socket(2) call; the fd is closed below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: setsockopt with a valid timeval of the right size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
            }
            let _ = ready_tx.send(());
            let mut out = Vec::new();
            let mut buf = vec![0u8; 65536];
            let deadline = Instant::now() + duration;
            while Instant::now() < deadline && out.len() < 64 << 20 {
                // SAFETY: buf is valid for buf.len() bytes.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    out.extend_from_slice(&buf[..n as usize]);
                }
            }
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            out
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        Self { handle }
    }

    /// Waits for the capture to end and returns the bytes seen.
    pub fn finish(self) -> Vec<u8> {
        self.handle.join().expect("capture thread")
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
