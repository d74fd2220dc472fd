"""Applies policy through PolicyService with Python grpcio: a second, independent gRPC stack.

Stubs are generated at run time from the same .proto files the Rust code uses.
Usage: apply_policy.py PROTO_DIR OUT_DIR SERVER YAML_FILE   (prints the ApplyResponse as JSON)
"""

import json
import sys

from grpc_tools import protoc


def main() -> int:
    proto_dir, out_dir, server, yaml_file = sys.argv[1:5]
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
    with grpc.insecure_channel(server) as channel:
        stub = rpc.PolicyServiceStub(channel)
        rsp = stub.Apply(pb.ApplyRequest(yaml=documents), timeout=10)
        listed = stub.List(pb.ListRequest(kind="TrafficPolicy"), timeout=10)
    print(json.dumps({
        "version": rsp.version,
        "changed": list(rsp.changed),
        "listed": [p.name for p in listed.traffic],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
