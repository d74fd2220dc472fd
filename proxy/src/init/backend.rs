//! Which iptables to drive (nft or legacy), and running its save/restore tools.
//!
//! Hosts use one of two kernel backends, and rules installed through the other one are invisible
//! to the host's tools and may not take effect. `auto` follows the approach of Kubernetes'
//! iptables-wrapper: the backend that already holds our chains (so a re-run or cleanup sees
//! them), else the one that holds more rules (the one the host's CNI and kube-proxy use), else nft.

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

use super::InitError;
use super::rules::{Existing, Family};
use crate::cli::IptablesMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        }
    }

    fn tool(self, family: Family, what: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{base}-{}-{what}", self.name())
    }

    pub fn restore_tool(self, family: Family) -> String {
        self.tool(family, "restore")
    }

    /// Picks the backend for `mode`. For a dry run a missing tool is not fatal: nft is assumed.
    pub fn choose(mode: IptablesMode, dry_run: bool) -> Result<Self, InitError> {
        let chosen = match mode {
            IptablesMode::Nft => Self::Nft,
            IptablesMode::Legacy => Self::Legacy,
            IptablesMode::Auto => {
                let score = |b: Backend| {
                    b.save(Family::V4)
                        .ok()
                        .map(|s| (Existing::parse(&s), count_rules(&s)))
                };
                match (score(Self::Nft), score(Self::Legacy)) {
                    (None, None) if dry_run => Self::Nft,
                    (None, None) => return Err(InitError::NoIptables),
                    (Some(_), None) => Self::Nft,
                    (None, Some(_)) => Self::Legacy,
                    (Some((nft, _)), Some(_)) if !nft.is_empty() => Self::Nft,
                    (Some(_), Some((legacy, _))) if !legacy.is_empty() => Self::Legacy,
                    (Some((_, nft)), Some((_, legacy))) => {
                        if legacy > nft {
                            Self::Legacy
                        } else {
                            Self::Nft
                        }
                    }
                }
            }
        };
        if mode != IptablesMode::Auto && !dry_run {
            let tool = chosen.restore_tool(Family::V4);
            if let Err(source) = Command::new(&tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
            {
                return Err(InitError::ToolMissing {
                    tool,
                    mode: chosen.name(),
                    source,
                });
            }
        }
        Ok(chosen)
    }

    /// The nat table as `*-save` prints it.
    pub fn save(self, family: Family) -> Result<String, InitError> {
        let tool = self.tool(family, "save");
        let out = Command::new(&tool)
            .args(["-t", "nat"])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| InitError::Exec {
                tool: tool.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(InitError::Failed {
                tool,
                code: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies `input` in one transaction (`--noflush`: other rules in the table are kept).
    pub fn restore(self, family: Family, input: &str) -> Result<(), InitError> {
        let tool = self.restore_tool(family);
        let mut child = Command::new(&tool)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| InitError::Exec {
                tool: tool.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|source| InitError::Exec {
                    tool: tool.clone(),
                    source,
                })?;
        }
        let out = child.wait_with_output().map_err(|source| InitError::Exec {
            tool: tool.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(InitError::Rejected {
                tool,
                code: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                input: input.to_string(),
            });
        }
        Ok(())
    }
}

fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}
