//! `trellis-proxy init`: idempotent, atomic, dry-run, cleanup, both backends, bad flags.

use trellis_tests::harness::Mesh;

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.trim() == needle).count()
}

#[test]
fn init_twice_leaves_one_set_of_rules_for_ipv4_and_ipv6() {
    let Some(mesh) = Mesh::new("init_idempotent") else {
        return;
    };
    let pod = mesh.pod("pod");
    for _ in 0..2 {
        let out = pod.init(&[
            "--skip-outbound-cidrs",
            "10.96.0.0/12,fd00::/8",
            "--skip-inbound-ports",
            "22",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v4 = pod.nat_rules(false, "nft");
    assert_eq!(
        count(&v4, "-A PREROUTING -p tcp -j TRELLIS_INBOUND"),
        1,
        "{v4}"
    );
    assert_eq!(count(&v4, "-A OUTPUT -p tcp -j TRELLIS_OUTPUT"), 1, "{v4}");
    assert_eq!(
        count(&v4, "-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143"),
        1,
        "{v4}"
    );
    assert_eq!(
        count(&v4, "-A TRELLIS_OUTPUT -m owner --uid-owner 2102 -j RETURN"),
        1,
        "{v4}"
    );
    assert_eq!(
        count(&v4, "-A TRELLIS_OUTPUT -d 10.96.0.0/12 -j RETURN"),
        1,
        "{v4}"
    );
    assert_eq!(
        count(&v4, "-A TRELLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN"),
        1,
        "{v4}"
    );
    assert_eq!(
        count(
            &v4,
            "-A TRELLIS_INBOUND -p tcp -m tcp --dport 4191 -j RETURN"
        ),
        1,
        "admin port always skipped: {v4}"
    );

    let v6 = pod.nat_rules(true, "nft");
    assert_eq!(
        count(&v6, "-A PREROUTING -p tcp -j TRELLIS_INBOUND"),
        1,
        "{v6}"
    );
    assert_eq!(
        count(&v6, "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140"),
        1,
        "{v6}"
    );
    assert_eq!(
        count(&v6, "-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN"),
        1,
        "{v6}"
    );
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    let Some(mesh) = Mesh::new("init_dry_run") else {
        return;
    };
    let pod = mesh.pod("pod");
    let before = pod.nat_rules(false, "nft");
    let out = pod.init(&["--dry-run"]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 4143"),
        "{printed}"
    );
    assert!(
        printed.contains("-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 4140"),
        "{printed}"
    );
    assert!(
        printed.contains("# ip6tables-nft-restore --noflush"),
        "IPv6 rules shown too: {printed}"
    );
    assert_eq!(pod.nat_rules(false, "nft"), before);
    assert!(!pod.nat_rules(true, "nft").contains("TRELLIS"));
}

#[test]
fn cleanup_removes_exactly_our_rules() {
    let Some(mesh) = Mesh::new("init_cleanup") else {
        return;
    };
    let pod = mesh.pod("pod");
    // Someone else's rule (a CNI's, say) must survive init and cleanup.
    let out = pod.exec(
        "iptables-nft",
        &[
            "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN",
        ],
    );
    assert!(out.status.success());
    assert!(pod.init(&[]).status.success());
    let out = pod.init(&["--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v6 in [false, true] {
        let rules = pod.nat_rules(v6, "nft");
        assert!(!rules.contains("TRELLIS"), "{rules}");
    }
    assert!(
        pod.nat_rules(false, "nft")
            .contains("-A OUTPUT -p udp -m udp --dport 53 -j RETURN")
    );
    // Cleaning up again is a no-op, not an error.
    assert!(pod.init(&["--cleanup"]).status.success());
}

#[test]
fn legacy_backend_is_used_when_asked_and_found_again_by_auto() {
    let Some(mesh) = Mesh::new("init_legacy") else {
        return;
    };
    let pod = mesh.pod("pod");
    let out = pod.init(&["--iptables-mode", "legacy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(
            &pod.nat_rules(false, "legacy"),
            "-A PREROUTING -p tcp -j TRELLIS_INBOUND"
        ),
        1
    );
    assert!(
        !pod.nat_rules(false, "nft").contains("TRELLIS"),
        "rules landed in one backend only"
    );
    // auto finds the backend that holds our chains: re-running does not duplicate into nft.
    assert!(pod.init(&[]).status.success());
    assert!(!pod.nat_rules(false, "nft").contains("TRELLIS"));
    assert_eq!(
        count(
            &pod.nat_rules(false, "legacy"),
            "-A OUTPUT -p tcp -j TRELLIS_OUTPUT"
        ),
        1
    );
    assert!(pod.init(&["--cleanup"]).status.success());
    assert!(!pod.nat_rules(false, "legacy").contains("TRELLIS"));
}

#[test]
fn bad_flags_are_named_and_change_nothing() {
    let Some(mesh) = Mesh::new("init_bad_flags") else {
        return;
    };
    let pod = mesh.pod("pod");
    assert!(pod.init(&["--skip-inbound-ports", "22"]).status.success());
    let before = (pod.nat_rules(false, "nft"), pod.nat_rules(true, "nft"));

    for (args, expected) in [
        (
            &["--skip-inbound-ports", "22,70000"][..],
            "port 70000 is out of range 1-65535",
        ),
        (
            &["--skip-outbound-cidrs", "10.0.0.0/33"][..],
            "\"10.0.0.0/33\" is not a CIDR",
        ),
        (
            &["--inbound-port", "4191"][..],
            "port 4191 is used for two purposes: --inbound-port and --admin-port",
        ),
        (
            &["--iptables-mode", "iptables-xyz"][..],
            "invalid value 'iptables-xyz'",
        ),
    ] {
        let out = pod.init(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
    }
    assert_eq!(
        (pod.nat_rules(false, "nft"), pod.nat_rules(true, "nft")),
        before,
        "a rejected init changed the rules"
    );
}
