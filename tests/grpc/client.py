#!/usr/bin/env python3
"""An independent hands.v1 client: Python grpcio, stubs generated from proto/ at
run time (grpc_tools.protoc), driving a worker's debug listener through open
session -> every tool -> close.

    client.py HOST:PORT

Exits 0 and prints a JSON summary when every step gave the expected result.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def stubs():
    out = tempfile.mkdtemp(prefix="hands-stubs-")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
         f"--python_out={out}", f"--grpc_python_out={out}", "hands/v1/sandbox.proto"],
        check=True,
    )
    sys.path.insert(0, out)
    from hands.v1 import sandbox_pb2, sandbox_pb2_grpc  # noqa: E402
    return sandbox_pb2, sandbox_pb2_grpc


def main() -> None:
    import grpc

    pb, rpc = stubs()
    stub = rpc.SandboxStub(grpc.insecure_channel(sys.argv[1]))
    info = stub.Info(pb.InfoRequest(), timeout=10)
    assert "hands.v1" in info.protocols, info
    assert any(e.name == "default" for e in info.environments), info

    sid = "py:session-1"
    r = stub.OpenSession(pb.OpenSessionRequest(session_id=sid, environment="default"), timeout=30)
    assert r.created, r

    def call(n, tool, inp, stream_output=False):
        events = list(stub.Call(pb.CallRequest(session_id=sid, call_id=f"py-{n}", tool=tool,
                                               input_json=json.dumps(inp), stream_output=stream_output),
                                timeout=60))
        assert events[0].WhichOneof("event") == "started", events
        fin = events[-1].finished
        texts = "".join(b.text for b in fin.content if b.WhichOneof("block") == "text")
        outputs = b"".join(e.output.data for e in events if e.WhichOneof("event") == "output")
        return texts, fin.is_error, outputs

    results = {}
    results["bash"] = call(1, "bash", {"command": "echo hello from $(id -u)"}, stream_output=True)
    assert results["bash"][0].startswith("hello from ") and not results["bash"][1], results["bash"]
    assert results["bash"][2].startswith(b"hello from "), results["bash"]
    results["write"] = call(2, "write", {"file_path": "notes/a.txt", "content": "alpha\nbeta\n"})
    assert results["write"][:2] == ("wrote 11 bytes to notes/a.txt", False), results["write"]
    results["read"] = call(3, "read", {"file_path": "notes/a.txt", "view_range": [2, 2]})
    assert results["read"][:2] == ("beta", False), results["read"]
    results["edit"] = call(4, "edit", {"file_path": "notes/a.txt", "old_string": "beta", "new_string": "gamma"})
    assert results["edit"][:2] == ("edited notes/a.txt (1 replacement(s))", False), results["edit"]
    results["glob"] = call(5, "glob", {"pattern": "**/*.txt"})
    assert results["glob"][:2] == ("/workspace/notes/a.txt", False), results["glob"]
    results["grep"] = call(6, "grep", {"pattern": "gam+a"})
    assert results["grep"][:2] == ("/workspace/notes/a.txt:2:gamma\n", False), results["grep"]
    results["error"] = call(7, "read", {"file_path": "../etc/passwd"})
    assert results["error"][1] and "outside" in results["error"][0], results["error"]

    try:
        stub.Call(pb.CallRequest(session_id="py:nope", call_id="x", tool="bash", input_json="{}"), timeout=10).next()
        raise AssertionError("a call in an unknown session must fail")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        reason = dict(e.trailing_metadata() or ()).get("hands-reason")
        assert reason == "SESSION_NOT_FOUND", reason

    assert stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10).closed
    print(json.dumps({k: [v[0], v[1]] for k, v in results.items()}))


if __name__ == "__main__":
    main()
