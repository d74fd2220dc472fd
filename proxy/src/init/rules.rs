//! The interception rules, rendered as `iptables-restore` input. Pure: no commands run here.
//!
//! Two chains of our own in the nat table, reached by one jump each from the built-in chains:
//!
//! ```text
//! PREROUTING -p tcp -j TRELLIS_INBOUND      (traffic arriving at the pod)
//!   RETURN for the admin port, the proxy's own ports and --skip-inbound-ports
//!   REDIRECT everything else to the inbound port
//! OUTPUT -p tcp -j TRELLIS_OUTPUT           (traffic the pod's processes send)
//!   RETURN for the proxy's UID (its own upstream connections), loopback,
//!          --skip-outbound-ports and --skip-outbound-cidrs
//!   REDIRECT everything else to the outbound port
//! ```
//!
//! Declaring a chain in `iptables-restore --noflush` input empties it, so re-running `init`
//! replaces our rules instead of appending to them; the jumps are added only when absent.

use std::fmt::Write;

use ipnet::IpNet;

use crate::cli::{InitArgs, PortList};

pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
pub const OUTBOUND_CHAIN: &str = "TRELLIS_OUTPUT";
pub const INBOUND_JUMP: &str = "-A PREROUTING -p tcp -j TRELLIS_INBOUND";
pub const OUTBOUND_JUMP: &str = "-A OUTPUT -p tcp -j TRELLIS_OUTPUT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    fn matches(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Self::V4, IpNet::V4(_)) | (Self::V6, IpNet::V6(_))
        )
    }
}

/// What is already installed in the nat table, read from `iptables-save -t nat`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Existing {
    pub inbound_chain: bool,
    pub outbound_chain: bool,
    /// Jump rules into our chains, exactly as `iptables-save` prints them.
    pub jumps: Vec<String>,
}

impl Existing {
    pub fn parse(save_output: &str) -> Self {
        let mut existing = Self::default();
        for line in save_output.lines().map(str::trim) {
            if line.starts_with(&format!(":{INBOUND_CHAIN} ")) {
                existing.inbound_chain = true;
            } else if line.starts_with(&format!(":{OUTBOUND_CHAIN} ")) {
                existing.outbound_chain = true;
            } else if (line.starts_with("-A PREROUTING ") || line.starts_with("-A OUTPUT "))
                && (line.ends_with(&format!("-j {INBOUND_CHAIN}"))
                    || line.ends_with(&format!("-j {OUTBOUND_CHAIN}")))
            {
                existing.jumps.push(line.to_string());
            }
        }
        existing
    }

    pub fn is_empty(&self) -> bool {
        !self.inbound_chain && !self.outbound_chain && self.jumps.is_empty()
    }
}

/// The restore input that installs (or replaces) our rules for one address family.
pub fn install(args: &InitArgs, family: Family, existing: &Existing) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("*nat".into());
    line(format!(":{INBOUND_CHAIN} - [0:0]"));
    line(format!(":{OUTBOUND_CHAIN} - [0:0]"));

    // Inbound: never redirect the proxy's own ports (admin probes, and no self-loops).
    let mut inbound_skips: Vec<u16> = Vec::new();
    for port in [args.admin_port, args.inbound_port, args.outbound_port] {
        if !inbound_skips.contains(&port) {
            inbound_skips.push(port);
        }
    }
    for port in inbound_skips {
        line(format!(
            "-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN"
        ));
    }
    for range in ports(&args.skip_inbound_ports) {
        line(format!(
            "-A {INBOUND_CHAIN} -p tcp --dport {range} -j RETURN"
        ));
    }
    line(format!(
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        args.inbound_port
    ));

    // Outbound: the proxy's own connections first, so they are never redirected again.
    line(format!(
        "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
        args.proxy_uid
    ));
    line(format!("-A {OUTBOUND_CHAIN} -o lo -j RETURN"));
    line(format!(
        "-A {OUTBOUND_CHAIN} -d {} -j RETURN",
        family.loopback()
    ));
    for range in ports(&args.skip_outbound_ports) {
        line(format!(
            "-A {OUTBOUND_CHAIN} -p tcp --dport {range} -j RETURN"
        ));
    }
    for net in args
        .skip_outbound_cidrs
        .0
        .iter()
        .filter(|n| family.matches(n))
    {
        line(format!("-A {OUTBOUND_CHAIN} -d {net} -j RETURN"));
    }
    line(format!(
        "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        args.outbound_port
    ));

    for jump in [INBOUND_JUMP, OUTBOUND_JUMP] {
        if !existing.jumps.iter().any(|j| j == jump) {
            line(jump.to_string());
        }
    }
    line("COMMIT".into());
    out
}

