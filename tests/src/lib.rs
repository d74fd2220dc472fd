//! End-to-end test support for Trellis: the pod harness (network namespaces joined by a bridge,
//! real `trellis-proxy init` rules, real sidecars running as their own UID) and the generated
//! code of the small gRPC service the test app serves.

pub mod harness;

pub mod echo {
    tonic::include_proto!("trellis.test.echo");
}
