"""What tests/scale and bench/scale.py look up about a running `serve --ray`: its replica processes."""

from __future__ import annotations

import subprocess


def replica_pids() -> list[int]:
    """The process ids of pocketlm's Serve replicas on this machine (Ray names them in their title)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:pocketlm:pocketlm-replica" in line]
