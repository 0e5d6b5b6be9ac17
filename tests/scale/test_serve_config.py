"""The Serve application without a cluster: the example config file validates against Ray Serve's
own schema and builds (through Ray's builder call) into the two deployments it names; the routing
key and the prefix-affinity choice."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="Ray is the optional extra pocketlm[ray] (scripts/test.sh installs it)")
yaml = pytest.importorskip("yaml")

CONFIG = Path(__file__).resolve().parents[2] / "docs" / "examples" / "pocketlm-serve.yaml"


def test_example_config_validates_and_builds():
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    built = build_app(call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args),
                      name=app.name)
    deployments = {d.name: d for d in built.deployments}
    assert built.ingress_deployment_name == "pocketlm-ingress"
    replica = deployments["pocketlm-replica"]
    assert replica.num_replicas == 2 and replica.ray_actor_options["num_cpus"] == 1
    router = replica._deployment_config.request_router_config
    assert router.request_router_class.endswith("PrefixAffinityRouter")
    assert router.request_router_kwargs == {"imbalance": 4}
    assert deployments["pocketlm-ingress"].ray_actor_options["num_cpus"] == 0


def test_autoscale_argument():
    from ray.serve._private.build_app import build_app

    from pocketlm.ray.serve import build_app as pocketlm_app

    built = build_app(pocketlm_app({"model": "smollm2", "autoscale": "1:3", "threads": "2"}), name="x")
    replica = next(d for d in built.deployments if d.name == "pocketlm-replica")
    scaling = replica._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert replica.ray_actor_options["num_cpus"] == 2


def test_routing_key_blocks():
    import json

    from pocketlm.ray.serve import BLOCK_CHARS, routing_key

    def key(messages, model="m"):
        return routing_key("/v1/chat/completions", json.dumps({"model": model, "messages": messages}).encode())

    system = {"role": "system", "content": "s" * (2 * BLOCK_CHARS)}
    turn1 = [system, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    k1, k2 = key(turn1), key(turn2)
    assert k1[0] == k2[0]  # the same first block: the same replica for a new prefix
    assert k1[-1] in k2 and k2[-1] not in k1  # the next turn starts with the whole of the last one
    short1 = [{"role": "user", "content": "Hi"}]  # shorter than a block
    short2 = [*short1, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert key(short1)[-1] in key(short2)
    assert key(turn1, model="n")[0] != k1[0]
    assert routing_key("/v1/completions", b'{"prompt": "abc"}') and routing_key("/x", b"not json") == []
    assert routing_key("/v1/embeddings", b'{"input": "abc"}') == []
    assert routing_key("/v1/chat/completions", b'{"model": null, "prompt": "abc"}')  # no model: still a key
    deep = b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert routing_key("/v1/chat/completions", deep) == []  # hostile: routed anywhere, refused by the app
    huge = key([{"role": "user", "content": "x" * 100_000}])
    assert len(huge) <= 2 + 16384 // BLOCK_CHARS  # 16 KiB of text hashed at most
    many = key([{"role": "user", "content": ""}] * 5000)
    assert len(many) <= 2 + 16384 // BLOCK_CHARS + 32  # the last 32 message boundaries at most
    import hashlib

    text = "m\x00<user>Hi"  # the incremental hashes are the prefixes' own
    assert key([{"role": "user", "content": "Hi"}], model="m")[-1] == \
        hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def test_affinity_prefers_the_replica_that_answered_the_prefix():
    import collections

    from pocketlm.ray.serve import PrefixAffinityRouter

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # the policy alone, without Serve's machinery
    router.initialize_state(imbalance=4, memory=3)
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"r{i}")) for i in range(4)]
    # a new prefix: rendezvous hashing, the same choice whatever the candidates' order
    chosen = router.preferred(replicas, ["a"])
    assert router.preferred(list(reversed(replicas)), ["a"]) is chosen
    picks = collections.Counter(router.preferred(replicas, [f"k{i}"]).replica_id.unique_id for i in range(400))
    assert len(picks) == 4 and min(picks.values()) > 60  # spread over all replicas
    # a prefix answered before: its replica, by the longest prefix it knows (the first hash is the anchor)
    ids = iter(range(1000))

    def routed(key, replica):
        request = SimpleNamespace(kwargs={"routing_key": key}, metadata=SimpleNamespace(internal_request_id=next(ids)))
        router.on_request_routed(request, replica.replica_id, None)

    routed(["a", "x", "y"], replicas[2])
    assert router.preferred(replicas, ["a", "x", "y", "z"]) is replicas[2]
    assert router.preferred(replicas[:2] + replicas[3:], ["a", "x", "y", "z"]) is not replicas[2]  # gone: hashed
    routed(["b", "p", "q"], replicas[1])
    assert len(router._owner) == 3 and "x" not in router._owner  # least recently used forgotten


def test_affinity_gives_way_to_the_least_loaded():
    import asyncio

    from pocketlm.ray.serve import PrefixAffinityRouter

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    router.initialize_state(imbalance=4)
    router._replica_queue_len_cache = SimpleNamespace(get=lambda replica_id: None)  # nothing probed yet
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=f"r{i}")) for i in range(2)]
    key = ["anchor", "shared-system-prompt"]
    pending = SimpleNamespace(kwargs={"routing_key": key})
    best = asyncio.run(router.choose_replicas(replicas, pending))[0][0]
    sent = []
    for i in range(5):
        request = SimpleNamespace(kwargs={"routing_key": key}, metadata=SimpleNamespace(internal_request_id=i))
        router.on_request_routed(request, best.replica_id, None)
        sent.append(i)
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    assert ranks == [replicas]  # 5 in flight there, 0 on the other: the least loaded of all
    for i in sent[:3]:
        router.on_request_completed(best.replica_id, i)
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    assert ranks[0] == [best]  # back under the bound: affinity again


def test_flags_from_serve_run_strings():
    from pocketlm.ray.serve import _bool

    assert _bool({"insecure": "false"}, "insecure") is False and _bool({"insecure": "true"}, "insecure") is True
    assert _bool({}, "plain_http") is False and _bool({"plain_http": True}, "plain_http") is True
    with pytest.raises(ValueError):
        _bool({"insecure": "maybe"}, "insecure")


def _ingress_answer(ingress, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, dict]:
    """One request through the ingress's ASGI app, no replica behind it: (status, headers, JSON body)."""
    import asyncio
    import json

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()], "client": ("127.0.0.1", 1)}
    sent, chunks = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(ingress.__serve_build_asgi_app__()(scope, receive, send))
    start, payload = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(payload)


def test_ingress_refuses_as_the_server_does():
    """The ingress answers a missing API key and an oversized body itself, before any replica: the
    status, headers and error shapes `pocketlm serve` gives (OpenAI's; Ollama's under /api/)."""
    from pocketlm.ray.serve import PocketLMIngress

    ingress = PocketLMIngress(replica=None, max_body_bytes=64, api_key="secret")
    status, headers, body = _ingress_answer(ingress, "/v1/chat/completions", {})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    status, _, body = _ingress_answer(ingress, "/api/chat", {"authorization": "Bearer wrong"})
    assert status == 401 and isinstance(body["error"], str) and "API key" in body["error"]
    status, _, body = _ingress_answer(ingress, "/v1/completions", {"authorization": "Bearer secret",
                                                                    "content-length": "65"})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, _, body = _ingress_answer(ingress, "/v1/completions", {"authorization": "Bearer secret"}, b"x" * 65)
    assert status == 413 and body["error"]["code"] == "request_too_large"
