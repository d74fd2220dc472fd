"""Applies policy through PolicyService with Python grpcio: a second, independent gRPC stack.

Stubs are generated at run time from the same .proto files the Rust code uses.
Usage: apply_policy.py PROTO_DIR OUT_DIR SERVER YAML_FILE CA_FILE ADMIN_TOKEN_FILE
(prints the ApplyResponse as JSON). TLS verified against CA_FILE, with the admin token as
`authorization: Bearer`.
"""

import json
import sys

from grpc_tools import protoc


def main() -> int:
    proto_dir, out_dir, server, yaml_file, ca_file, token_file = sys.argv[1:7]
    files = ["trellis/v1/policy.proto", "trellis/v1/policy_service.proto"]
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files])
    if rc != 0:
        print(f"protoc failed with {rc}", file=sys.stderr)
        return 2
    sys.path.insert(0, out_dir)
    import grpc
    from trellis.v1 import policy_service_pb2 as pb
    from trellis.v1 import policy_service_pb2_grpc as rpc

    with open(yaml_file) as f:
        documents = f.read()
    with open(ca_file, "rb") as f:
        ca = f.read()
    with open(token_file) as f:
        token = f.read().strip()
    auth = [("authorization", f"Bearer {token}")]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    # The control plane's serving certificate names localhost (and 127.0.0.1).
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(server, credentials, options) as channel:
        stub = rpc.PolicyServiceStub(channel)
        try:
            stub.List(pb.ListRequest(kind="TrafficPolicy"), timeout=10)
            print("PolicyService answered a caller without the admin token", file=sys.stderr)
            return 3
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        rsp = stub.Apply(pb.ApplyRequest(yaml=documents), timeout=10, metadata=auth)
        listed = stub.List(pb.ListRequest(kind="TrafficPolicy"), timeout=10, metadata=auth)
    print(json.dumps({
        "version": rsp.version,
        "changed": list(rsp.changed),
        "listed": [p.name for p in listed.traffic],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
