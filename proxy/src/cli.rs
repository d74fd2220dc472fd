//! Command-line interface of `trellis-proxy`: every knob is a flag with a `TRELLIS_*` twin.
//!
//! `run` is the default subcommand: `trellis-proxy --inbound-addr ...` and
//! `trellis-proxy run --inbound-addr ...` are the same. Values are validated here, so a bad
//! deployment fails before anything is bound or changed, with a message that names the flag.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "The Trellis sidecar proxy",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Run {
        #[command(flatten)]
        args: Box<RunArgs>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Install the traffic interception rules in this network namespace, then exit.
    Init {
        #[command(flatten)]
        args: InitArgs,
        #[command(flatten)]
        log: LogArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,trellis_proxy=debug`).
    #[arg(long, env = "TRELLIS_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub use crate::telemetry::access_log::Format as AccessLog;

#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct RunArgs {
    /// Where redirected inbound connections arrive (iptables PREROUTING). With 0.0.0.0 the proxy
    /// also listens on [::] when the namespace has IPv6.
    #[arg(long, env = "TRELLIS_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,

    /// Where the app's redirected outbound connections arrive (iptables OUTPUT). With 127.0.0.1
    /// the proxy also listens on [::1] when the namespace has IPv6.
    #[arg(long, env = "TRELLIS_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    pub outbound_addr: SocketAddr,

    /// The admin server: /live, /ready, /metrics, /config, /shutdown.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,

    /// The workload this proxy serves, as NAMESPACE/NAME.
    #[arg(long, env = "TRELLIS_WORKLOAD", value_parser = parse_workload)]
    pub workload: Option<String>,

    /// The workload's service account (selects the ServerPolicies that apply to this proxy).
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// Static policy: TrafficPolicy and ServerPolicy YAML documents. Re-read when the file
    /// changes; a version that fails validation is rejected and the policy in force stays.
    #[arg(long, env = "TRELLIS_POLICY_FILE")]
    pub policy_file: Option<std::path::PathBuf>,

    /// The control plane's gRPC URL (TLS only, e.g. https://trellis-control.trellis-system:7443):
    /// policy arrives from there, with ACK/NACK, and certificates when
    /// --identity-token-file is set. Exclusive with --policy-file.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE", conflicts_with = "policy_file", value_parser = parse_control_plane)]
    pub control_plane: Option<String>,

    /// The mesh trust anchors (PEM) that verify the control plane (and, until the first
    /// certificate arrives, nothing else). Required with --control-plane.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS")]
    pub trust_anchors: Option<std::path::PathBuf>,

    /// The control plane's SPIFFE ID: a proxy talks (and sends its token) to nobody else.
    #[arg(
        long,
        env = "TRELLIS_CONTROL_PLANE_IDENTITY",
        default_value = "spiffe://cluster.local/ns/trellis-system/sa/trellis-control"
    )]
    pub control_plane_identity: String,

    /// A token proving who this proxy is when it asks the control plane for a certificate: the
    /// projected service-account token (audience trellis) in Kubernetes, a join token elsewhere.
    /// Re-read on every request. Needs --control-plane, --workload and --service-account.
    #[arg(
        long,
        env = "TRELLIS_IDENTITY_TOKEN_FILE",
        requires = "control_plane",
        conflicts_with = "identity_dir"
    )]
    pub identity_token_file: Option<std::path::PathBuf>,

    /// A directory with cert.pem, key.pem and ca.pem (cert-manager, SPIRE), reloaded when they
    /// change, instead of certificates from the control plane.
    #[arg(long, env = "TRELLIS_IDENTITY_DIR")]
    pub identity_dir: Option<std::path::PathBuf>,

    /// With --control-plane: how long /ready waits for the first snapshot before the proxy
    /// becomes ready with the built-in default policy (0: wait for ever).
    #[arg(long, env = "TRELLIS_READY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub ready_timeout: Duration,

    /// How often --policy-file is checked for changes.
    #[arg(long, env = "TRELLIS_POLICY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub policy_poll_interval: Duration,

    /// The cluster's DNS domain, for completing short service names (`reviews.default`).
    #[arg(long, env = "TRELLIS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Connections and response bodies with no traffic for this long are closed (0: never). A
    /// TrafficPolicy's idleTimeout overrides it for its calls.
    #[arg(long, env = "TRELLIS_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,

    /// The pod's name (Kubernetes downward API).
    #[arg(long, env = "TRELLIS_POD_NAME")]
    pub pod_name: Option<String>,

    /// The pod's IP (Kubernetes downward API).
    #[arg(long, env = "TRELLIS_POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// How long to wait for a client's first bytes before treating the connection as opaque TCP
    /// (server-speaks-first protocols send nothing).
    #[arg(long, env = "TRELLIS_DETECT_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub detect_timeout: Duration,

    /// Destination ports forwarded as opaque TCP without protocol detection: server-speaks-first
    /// protocols (SMTP, MySQL, ...) and anything that must not wait for the detect timeout.
    #[arg(
        long,
        env = "TRELLIS_OPAQUE_PORTS",
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub opaque_ports: PortList,

    /// How long to wait for a TCP connection to an upstream endpoint.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,

    /// Idle pooled upstream connections are closed after this long.
    #[arg(long, env = "TRELLIS_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub pool_idle_timeout: Duration,

    /// At most this many idle HTTP/1 connections are kept per upstream endpoint.
    #[arg(long, env = "TRELLIS_POOL_MAX_IDLE", default_value_t = 128)]
    pub pool_max_idle: usize,

    /// Runtime worker threads for the data path (the admin server has its own thread).
    #[arg(long, env = "TRELLIS_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,

    /// Connections accepted at once, per listener; beyond it new connections are shed
    /// (cause `overloaded`).
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// On SIGTERM or POST /shutdown: how long in-flight requests may take to finish.
    #[arg(long, env = "TRELLIS_DRAIN_GRACE_PERIOD", default_value = "20s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub drain_grace_period: Duration,

    /// The access log on stdout: one line per HTTP request or gRPC stream and per opaque TCP
    /// connection, as logfmt (`text`) or JSON.
    #[arg(long, env = "TRELLIS_ACCESS_LOG", value_enum, default_value_t = AccessLog::Off)]
    pub access_log: AccessLog,

    /// Where to send traces: an OTLP/gRPC collector such as Jaeger
    /// (http://jaeger-collector.observability:4317). Unset: no spans, trace headers untouched.
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The share of new traces (requests arriving without a sampling decision) that are
    /// sampled, 0.0 to 1.0; a decision carried by the request always wins.
    #[arg(long, env = "TRELLIS_TRACE_SAMPLE_RATIO", default_value_t = 0.01, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
}

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The UID the proxy runs as: its own connections are never redirected.
    #[arg(long, env = "TRELLIS_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// The proxy's inbound listener port.
    #[arg(long, env = "TRELLIS_INBOUND_PORT", default_value_t = 4143, value_parser = parse_port)]
    pub inbound_port: u16,

    /// The proxy's outbound listener port.
    #[arg(long, env = "TRELLIS_OUTBOUND_PORT", default_value_t = 4140, value_parser = parse_port)]
    pub outbound_port: u16,

    /// The proxy's admin port: never redirected (kubelet probes and Prometheus reach it).
    #[arg(long, env = "TRELLIS_ADMIN_PORT", default_value_t = 4191, value_parser = parse_port)]
    pub admin_port: u16,

    /// Inbound destination ports that bypass the proxy (e.g. `22,8000-8010`).
    #[arg(long, env = "TRELLIS_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: PortList,

    /// Outbound destination ports that bypass the proxy.
    #[arg(long, env = "TRELLIS_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: PortList,

    /// Outbound destination networks that bypass the proxy (IPv4 and IPv6 CIDRs, comma separated).
    #[arg(long, env = "TRELLIS_SKIP_OUTBOUND_CIDRS", default_value = "")]
    pub skip_outbound_cidrs: CidrList,

    /// Which iptables to use. `auto` picks the backend that already holds Trellis chains, else
    /// the one holding more rules, else nft.
    #[arg(long, env = "TRELLIS_IPTABLES_MODE", value_enum, default_value_t = IptablesMode::Auto)]
    pub iptables_mode: IptablesMode,

    /// Install ip6tables rules too. `auto`: when the namespace has IPv6 enabled.
    #[arg(long, env = "TRELLIS_IPV6", value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,

    /// Print the rules that would be installed, change nothing.
    #[arg(long, conflicts_with = "cleanup")]
    pub dry_run: bool,

    /// Remove Trellis's chains and jumps (and nothing else).
    #[arg(long)]
    pub cleanup: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesMode {
    Auto,
    Nft,
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// An inclusive range of TCP ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// A comma-separated list of ports and port ranges: `25,3306,8000-8010`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<PortRange>);

impl PortList {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }
}

impl serde::Serialize for PortList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|r| match r.first == r.last {
            true => r.first.to_string(),
            false => format!("{}-{}", r.first, r.last),
        }))
    }
}

impl FromStr for PortList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ranges = BTreeSet::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let range = match item.split_once('-') {
                Some((a, b)) => {
                    let (first, last) = (parse_port(a.trim())?, parse_port(b.trim())?);
                    if first > last {
                        return Err(format!("port range {item:?} is reversed"));
                    }
                    PortRange { first, last }
                }
                None => {
                    let p = parse_port(item)?;
                    PortRange { first: p, last: p }
                }
            };
            ranges.insert(range);
        }
        Ok(Self(ranges.into_iter().collect()))
    }
}

/// A comma-separated list of IPv4/IPv6 networks; a bare address means a single host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<ipnet::IpNet>);

impl FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut nets = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let net = match item.parse::<ipnet::IpNet>() {
                Ok(net) => net.trunc(),
                Err(_) => match item.parse::<std::net::IpAddr>() {
                    Ok(ip) => ipnet::IpNet::from(ip),
                    Err(_) => {
                        return Err(format!(
                            "{item:?} is not a CIDR (expected e.g. 10.96.0.0/12 or fd00::/8)"
                        ));
                    }
                },
            };
            if !nets.contains(&net) {
                nets.push(net);
            }
        }
        Ok(Self(nets))
    }
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("{s:?} is not a port number")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number (expected 0.0 to 1.0)"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("{r} is outside 0.0 to 1.0"));
    }
    Ok(r)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 500ms, 2s): {e}"))
}

fn parse_control_plane(s: &str) -> Result<String, String> {
    match s.split_once("://") {
        Some(("https", rest)) if !rest.is_empty() => Ok(s.to_string()),
        Some(("http", _)) => Err(
            "the control plane speaks TLS only (a token is never sent over plaintext): use https://HOST:PORT"
                .into(),
        ),
        _ => Err("expected https://HOST:PORT".into()),
    }
}

fn parse_workload(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// Durations in /config read as people write them in flags: "500ms", "20s".
mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_accept_ports_and_ranges() {
        let list: PortList = "25, 8000-8010,25".parse().unwrap();
        assert_eq!(list.0.len(), 2);
        assert!(list.contains(25) && list.contains(8005) && !list.contains(8011));
        assert_eq!("".parse::<PortList>().unwrap(), PortList::default());
    }

    #[test]
    fn port_lists_name_the_bad_entry() {
        assert_eq!(
            "80,70000".parse::<PortList>().unwrap_err(),
            "port 70000 is out of range 1-65535"
        );
        assert_eq!(
            "0".parse::<PortList>().unwrap_err(),
            "port 0 is out of range 1-65535"
        );
        assert_eq!(
            "http".parse::<PortList>().unwrap_err(),
            "\"http\" is not a port number"
        );
        assert!(
            "90-80"
                .parse::<PortList>()
                .unwrap_err()
                .contains("reversed")
        );
    }

    #[test]
    fn cidr_lists_accept_both_families_and_bare_addresses() {
        let list: CidrList = "10.96.0.0/12,fd00::/8,192.168.1.7".parse().unwrap();
        assert_eq!(list.0.len(), 3);
        assert_eq!(list.0[2].to_string(), "192.168.1.7/32");
        assert!(
            "10.0.0.0/33"
                .parse::<CidrList>()
                .unwrap_err()
                .contains("\"10.0.0.0/33\" is not a CIDR")
        );
    }

    #[test]
    fn run_is_the_default_subcommand() {
        let cli = Cli::try_parse_from(["trellis-proxy", "--detect-timeout", "1s"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.detect_timeout, Duration::from_secs(1));
        let cli = Cli::try_parse_from(["trellis-proxy", "run", "--threads", "2"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Run { ref args, .. }) if args.threads == 2));
    }

    #[test]
    fn bad_flags_are_rejected_with_the_flag_named() {
        let err =
            Cli::try_parse_from(["trellis-proxy", "init", "--inbound-port", "70000"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--inbound-port") && msg.contains("out of range"),
            "{msg}"
        );
        let err = Cli::try_parse_from(["trellis-proxy", "--workload", "nope"]).unwrap_err();
        assert!(err.to_string().contains("NAMESPACE/NAME"));
    }
}
