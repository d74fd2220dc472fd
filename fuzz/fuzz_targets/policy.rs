//! Fuzz target `policy`: the policy documents people write, as `trellis-control apply -f`, the
//! control plane's `PolicyService` and the proxy's `--policy-file` read them
//! (`PolicySet::parse`).
//!
//! Arbitrary text must give policies or errors, never a panic; every error names its document
//! (`document N ...: field: reason`). A policy set that validates must survive every way it
//! travels unchanged: to protobuf and back through the wire validator (the proxy's snapshot
//! path), through prost encoding, and to YAML and back (what the control plane writes to its
//! state file and `trellis-control get -o yaml` prints) — otherwise a policy accepted at `apply`
//! could be NACKed by proxies, change meaning, or leave a state file the control plane cannot
//! read at its next start.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use trellis_proto::pb;
use trellis_proto::policy::PolicySet;
use trellis_proto::wire;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let set = match PolicySet::parse(text) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without a reason: {text:?}");
            for e in &errors.0 {
                assert!(
                    e.starts_with("document ") || e.starts_with("not valid YAML"),
                    "an error that names no document: {e:?}"
                );
            }
            return;
        }
    };

    let traffic: Vec<pb::TrafficPolicy> = set.traffic.iter().map(wire::traffic_to_wire).collect();
    let server: Vec<pb::ServerPolicy> = set.server.iter().map(wire::server_to_wire).collect();
    match wire::set_from_wire(&traffic, &server) {
        Ok(back) => assert_eq!(
            back, set,
            "the wire round trip changed the policy\ninput: {text:?}"
        ),
        Err(e) => {
            panic!("a policy accepted at apply is rejected from the wire: {e}\ninput: {text:?}")
        }
    }

    let snapshot = pb::Snapshot {
        version: "1".into(),
        nonce: "n".into(),
        traffic: traffic.clone(),
        server: server.clone(),
        meshed: Vec::new(),
    };
    let decoded = pb::Snapshot::decode(snapshot.encode_to_vec().as_slice())
        .expect("prost decodes what prost encoded");
    assert_eq!(decoded, snapshot, "prost round trip");

    let yaml = wire::to_yaml(&traffic, &server);
    match PolicySet::parse(&yaml) {
        Ok(again) => assert_eq!(
            again, set,
            "the YAML round trip changed the policy\ninput: {text:?}\nprinted: {yaml}"
        ),
        Err(e) => panic!(
            "the YAML the control plane prints (and stores) does not parse back: {e}\ninput: {text:?}\nprinted: {yaml}"
        ),
    }

    // What `/config` shows.
    serde_json::to_string(&set).expect("a policy set serializes to JSON");
});
