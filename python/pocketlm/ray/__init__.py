"""pocketlm on Ray: batch jobs on Ray Data and a replicated server on Ray Serve (docs/scale.md).

- `PocketLMPredictor`: the callable class for `Dataset.map_batches` (one engine per actor).
- `PocketLMProcessorConfig` and `build_processor(config, preprocess=..., postprocess=...)`: the
  shape of `ray.data.llm`'s processors (rows with `messages` or `prompt` and `sampling_params` get
  `generated_text`); the config is also registered with `ray.data.llm.build_processor` itself.
- `run_batch_on_ray`: what `pocketlm batch --ray` runs.
- `app` / `build_app`: the Serve application (`serve run pocketlm.ray:app model=...`), what
  `pocketlm serve --ray` deploys.

Ray is an optional extra (`pip install 'pocketlm[ray]'`); importing this package without it says so.
Everything here is imported on first use, so `pocketlm.ray.data` does not load Ray Serve."""

from __future__ import annotations

_DATA = ("PocketLMPredictor", "PocketLMProcessorConfig", "build_processor", "run_batch_on_ray")
_SERVE = ("app", "build_app", "deploy", "PocketLMIngress", "PocketLMReplica", "PrefixAffinityRouter")


def __getattr__(name: str):
    if name in _DATA:
        from pocketlm.ray import data

        return getattr(data, name)
    if name in _SERVE:
        from pocketlm.ray import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'pocketlm.ray' has no attribute {name!r}")


__all__ = [*_DATA, *_SERVE]
