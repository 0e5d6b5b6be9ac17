"""Runs on the emulated aarch64 Python (scripts/test-arm.sh --e2e): greedy tokens for each job of
the JSON list in argv[1] ({"bundle", "ids", "n", "kv_type", "kernels", optional "sparse_layout"}),
printed as one JSON list.
pocketlm is the aarch64 build in $PLM_ARM_PKG; PLM_KERNELS is set per job before the extension loads,
so each job runs in its own process (test_aarch64.py starts one per job)."""

import json
import os
import sys

sys.path.insert(0, os.environ["PLM_ARM_PKG"])
job = json.loads(sys.argv[1])
os.environ["PLM_KERNELS"] = job["kernels"]

from pocketlm import Engine, _core  # noqa: E402

engine = Engine(job["bundle"], threads=2, max_context=128, kv_type=job["kv_type"],
                sparse_layout=job.get("sparse_layout", "auto"))
session = engine.create_session()
if "chat" in job:
    "".join(session.chat(job["chat"], temperature=0, max_tokens=job["n"]))
    ids = session.last_text_ids[-session.last_stats.generated_tokens:]
else:
    list(session.generate(job["ids"], max_tokens=job["n"], temperature=0))
    ids = session.last_text_ids[-job["n"]:]
print(json.dumps({"ids": ids, "kernels": _core.kernels.best(), "expanded": engine.sparse_expanded}))
