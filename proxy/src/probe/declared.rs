//! The probes the injector declared (`--probes` / `TRELLIS_PROBES`): the only probe paths the
//! admin server answers to clients other than loopback, so that a pod that can reach the admin
//! port (open on the pod IP for kubelet) cannot use it to reach the app's loopback ports around
//! a strict ServerPolicy. Like Istio's `ISTIO_KUBE_APP_PROBERS`.
//!
//! Each entry is a probe path exactly as the injector wrote it into the pod's probe, query
//! included (`/probe/http/8080/healthz`, `/probe/tcp/5432`, `/probe/grpc/9090?service=x`); a
//! request matches when its path and query are the same text. The list is comma-separated, so
//! a comma inside an entry is written `%2C`; `%2C` and `,` are the same when matching.

use std::collections::BTreeSet;
use std::str::FromStr;

/// The declared probe paths (commas folded, see the module comment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredProbes(BTreeSet<String>);

impl DeclaredProbes {
    /// Whether `path_and_query` (the request target as sent, e.g. `/probe/http/8080/x?a=1`) is
    /// one of the declared probes.
    pub fn allows(&self, path_and_query: &str) -> bool {
        self.0.contains(&fold_commas(path_and_query))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `%2C` (either case) as `,`.
fn fold_commas(s: &str) -> String {
    s.replace("%2C", ",").replace("%2c", ",")
}

impl FromStr for DeclaredProbes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut paths = BTreeSet::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if !entry.starts_with("/probe/") {
                return Err(format!(
                    "{entry:?} is not a probe path: each entry starts with /probe/ ({})",
                    super::USAGE
                ));
            }
            let entry = fold_commas(entry);
            let (path, query) = match entry.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (entry.as_str(), None),
            };
            super::parse(path, query).map_err(|(_, why)| format!("{entry:?}: {why}"))?;
            paths.insert(entry);
        }
        Ok(Self(paths))
    }
}

impl serde::Serialize for DeclaredProbes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_paths_match_exactly_query_included() {
        let declared: DeclaredProbes =
            "/probe/http/8080/healthz, /probe/tcp/5432,/probe/grpc/9090?service=x,/probe/http/8080/ready?full=1"
                .parse()
                .unwrap();
        for allowed in [
            "/probe/http/8080/healthz",
            "/probe/tcp/5432",
            "/probe/grpc/9090?service=x",
            "/probe/http/8080/ready?full=1",
        ] {
            assert!(declared.allows(allowed), "{allowed}");
        }
        for refused in [
            "/probe/http/8080/healthz?x=1",
            "/probe/http/8080/healthz/",
            "/probe/http/8080/healthzz",
            "/probe/http/8081/healthz",
            "/probe/http/8080/ready",
            "/probe/http/8080/ready?full=1&x=2",
            "/probe/tcp/5433",
            "/probe/tcp/5432/",
            "/probe/grpc/9090",
            "/probe/grpc/9090?service=y",
            "/probe/http/8080/../healthz",
            "",
        ] {
            assert!(!declared.allows(refused), "{refused}");
        }
    }

    #[test]
    fn empty_declares_nothing() {
        for text in ["", " , ,"] {
            let declared: DeclaredProbes = text.parse().unwrap();
            assert!(declared.is_empty());
            assert!(!declared.allows("/probe/tcp/80"));
        }
    }

    #[test]
    fn a_comma_in_an_entry_is_written_percent_2c() {
        let declared: DeclaredProbes = "/probe/http/8080/a%2Cb?l=1%2c2,/probe/tcp/1"
            .parse()
            .unwrap();
        assert!(declared.allows("/probe/http/8080/a,b?l=1,2"));
        assert!(declared.allows("/probe/http/8080/a%2Cb?l=1%2C2"));
        assert!(declared.allows("/probe/tcp/1"));
        assert!(!declared.allows("/probe/http/8080/a"));
    }

    #[test]
    fn bad_entries_are_named() {
        let cases = [
            ("/healthz", "\"/healthz\" is not a probe path"),
            ("/probe/tcp/5432,healthz", "\"healthz\" is not a probe path"),
            (
                "/probe/http/http/healthz",
                "\"/probe/http/http/healthz\": expected",
            ),
            ("/probe/tcp/0", "\"/probe/tcp/0\": port 0 is not 1-65535"),
            ("/probe/tcp/70000", "\"/probe/tcp/70000\": expected"),
            ("/probe/tcp/5432/x", "\"/probe/tcp/5432/x\": expected"),
            ("/probe/tcp/5432?x=1", "\"/probe/tcp/5432?x=1\": expected"),
            ("/probe/grpc/9090/x", "\"/probe/grpc/9090/x\": expected"),
            (
                "/probe/grpc/9090?servce=x",
                "unknown query parameter \"servce=x\"",
            ),
            ("/probe/udp/53", "unknown probe kind \"udp\""),
        ];
        for (text, expected) in cases {
            let err = text.parse::<DeclaredProbes>().unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn it_serializes_as_the_list_of_paths() {
        let declared: DeclaredProbes = "/probe/tcp/2,/probe/tcp/1".parse().unwrap();
        assert_eq!(
            serde_json::to_value(&declared).unwrap(),
            serde_json::json!(["/probe/tcp/1", "/probe/tcp/2"])
        );
    }
}
