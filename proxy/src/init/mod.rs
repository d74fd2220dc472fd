//! `trellis-proxy init`: installs the interception rules in the current network namespace.
//!
//! This is what the pod's init container runs. It is atomic (one `iptables-restore` transaction
//! per address family: all rules or none), idempotent (running it again leaves one set of rules),
//! and touches only its own chains and the two jumps into them. `--dry-run` prints what would be
//! applied; `--cleanup` removes exactly what `init` installed. IPv6 gets the same rules through
//! ip6tables whenever the namespace has IPv6, so nothing bypasses the mesh over IPv6.

mod backend;
pub mod rules;

pub use backend::Backend;

use crate::cli::{InitArgs, Ipv6Mode};
use rules::{Existing, Family};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "no iptables found: install the iptables package (it provides iptables-nft-restore and \
         iptables-legacy-restore), or pass --iptables-mode to choose one that exists"
    )]
    NoIptables,
    #[error("{tool} is not installed (chosen by --iptables-mode {mode}): {source}")]
    ToolMissing {
        tool: String,
        mode: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{tool} failed (exit {code}): {stderr}\nrules that were rejected (nothing was changed):\n{input}"
    )]
    Rejected {
        tool: String,
        code: i32,
        stderr: String,
        input: String,
    },
    #[error("{tool} failed (exit {code}): {stderr}")]
    Failed {
        tool: String,
        code: i32,
        stderr: String,
    },
    #[error("running {tool}: {source}")]
    Exec {
        tool: String,
        source: std::io::Error,
    },
    #[error(
        "--ipv6 on, but this network namespace has no IPv6 (/proc/net/if_inet6 missing or IPv6 disabled)"
    )]
    NoIpv6,
    #[error("port {port} is used for two purposes: {what}")]
    PortClash { port: u16, what: String },
}

pub fn run(args: &InitArgs) -> Result<(), InitError> {
    check_ports(args)?;
    let backend = Backend::choose(args.iptables_mode, args.dry_run)?;
    let families = families(args.ipv6)?;
    tracing::info!(backend = %backend, ipv6 = families.contains(&Family::V6), "iptables backend chosen");

    for family in families {
        let existing = if args.dry_run {
            backend
                .save(family)
                .map(|s| Existing::parse(&s))
                .unwrap_or_default()
        } else {
            Existing::parse(&backend.save(family)?)
        };
        if args.cleanup {
            match rules::cleanup(&existing) {
                Some(input) => {
                    backend.restore(family, &input)?;
                    tracing::info!(
                        tool = backend.restore_tool(family),
                        "removed Trellis chains"
                    );
                }
                None => tracing::info!(
                    tool = backend.restore_tool(family),
                    "no Trellis chains installed; nothing to clean up"
                ),
            }
            continue;
        }
        let input = rules::install(args, family, &existing);
        if args.dry_run {
            print!("{}", rules::describe(&backend.restore_tool(family), &input));
        } else {
            backend.restore(family, &input)?;
            tracing::info!(
                tool = backend.restore_tool(family),
                "interception rules installed"
            );
        }
    }
    Ok(())
}

/// The proxy's ports must be distinct: a redirect to the admin port would be a silent outage.
fn check_ports(args: &InitArgs) -> Result<(), InitError> {
    let named = [
        ("--inbound-port", args.inbound_port),
        ("--outbound-port", args.outbound_port),
        ("--admin-port", args.admin_port),
    ];
    for (i, (a, pa)) in named.iter().enumerate() {
        for (b, pb) in &named[i + 1..] {
            if pa == pb {
                return Err(InitError::PortClash {
                    port: *pa,
                    what: format!("{a} and {b}"),
                });
            }
        }
    }
    Ok(())
}

fn families(mode: Ipv6Mode) -> Result<Vec<Family>, InitError> {
    let has_ipv6 = namespace_has_ipv6();
    match (mode, has_ipv6) {
        (Ipv6Mode::Off, _) | (Ipv6Mode::Auto, false) => Ok(vec![Family::V4]),
        (Ipv6Mode::On, false) => Err(InitError::NoIpv6),
        (_, true) => Ok(vec![Family::V4, Family::V6]),
    }
}

/// IPv6 is usable in this namespace when the kernel has it and it is not disabled. (A fresh
/// namespace lists no IPv6 addresses until its interfaces come up, so addresses are not checked.)
fn namespace_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
        && std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .map(|v| v.trim() == "0")
            .unwrap_or(false)
}
