"""Batch inference on Ray Data: one pocketlm engine per actor of an actor pool.

Three ways in, one worker (pocketlm.batch.Worker: rows submitted to the engine's scheduler, batched
into shared steps, a bad row answered with its error):

- `PocketLMPredictor`, the callable class for `Dataset.map_batches`:

      ds = ray.data.read_json("prompts.jsonl")
      ds = ds.map_batches(PocketLMPredictor, fn_constructor_kwargs={"model": "smollm2"},
                          batch_size=16, batch_format="pyarrow", num_cpus=1,
                          compute=ray.data.ActorPoolStrategy(size=2))

  Rows keep their columns and get generated_text, finish_reason, num_input_tokens,
  num_generated_tokens and error (None for a row that went well).
- `PocketLMProcessorConfig` + `build_processor` (or `ray.data.llm.build_processor`, where the config
  is registered): the shape of Ray's vLLM and SGLang processors, so that moving a job to a CPU pool
  is one line.
- `run_batch_on_ray`, what `pocketlm batch --ray` runs: INPUT read and checked on the driver (a bad
  row never reaches the cluster, and never fails a read), the rows as a dataset of JSON jobs, the
  actor pool, and the answers streamed back to the driver's journal, each input row written once
  (a task that Ray retries after a lost actor or node answers its rows again: the later copy is
  dropped), then OUTPUT in input order (pocketlm.batch).

Each actor resolves the model as `run` does (a file on a shared filesystem, a known name, a store
reference): a GGUF or Hugging Face folder is converted once per node, under a lock, into that node's
cache (pocketlm.convert.cache); the bundle is mmapped, so actors on one node share its pages.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

from pocketlm import batch as _batch
from pocketlm.errors import InvalidInputError

RAY_EXTRA = "pip install 'pocketlm[ray]' (Ray Data and Ray Serve, ray[data,serve]==2.60.0)"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InvalidInputError(f"--ray needs Ray: {RAY_EXTRA}") from None
    return ray


def resolve_on_node(model: str, plain_http: bool = False, insecure: bool = False, trusted_keys=None) -> str:
    """The model as this node loads it: a path or a known name as is; a registry reference
    (`host[:port]/ns/name:tag`) not yet in this node's store is pulled into it first (once: the
    store's transfer lock serializes the actors of a node, and a second finds the blobs there),
    every blob checked against its digest and, under a trusted-keys policy (the job's, else this
    node's $POCKETLM_TRUSTED_KEYS), the signature verified before the name exists (pocketlm.store.pull)."""
    from pocketlm.hub import store_entry
    from pocketlm.store.reference import looks_like_reference, parse_reference

    if Path(model).expanduser().exists() or not looks_like_reference(model):
        return model
    if parse_reference(model).registry is None or store_entry(model) is not None:
        return model
    from pocketlm.signing import trusted_keys_from_env
    from pocketlm.store import pull

    pull(model, plain_http=plain_http, insecure=insecure, trusted_keys=trusted_keys_from_env(trusted_keys))
    return model


def node_models(models: list[str], engine_kwargs: dict | None) -> tuple[list[str], dict]:
    """The models as this node loads them (resolve_on_node, with the job's trusted keys and its
    `registry` options: {"plain_http": ..., "insecure": ...}), and the engine's options without them."""
    kwargs = dict(engine_kwargs or {})
    registry = kwargs.pop("registry", None) or {}
    return [resolve_on_node(m, trusted_keys=kwargs.get("trusted_keys"), **registry) for m in models], kwargs


def _engine(model: str, threads: int, engine_kwargs: dict | None):
    from pocketlm.engine import Engine

    (model,), kwargs = node_models([model], engine_kwargs)
    return Engine(model, threads=threads, **kwargs)


def _rows(batch) -> list[dict]:
    """A Ray batch as a list of row dicts (pyarrow, pandas or numpy format)."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    if hasattr(batch, "to_dict"):  # pandas
        return batch.to_dict("records")
    columns = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _plain(value):
    """numpy scalars and arrays (numpy batches) as Python values; NaN (pandas' missing number) as None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class PocketLMPredictor:
    """For `Dataset.map_batches` (an actor class: one engine per actor, loaded once). Rows with
    `messages` (a chat, through the model's template) or `prompt` (raw text), and optional sampling
    fields at the top level or in `sampling_params` (max_tokens, temperature, top_p, top_k, min_p,
    seed, stop, penalties, response_format), get generated_text, finish_reason, num_input_tokens,
    num_generated_tokens and error; with `embed=True`, rows with `input` get `embedding`.
    `defaults`: sampling values for rows that set none. Give the actor `num_cpus=threads`."""

    def __init__(self, model: str = "smollm2", threads: int = 1, engine_kwargs: dict | None = None,
                 defaults: dict | None = None, embed: bool = False):
        self.engine = _engine(model, threads, engine_kwargs)
        self.worker = _batch.Worker(self.engine, embed=embed)
        self.defaults = dict(defaults or {})
        self.embed = embed

    def answer(self, rows: list[dict]) -> list[dict]:
        """The output columns of each row, in order."""
        items = []
        for i, row in enumerate(rows):
            row = {"id": i, **{k: v for k, v in row.items() if k != "id"}}  # ids are the caller's business
            try:
                items.append((i, _batch.make_job(row, self.defaults, self.embed)))
            except _batch.RowError as e:
                items.append((i, e))
        outs = [out for _, out in self.worker.run(items)]
        for out in outs:
            del out["id"]
        return outs

    def __call__(self, batch):
        import pyarrow as pa

        rows = [_plain(r) for r in _rows(batch)]
        outs = self.answer(rows)
        return pa.Table.from_pylist([{**row, **out} for row, out in zip(rows, outs)])


class _JobPredictor:
    """`pocketlm batch --ray`'s actor: rows {_row, _job (JSON, checked on the driver)} -> {_row, _out
    (the output row as JSON)}. Two batches run at once on one actor (two calls, in two threads:
    the Worker and the engine's scheduler are thread-safe), so that the engine's batch is refilled
    from the next while the last rows of one finish."""

    def __init__(self, model: str, threads: int, engine_kwargs: dict | None, embed: bool, window: int | None):
        self.engine = _engine(model, threads, engine_kwargs)
        self.worker = _batch.Worker(self.engine, embed=embed, window=window)
        self.ready = time.time()  # when this actor's engine was loaded (the job's start-up, reported)

    def __call__(self, batch):
        import pyarrow as pa

        keys = batch.column("_row").to_pylist()
        jobs = [json.loads(j) for j in batch.column("_job").to_pylist()]
        outs = [json.dumps(out, ensure_ascii=False) for _, out in self.worker.run(zip(keys, jobs))]
        return pa.table({"_row": pa.array(keys, pa.int64()), "_out": pa.array(outs, pa.string()),
                         "_ready": pa.array([self.ready] * len(keys), pa.float64())})


def init_ray(address: str | None, quiet: bool = True):
    """Connects to the cluster at `address` ('auto': the one this machine belongs to, or $RAY_ADDRESS),
    or starts a local Ray for this process (None). An already initialised Ray is used as it is."""
    ray = import_ray()
    import logging

    if quiet:  # pocketlm's progress line tells the job's state; Ray's own logs are in /tmp/ray
        import warnings

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", module=r"ray\.data\..*")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": not quiet}
        if quiet:
            kwargs["logging_level"] = logging.WARNING
        if address is None:  # a new local Ray for this process, even where $RAY_ADDRESS names a cluster
            kwargs["include_dashboard"] = False
            address = "local"
        ray.init(address=address, **kwargs)
    return ray


def run_batch_on_ray(input_path, output, model: str = "smollm2", *, address: str | None = None, replicas: int = 1,
                     threads: int = 1, batch_size: int = 16, embed: bool = False, resume: bool = False,
                     defaults: dict | None = None, progress: bool = True, engine_kwargs: dict | None = None,
                     window: int | None = None) -> dict:
    """`pocketlm batch --ray`: the job of pocketlm.batch.run_batch, its rows answered by `replicas`
    actors of `threads` CPUs each (Ray Data's actor pool), on the cluster at `address`."""
    output = Path(output)
    _batch.input_format(output)
    if Path(model).exists():  # a path the driver sees: absolute, for actors with another working directory
        model = str(Path(model).resolve())
    with _batch.JobLock(output):
        plan = _batch.Plan(input_path, output, resume)
        init_ray(address)  # before the journal: a missing Ray or a wrong address leaves nothing behind
        return _run_plan_on_ray(plan, output, model, address=address, replicas=replicas, threads=threads,
                                batch_size=batch_size, embed=embed, defaults=defaults, progress=progress,
                                engine_kwargs=engine_kwargs, window=window)


def _run_plan_on_ray(plan, output: Path, model: str, *, address, replicas, threads, batch_size, embed, defaults,
                     progress, engine_kwargs, window) -> dict:
    columns = _batch.EMBED_COLUMNS if embed else _batch.GENERATE_COLUMNS
    started = time.time()
    ready: list[float] = []
    with _batch.Recorder(plan, output, progress) as recorder:
        items = []
        for key, job in _batch.jobs(plan.todo, defaults or {}, embed):
            if isinstance(job, _batch.RowError):  # answered here: nothing to run
                recorder.record(key, _batch.failed_row(getattr(job, "row_id", None), job, columns))
            else:
                items.append({"_row": key, "_job": json.dumps(job, ensure_ascii=False)})
        if items:
            for key, out, loaded in _run_on_ray(items, model, address=address, replicas=replicas, threads=threads,
                                                batch_size=batch_size, embed=embed, engine_kwargs=engine_kwargs,
                                                window=window):
                recorder.record(key, out)
                ready.append(loaded)
    missing = recorder.missing()
    if missing:  # Ray returned without them: keep the journal for --resume, say so
        raise _batch.IncompleteJobError(f"{len(missing)} rows got no answer (first: row {missing[0]}); the answers so "
                                        f"far are in {_batch.journal_path(output)}: rerun with --resume")
    summary = recorder.summary
    # Ray's start-up: from the job's start to the first engine loaded in an actor (actor processes,
    # imports, the model) - paid once per job, whatever its size
    summary["startup_seconds"] = max(0.0, min(ready) - started) if ready else None
    _batch.finish_output(output, columns)
    return summary


def _run_on_ray(items: list[dict], model: str, *, address, replicas: int, threads: int, batch_size: int,
                embed: bool, engine_kwargs: dict | None, window: int | None, actor=None):
    """(key, output row, when its actor's engine was loaded) of every item, as the actor pool answers
    them (retried copies included). `actor`: the actor class (default _JobPredictor; bench/scale.py
    runs the same pipeline with one that answers without an engine, to measure Ray's own cost)."""
    ray = init_ray(address)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # pocketlm's progress line says it per row
    context.enable_operator_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), math.ceil(len(items) / batch_size))))
    ds = ds.map_batches(
        actor or _JobPredictor, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
        fn_constructor_kwargs=dict(model=model, threads=threads, engine_kwargs=engine_kwargs, embed=embed,
                                   window=window),
        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=2,
                                           max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
        num_cpus=threads)
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for key, out, loaded in zip(table.column("_row").to_pylist(), table.column("_out").to_pylist(),
                                    table.column("_ready").to_pylist()):
            yield key, json.loads(out), loaded


