//! End-to-end test support for Trellis: the pod harness (network namespaces joined by a bridge,
//! real `trellis-proxy init` rules, real sidecars running as their own UID) and the generated
//! code of the small gRPC service the test app serves.

pub mod harness;
pub mod procfs;

/// Query strings, for the test app and the stand-in API server.
pub mod query {
    /// Decodes `%XX` escapes and `+` (a space) in a query value.
    pub fn percent_decode(value: &str) -> String {
        let bytes = value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (bytes[i], hex) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

pub mod echo {
    tonic::include_proto!("trellis.test.echo");
}