/// The restore input that removes our jumps and chains (and nothing else), or `None` if none
/// are installed.
pub fn cleanup(existing: &Existing) -> Option<String> {
    if existing.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for jump in &existing.jumps {
        // `-A CHAIN spec` as saved becomes `-D CHAIN spec`: deletes that exact rule.
        out.push_str(&format!("-D{}\n", &jump[2..]));
    }
    for (present, chain) in [
        (existing.inbound_chain, INBOUND_CHAIN),
        (existing.outbound_chain, OUTBOUND_CHAIN),
    ] {
        if present {
            out.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
    }
    out.push_str("COMMIT\n");
    Some(out)
}

fn ports(list: &PortList) -> impl Iterator<Item = String> + '_ {
    list.0.iter().map(|r| r.to_string())
}

/// Renders a human-readable header for `--dry-run`.
pub fn describe(tool: &str, body: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {tool} --noflush");
    out.push_str(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> InitArgs {
        let mut argv = vec!["trellis-proxy", "init"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            Some(crate::cli::Command::Init { args, .. }) => args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn renders_both_chains_with_skips_in_order() {
        let a = args(&[
            "--skip-inbound-ports",
            "22",
            "--skip-outbound-ports",
            "5000-5010",
            "--skip-outbound-cidrs",
            "10.96.0.0/12,fd00::/8",
        ]);
        let v4 = install(&a, Family::V4, &Existing::default());
        let expected = "\
*nat
:TRELLIS_INBOUND - [0:0]
:TRELLIS_OUTPUT - [0:0]
-A TRELLIS_INBOUND -p tcp --dport 4191 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 4143 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 4140 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN
-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143
-A TRELLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A TRELLIS_OUTPUT -p tcp --dport 5000:5010 -j RETURN
-A TRELLIS_OUTPUT -d 10.96.0.0/12 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
COMMIT
";
        assert_eq!(v4, expected);
        let v6 = install(&a, Family::V6, &Existing::default());
        assert!(v6.contains("-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN"));
        assert!(v6.contains("-d ::1/128 -j RETURN"));
        assert!(!v6.contains("10.96.0.0/12"));
    }

    #[test]
    fn existing_jumps_are_not_added_twice() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:TRELLIS_INBOUND - [0:0]\n:TRELLIS_OUTPUT - [0:0]\n\
                     -A PREROUTING -p tcp -j TRELLIS_INBOUND\n-A OUTPUT -p tcp -j TRELLIS_OUTPUT\nCOMMIT\n";
        let existing = Existing::parse(saved);
        assert_eq!(existing.jumps.len(), 2);
        let rules = install(&args(&[]), Family::V4, &existing);
        assert!(!rules.contains("-A PREROUTING") && !rules.contains("-A OUTPUT "));
    }

    #[test]
    fn cleanup_removes_exactly_our_jumps_and_chains() {
        let saved = "*nat\n:TRELLIS_INBOUND - [0:0]\n:TRELLIS_OUTPUT - [0:0]\n-A PREROUTING -p tcp -j KUBE-SERVICES\n\
                     -A PREROUTING -p tcp -j TRELLIS_INBOUND\n-A OUTPUT -p tcp -j TRELLIS_OUTPUT\nCOMMIT\n";
        let rules = cleanup(&Existing::parse(saved)).unwrap();
        assert_eq!(
            rules,
            "*nat\n-D PREROUTING -p tcp -j TRELLIS_INBOUND\n-D OUTPUT -p tcp -j TRELLIS_OUTPUT\n\
             -F TRELLIS_INBOUND\n-X TRELLIS_INBOUND\n-F TRELLIS_OUTPUT\n-X TRELLIS_OUTPUT\nCOMMIT\n"
        );
        assert_eq!(cleanup(&Existing::default()), None);
    }
}
