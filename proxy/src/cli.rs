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
    /// Wait until the proxy's /ready answers 200 (exit 0) or the timeout passes (exit 1): the
    /// postStart hook that holds back the app's containers in classic sidecar mode.
    WaitReady {
        #[command(flatten)]
        args: WaitReadyArgs,
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

    /// The admin server: /live, /ready, /metrics, /config, /shutdown, and the app's probes
    /// /probe/http/<port>/<path>, /probe/tcp/<port> and /probe/grpc/<port>?service=NAME.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,

    /// The app's probes as the injector rewrote them, comma-separated admin paths with their
    /// query (e.g. `/probe/http/8080/healthz,/probe/tcp/5432,/probe/grpc/9090?service=x`; a
    /// comma inside one is `%2C`): the only probe paths answered to clients other than
    /// loopback, such as kubelet; anything else from them gets 403. Loopback clients may use
    /// any probe path. Empty: no probe path is open beyond loopback.
    #[arg(long, env = "TRELLIS_PROBES", default_value = "", value_name = "PATHS")]
    pub probes: crate::probe::DeclaredProbes,

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

    /// A file with the mesh trust anchors (PEM) that verify the control plane (and, until the
    /// first certificate arrives, nothing else). With --control-plane, this or
    /// --trust-anchors-pem is required.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS")]
    pub trust_anchors: Option<std::path::PathBuf>,

    /// The mesh trust anchors as PEM text rather than a file, for the sidecar injector (which
    /// cannot mount a file from the control plane's namespace). Exclusive with --trust-anchors.
    /// /config shows only how many certificates it holds.
    #[arg(
        long,
        env = "TRELLIS_TRUST_ANCHORS_PEM",
        value_name = "PEM",
        conflicts_with = "trust_anchors",
        hide_env_values = true,
        // The text starts with "-----BEGIN": without this it reads as a flag.
        allow_hyphen_values = true
    )]
    pub trust_anchors_pem: Option<TrustAnchorsPem>,

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

    /// With --control-plane: how long the first connection to a new destination waits for
    /// the control plane to say which service it is (its endpoints and their identities);
    /// afterwards it is known. 0: never wait (the first calls go to the original destination).
    #[arg(long, env = "TRELLIS_DISCOVERY_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub discovery_timeout: Duration,

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

    /// HTTP/1: a client must send a request's whole head (request line and headers) within this
    /// long, or its connection is closed without a response (slowloris). It also bounds how long
    /// a keep-alive connection may wait for its next request. 0: no limit.
    #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,

    /// The largest request head accepted, in bytes: request line and headers (HTTP/1), or the
    /// header list (HTTP/2). Beyond it: 431 Request Header Fields Too Large. HTTP/1 also allows
    /// at most 100 header lines (431 beyond). At least 8192.
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES", default_value_t = 65_536, value_parser = parse_max_header_bytes)]
    pub max_header_bytes: usize,

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

#[derive(Debug, Clone, Args)]
pub struct WaitReadyArgs {
    /// The admin address of the proxy to wait for; GET /ready is polled there every 200ms. A
    /// wildcard address (0.0.0.0, [::]) is polled on loopback.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:4191")]
    pub admin_addr: SocketAddr,

    /// How long to wait before giving up (exit 1, with the last answer or error).
    #[arg(long, env = "TRELLIS_WAIT_READY_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// `--trust-anchors-pem`: PEM text, checked (like the --trust-anchors file) when `run` starts.
///
/// Shown in /config and `{:?}` as a certificate count only: the text is long and says nothing a
/// person reading the config needs.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustAnchorsPem(pub String);

impl TrustAnchorsPem {
    /// How many PEM certificate blocks the text holds (whether they parse is checked at start).
    pub fn certificates(&self) -> usize {
        self.0.matches("-----BEGIN CERTIFICATE-----").count()
    }
}

impl fmt::Display for TrustAnchorsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.certificates() {
            1 => write!(f, "(set: 1 certificate)"),
            n => write!(f, "(set: {n} certificates)"),
        }
    }
}

impl fmt::Debug for TrustAnchorsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for TrustAnchorsPem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// Not validated while parsing: clap would quote the whole PEM text in its error message.
impl FromStr for TrustAnchorsPem {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
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

fn parse_max_header_bytes(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (e.g. 65536)"))?;
    if n < 8192 {
        return Err(format!(
            "{n} bytes is too small for a request head (at least 8192)"
        ));
    }
    Ok(n)
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

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from([&["trellis-proxy", "run"], argv].concat()).unwrap();
        match cli.command {
            Some(Command::Run { args, .. }) => *args,
            other => panic!("expected run, got {other:?}"),
        }
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn trust_anchors_can_be_given_as_pem_text_by_flag_or_env() {
        let args = run_args(&["--trust-anchors-pem", PEM]);
        assert_eq!(args.trust_anchors_pem, Some(TrustAnchorsPem(PEM.into())));
        assert_eq!(args.trust_anchors, None);
        let cmd = <Cli as clap::CommandFactory>::command();
        let arg = cmd
            .find_subcommand("run")
            .and_then(|run| {
                run.get_arguments()
                    .find(|a| a.get_id() == "trust_anchors_pem")
            })
            .unwrap();
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("TRELLIS_TRUST_ANCHORS_PEM")
        );
        // --help must not print the PEM from the environment.
        assert!(arg.is_hide_env_values_set());
    }