# ---- ray.data.llm's shape ------------------------------------------------------------------------
def _llm_internals():
    try:
        from ray.llm._internal.batch.processor.base import Processor, ProcessorBuilder, ProcessorConfig
        from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF
    except ImportError:
        return None
    return Processor, ProcessorBuilder, ProcessorConfig, StatefulStage, StatefulStageUDF


def _define_processor():
    import_ray()
    internals = _llm_internals()
    if internals is None:
        raise InvalidInputError("this Ray has no ray.data.llm processors (Ray >= 2.44 does): "
                                "use PocketLMPredictor with Dataset.map_batches")
    Processor, ProcessorBuilder, ProcessorConfig, StatefulStage, StatefulStageUDF = internals
    from pydantic import Field

    class PocketLMProcessorConfig(ProcessorConfig):
        """A Ray Data LLM processor on pocketlm engines (CPU): as vLLMEngineProcessorConfig, with
        `model_source` a pocketlm model (a .plm, .gguf, Hugging Face folder, store reference or known
        name, resolved on each node), `concurrency` the actors (engines), `batch_size` the rows
        handed to one at a time, `threads` the CPUs (and threads) of each."""

        model_source: str = Field(default="smollm2", description="the model, as `pocketlm run` takes it")
        threads: int = Field(default=1, ge=1, le=64, description="threads (and Ray CPUs) per engine")
        engine_kwargs: dict[str, Any] = Field(default_factory=dict,
                                              description="pocketlm.Engine's options (max_context, kv_type, ...)")
        max_concurrent_batches: int = Field(default=2, ge=1,
                                            description="batches one engine works on at once (refills its batch)")
        should_continue_on_error: bool = Field(default=False, description=(
            "keep going past a row that fails: it gets '__inference_error__' (as Ray's processors)"))

    class PocketLMStageUDF(StatefulStageUDF):
        def __init__(self, data_column: str, expected_input_keys=None, model: str = "smollm2", threads: int = 1,
                     engine_kwargs: dict | None = None, should_continue_on_error: bool = False):
            super().__init__(data_column, expected_input_keys)
            self.predictor = PocketLMPredictor(model, threads=threads, engine_kwargs=engine_kwargs)
            self.continue_on_error = should_continue_on_error

        async def udf(self, rows: list[dict]):
            plain = [_plain(r) for r in rows]
            outs = await asyncio.to_thread(self.predictor.answer, plain)
            for row, out in zip(rows, outs):
                error = out.pop("error")
                if error is not None and not self.continue_on_error:
                    raise RuntimeError(f"pocketlm: a row failed: {error}")
                result = {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], **out}
                if error is not None:
                    result["__inference_error__"] = error
                yield result

    class PocketLMStage(StatefulStage):
        fn: Any = PocketLMStageUDF

    def build(config: PocketLMProcessorConfig, preprocess=None, postprocess=None, preprocess_map_kwargs=None,
              postprocess_map_kwargs=None):
        import ray.data

        pool = config.get_concurrency(autoscaling_enabled=False)
        stage = PocketLMStage(
            fn=PocketLMStageUDF,
            fn_constructor_kwargs=dict(model=config.model_source, threads=config.threads,
                                       engine_kwargs=config.engine_kwargs,
                                       should_continue_on_error=config.should_continue_on_error),
            map_batches_kwargs=dict(compute=ray.data.ActorPoolStrategy(
                **pool, max_tasks_in_flight_per_actor=2 * config.max_concurrent_batches,
                max_concurrent_calls_per_actor=config.max_concurrent_batches), num_cpus=config.threads))
        return Processor(config, [stage], preprocess=preprocess, postprocess=postprocess,
                         preprocess_map_kwargs=preprocess_map_kwargs, postprocess_map_kwargs=postprocess_map_kwargs)

    if PocketLMProcessorConfig.__name__ not in ProcessorBuilder._registry:  # (once, whatever reloads this module)
        ProcessorBuilder.register(PocketLMProcessorConfig, build)
    return PocketLMProcessorConfig, build


_PROCESSOR = None


def _processor():
    global _PROCESSOR
    if _PROCESSOR is None:
        _PROCESSOR = _define_processor()
    return _PROCESSOR


def __getattr__(name: str):
    if name == "PocketLMProcessorConfig":
        return _processor()[0]
    raise AttributeError(f"module 'pocketlm.ray.data' has no attribute {name!r}")


def build_processor(config, preprocess=None, postprocess=None, preprocess_map_kwargs=None,
                    postprocess_map_kwargs=None, builder_kwargs=None):
    """`ray.data.llm.build_processor` for a PocketLMProcessorConfig (the same signature; the config is
    registered with Ray's builder registry, so Ray's own function works too): a Processor to apply
    to a Dataset, `processor(ds)`."""
    _processor()
    from ray.data.llm import build_processor as ray_build

    return ray_build(config, preprocess=preprocess, postprocess=postprocess,
                     preprocess_map_kwargs=preprocess_map_kwargs, postprocess_map_kwargs=postprocess_map_kwargs,
                     builder_kwargs=builder_kwargs)
