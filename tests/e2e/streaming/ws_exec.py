"""WebSocket exec through the kubernetes Python client (an independent
client): argv = API server URL, pod, container. Prints one JSON object
per case on stdout."""

import json
import sys

from kubernetes import client
from kubernetes.stream import stream

config = client.Configuration()
config.host = sys.argv[1]
api = client.CoreV1Api(client.ApiClient(config))
pod, container = sys.argv[2], sys.argv[3]

# Output only, the client's simplest form (preloaded).
out = stream(api.connect_get_namespaced_pod_exec, pod, "default",
             container=container, command=["echo", "from python"],
             stderr=True, stdin=False, stdout=True, tty=False)
print(json.dumps({"case": "preloaded", "stdout": out}), flush=True)

# stdin, its end (v5's close signal), stdout, stderr and the exit code.
resp = stream(api.connect_get_namespaced_pod_exec, pod, "default",
              container=container,
              command=["sh", "-c", "cat; echo done >&2; exit 5"],
              stderr=True, stdin=True, stdout=True, tty=False,
              _preload_content=False)
resp.write_stdin("hello from python\n")
resp.close_channel(0)
stdout, stderr = "", ""
while resp.is_open():
    resp.update(timeout=5)
    if resp.peek_stdout():
        stdout += resp.read_stdout()
    if resp.peek_stderr():
        stderr += resp.read_stderr()
stdout += resp.read_stdout() if resp.peek_stdout() else ""
stderr += resp.read_stderr() if resp.peek_stderr() else ""
print(json.dumps({"case": "interactive", "protocol": resp.subprotocol,
                  "stdout": stdout, "stderr": stderr,
                  "code": resp.returncode}), flush=True)