    #[test]
    fn trust_anchors_by_file_and_by_text_are_exclusive() {
        let err = Cli::try_parse_from([
            "trellis-proxy",
            "run",
            "--trust-anchors",
            "/etc/trellis/ca.pem",
            "--trust-anchors-pem",
            PEM,
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let msg = err.to_string();
        assert!(
            msg.contains("--trust-anchors-pem <PEM>") && msg.contains("--trust-anchors <"),
            "{msg}"
        );
    }

    #[test]
    fn config_shows_how_many_trust_anchors_not_the_pem() {
        let two = format!("{PEM}{PEM}");
        let args = run_args(&["--trust-anchors-pem", &two]);
        let config = serde_json::to_value(&args).unwrap();
        assert_eq!(config["trust_anchors_pem"], "(set: 2 certificates)");
        assert!(!config.to_string().contains("MIIB"));
        assert!(!format!("{args:?}").contains("MIIB"));
        let one = run_args(&["--trust-anchors-pem", PEM]);
        assert_eq!(
            serde_json::to_value(&one).unwrap()["trust_anchors_pem"],
            "(set: 1 certificate)"
        );
        assert_eq!(
            serde_json::to_value(run_args(&[])).unwrap()["trust_anchors_pem"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn wait_ready_polls_the_default_admin_address_for_120s() {
        let cli = Cli::try_parse_from(["trellis-proxy", "wait-ready"]).unwrap();
        let Some(Command::WaitReady { args, .. }) = cli.command else {
            panic!("expected wait-ready, got {:?}", cli.command);
        };
        assert_eq!(args.admin_addr, "127.0.0.1:4191".parse().unwrap());
        assert_eq!(args.timeout, Duration::from_secs(120));
        let cli = Cli::try_parse_from([
            "trellis-proxy",
            "wait-ready",
            "--admin-addr",
            "127.0.0.1:9191",
            "--timeout",
            "5s",
        ])
        .unwrap();
        let Some(Command::WaitReady { args, .. }) = cli.command else {
            panic!("expected wait-ready, got {:?}", cli.command);
        };
        assert_eq!(args.admin_addr, "127.0.0.1:9191".parse().unwrap());
        assert_eq!(args.timeout, Duration::from_secs(5));
        let err = Cli::try_parse_from(["trellis-proxy", "wait-ready", "--timeout", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--timeout") && err.contains("not a duration"),
            "{err}"
        );
    }

    #[test]
    fn http_limits_have_defaults_and_name_bad_values() {
        let args = run_args(&[]);
        assert_eq!(args.header_read_timeout, Duration::from_secs(30));
        assert_eq!(args.max_header_bytes, 65_536);
        let args = run_args(&["--header-read-timeout", "2s", "--max-header-bytes", "16384"]);
        assert_eq!(args.header_read_timeout, Duration::from_secs(2));
        assert_eq!(args.max_header_bytes, 16_384);
        let err = Cli::try_parse_from(["trellis-proxy", "run", "--max-header-bytes", "100"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--max-header-bytes") && err.contains("at least 8192"),
            "{err}"
        );
        let err = Cli::try_parse_from(["trellis-proxy", "run", "--header-read-timeout", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--header-read-timeout"), "{err}");
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

    #[test]
    fn probes_are_declared_by_flag_and_bad_entries_name_the_flag() {
        assert!(run_args(&[]).probes.is_empty());
        let args = run_args(&["--probes", "/probe/http/8080/healthz,/probe/tcp/5432"]);
        assert!(args.probes.allows("/probe/http/8080/healthz"));
        assert!(args.probes.allows("/probe/tcp/5432"));
        assert!(!args.probes.allows("/probe/tcp/8080"));
        assert_eq!(
            serde_json::to_value(&args).unwrap()["probes"],
            serde_json::json!(["/probe/http/8080/healthz", "/probe/tcp/5432"])
        );
        let err = Cli::try_parse_from(["trellis-proxy", "run", "--probes", "/healthz"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--probes") && err.contains("\"/healthz\" is not a probe path"),
            "{err}"
        );
    }
}
