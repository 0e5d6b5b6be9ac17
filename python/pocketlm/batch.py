"""`pocketlm batch`: many prompts from a file through one engine's batched steps, or through Ray.

A job reads INPUT (JSONL, or Parquet by extension), answers every row and writes OUTPUT (JSONL or
Parquet, by its extension), one row per input row, in input order:

    {"id": ..., "generated_text": ..., "finish_reason": ..., "num_input_tokens": ..., "num_generated_tokens": ...,
     "error": null}

A row has an `id` and either `messages` (a chat, through the model's template) or `prompt` (raw
text), optionally its own sampling fields (`max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`,
`seed`, `stop`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `response_format`),
at the top level or in `sampling_params` as Ray Data's LLM processors take them. With `embed`, a
row has `input` and gets `embedding`. A row that cannot be answered (no prompt, a field of the wrong
type, a prompt longer than the context, text that is not UTF-8) gets its `error` and the job goes
on: no row stops the job, none vanishes.

Durability: answers go to a journal, OUTPUT + ".partial" (JSONL, flushed per row), as they come; at
the end the journal becomes OUTPUT in one atomic rename. A killed job leaves its journal, and
`resume=True` (`--resume`) skips the ids already in OUTPUT or the journal. Each input row is written
once, by its row number, even when a retried Ray task answers it twice.

The rows run on the engine's scheduler: up to `window` requests are in flight, so the batch stays
full while the oldest finishes (pocketlm.scheduler); pocketlm.ray runs the same worker in Ray actors.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pocketlm.errors import InvalidInputError, PocketLMError, QueueFullError

GENERATE_COLUMNS = ("id", "generated_text", "finish_reason", "num_input_tokens", "num_generated_tokens", "error")
EMBED_COLUMNS = ("id", "embedding", "num_input_tokens", "error")
# Per-row sampling fields and the Python types each accepts (bool is refused where a number is meant).
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
    "min_p": (int, float), "seed": (int,), "stop": (str, list), "repetition_penalty": (int, float),
    "frequency_penalty": (int, float), "presence_penalty": (int, float), "response_format": (dict,),
}
MAX_ROW_TOKENS = 1 << 20  # max_tokens above this is refused (answers past the context shift it: bound it)


class RowError(PocketLMError):
    """What is wrong with one row: it becomes that row's `error`."""


class IncompleteJobError(PocketLMError):
    """The job ended with rows unanswered; their answers so far are in the journal (--resume)."""


# ---- reading -------------------------------------------------------------------------------------
def input_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise InvalidInputError(f"{path}: unknown format (give a .jsonl or .parquet file)")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InvalidInputError("Parquet files need pyarrow: pip install pyarrow (Ray Data installs it)") from None
    return pyarrow


def read_rows(path: str | os.PathLike) -> Iterator[dict | RowError]:
    """The rows of a JSONL or Parquet file, in order: a dict per row, or the RowError of a row that
    cannot be read (a line that is not JSON or not an object, bytes that are not UTF-8). Blank
    lines of a JSONL file are not rows."""
    if input_format(path) == "parquet":
        yield from _read_parquet(path)
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                if line.lstrip().startswith(b"[") and _json_array(line):
                    raise InvalidInputError(f"{path} holds a JSON array: give JSON Lines, one object per line")
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield RowError(f"line {number} is not UTF-8 (byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield RowError(f"line {number} is not JSON: {e.msg} at column {e.colno}")
                continue
            except RecursionError:
                yield RowError(f"line {number} is nested too deeply")
                continue
            yield row if isinstance(row, dict) else RowError(f"line {number} is a JSON {type(row).__name__}, "
                                                             "not an object")


def _json_array(line: bytes) -> bool:
    """Whether a first line is a JSON array's start ("[" alone, pretty-printed) or a one-line array of
    objects, rather than one bad row."""
    try:
        value = json.loads(line)
    except RecursionError:
        return False
    except ValueError:
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _read_parquet(path) -> Iterator[dict | RowError]:
    """Row by row; strings are read as bytes and decoded per value, so that one value that is not
    UTF-8 fails its row, not the file."""
    pa = _pyarrow()
    pq = pa.parquet
    f = pq.ParquetFile(path)
    batches = f.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:  # Arrow decodes some columns itself (dictionaries)
            raise InvalidInputError(f"{path} cannot be read: {e}") from None
        if batch is None:
            return
        columns = {}
        for name, column in zip(batch.schema.names, batch.columns):
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = column.view(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())
                columns[name] = ("text", column.to_pylist())
            else:
                try:
                    columns[name] = ("value", column.to_pylist())
                except (UnicodeDecodeError, ValueError, OverflowError):  # nested or dictionary strings: per value
                    columns[name] = ("each", column)
        for i in range(batch.num_rows):
            row, bad = {}, None
            for name, (kind, values) in columns.items():
                if kind == "each":
                    try:
                        value = values[i].as_py()
                    except (UnicodeDecodeError, ValueError, OverflowError) as e:
                        value, bad = None, bad or RowError(f"column {name!r} cannot be read: {e}")
                else:
                    value = values[i]
                if kind == "text" and value is not None:
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as e:
                        value, bad = None, bad or RowError(f"column {name!r} is not UTF-8 (byte {e.start})")
                row[name] = value
            if bad is not None:
                bad.row_id = _valid_id(row.get("id"))
                yield bad
            else:
                yield row


MAX_ID_CHARS = 1024


def _unicode_ok(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows "\\ud800"; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_id(value) -> Any:
    """An id as OUTPUT can carry it: a string (valid Unicode, at most 1024 characters) or an integer
    that fits 64 bits; anything else is no id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -2**63 <= value < 2**63 else None
    if isinstance(value, str):
        return value if len(value) <= MAX_ID_CHARS and _unicode_ok(value) else None
    return None


def row_id(row: dict | RowError) -> Any:
    """A row's id as given (None when it has none, an unusable one, or could not be read)."""
    if isinstance(row, RowError):
        return _valid_id(getattr(row, "row_id", None))
    return _valid_id(row.get("id"))


# ---- one row -------------------------------------------------------------------------------------
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def _check_messages(messages) -> list[dict]:
    """The messages with the keys a chat template reads (role, content, name, tool_calls,
    tool_call_id), each JSON; other keys are dropped."""
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content", ""), (str, type(None))):
            raise RowError(f"messages[{i}] must be an object with a string 'role' and a string 'content'")
        kept = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None}
        for k in ("name", "tool_call_id"):
            if k in kept and not isinstance(kept[k], str):
                raise RowError(f"messages[{i}].{k} must be a string")
        _check_json(kept, f"messages[{i}]")
        out.append(kept)
    return out


def _check_json(value, what: str) -> None:
    """Raises RowError unless `value` is plain JSON: strings of valid Unicode, finite numbers."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(f"{what} holds text that is not valid Unicode (a lone surrogate)") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise RowError(f"{what} is not plain JSON ({type(e).__name__})") from None


def _number_ok(name: str, value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, SAMPLING_FIELDS[name])


def _integral(value):
    """6.0 as 6 (pandas and Arrow write integer columns with nulls as floats)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def row_sampling(row: dict, defaults: dict) -> dict:
    """The sampling keyword arguments of a row: its own fields (top level, then `sampling_params`),
    else the job's defaults. Wrong types raise RowError; values out of range are refused by the
    engine (InvalidInputError), also per row."""
    out = {k: v for k, v in defaults.items() if v is not None}
    params = row.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        raise RowError("'sampling_params' must be an object")
    for source in (params or {}, row):
        for name in SAMPLING_FIELDS:
            if name not in source or source[name] is None:
                continue
            value = source[name]
            if isinstance(value, float) and math.isnan(value):
                continue  # a missing value of a numeric column
            if SAMPLING_FIELDS[name] == (int,):
                value = _integral(value)
            if not _number_ok(name, value):
                raise RowError(f"'{name}' must be {' or '.join(t.__name__ for t in SAMPLING_FIELDS[name])}, "
                               f"got {type(value).__name__} {str(value)[:40]!r}")
            if name == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
                raise RowError("'stop' must be a string or a list of strings")
            if name in ("stop", "response_format"):
                _check_json(value, f"'{name}'")
            out[name] = value
    if "max_tokens" in out and not 0 <= out["max_tokens"] <= MAX_ROW_TOKENS:
        raise RowError(f"'max_tokens' must be in [0, {MAX_ROW_TOKENS}], got {out['max_tokens']}")
    if "seed" in out and out["seed"] < 0:
        del out["seed"]  # -1: a random seed, as llama.cpp
    return out


def make_job(row: dict | RowError, defaults: dict, embed: bool = False) -> dict:
    """The checked, JSON-ready form of a row: {"id", "messages" | "prompt" | "input", "sampling"}.
    Raises RowError for what can be told without the model (a missing id or prompt, wrong types);
    what needs it (the prompt's length, values out of range) fails later, also per row."""
    if isinstance(row, RowError):
        raise row
    rid = row_id(row)
    if rid is None:
        raise RowError("the row has no usable 'id' (a string of at most 1024 characters, or a 64-bit integer)")
    if embed:
        if not isinstance(row.get("input"), str):
            raise RowError("an embedding row needs 'input', a string")
        _check_json(row["input"], "'input'")
        return {"id": rid, "input": row["input"]}
    job = {"id": rid, "sampling": row_sampling(row, defaults)}
    if row.get("messages") is not None:
        job["messages"] = _check_messages(row["messages"])
    elif row.get("prompt") is not None:
        if not isinstance(row["prompt"], str):
            raise RowError(f"'prompt' must be a string, got {type(row['prompt']).__name__}")
        if not row["prompt"]:
            raise RowError("'prompt' is empty")
        _check_json(row["prompt"], "'prompt'")
        job["prompt"] = row["prompt"]
    else:
        raise RowError("the row has neither 'messages' nor 'prompt'")
    return job


def failed_row(rid, error: BaseException, columns: tuple[str, ...]) -> dict:
    out = dict.fromkeys(columns)
    out["id"] = rid
    out["error"] = str(error) if isinstance(error, (PocketLMError, ValueError)) else \
        f"{type(error).__name__}: {error}"
    return out


class Worker:
    """Answers jobs (make_job) on one engine: `run(items)` yields (key, output row) for every (key,
    job or RowError) given, in the order given, with up to `window` generations in flight on the
    engine's scheduler (a queue behind a full batch keeps it full while the oldest finishes)."""

    def __init__(self, engine, embed: bool = False, window: int | None = None):
        self.engine = engine
        self.embed = embed
        # in flight: a full batch and as many queued behind it, within the engine's queue
        self.window = max(1, min(window or 2 * engine.max_batch, engine.max_batch + engine.max_queue))
        self.columns = EMBED_COLUMNS if embed else GENERATE_COLUMNS

    def _prompt(self, job: dict) -> list[int]:
        """A generation job's prompt as token ids (its chat through the model's template)."""
        engine = self.engine
        if "messages" in job:
            text = engine.apply_chat_template(job["messages"], add_generation_prompt=True)
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = engine.tokenizer.encode(job["prompt"], add_special_tokens=True)
        if len(ids) >= engine.max_context:
            raise RowError(f"the prompt is {len(ids)} tokens; the context holds {engine.max_context} "
                           "(prompt and answer)")
        return ids

    def _answer(self, rid, request, n_input: int) -> dict:
        try:
            text = request.result()
        except Exception as e:  # noqa: BLE001 - the request failed alone: its row says why
            return failed_row(rid, e, self.columns)
        out = dict.fromkeys(self.columns)
        out.update(id=rid, generated_text=text, finish_reason=request.finish_reason, num_input_tokens=n_input,
                   num_generated_tokens=request.stats.generated_tokens)
        return out

    def _embed(self, job: dict) -> dict:
        ids = self.engine.embedding_ids(job["input"])
        vector = self.engine.embed([ids])[0]
        out = dict.fromkeys(self.columns)
        out.update(id=job["id"], embedding=[float(x) for x in vector], num_input_tokens=len(ids))
        return out

    def run(self, items: Iterable[tuple[Any, dict | RowError]]) -> Iterator[tuple[Any, dict]]:
        from collections import deque

        pending: deque = deque()  # (key, output row) or (key, id, request, prompt tokens), in input order
        in_flight = 0
        for key, job in items:
            if isinstance(job, RowError):
                pending.append((key, failed_row(getattr(job, "row_id", None), job, self.columns)))
            elif self.embed:
                try:
                    pending.append((key, self._embed(job)))
                except Exception as e:  # noqa: BLE001 - this row's error
                    pending.append((key, failed_row(job["id"], e, self.columns)))
            else:
                while in_flight >= self.window:
                    item = pending.popleft()
                    in_flight -= len(item) == 4
                    yield self._settle(item)
                try:
                    ids = self._prompt(job)
                except Exception as e:  # noqa: BLE001 - this row's error
                    pending.append((key, failed_row(job["id"], e, self.columns)))
                    ids = None
                wait = 0.01
                while ids is not None:
                    try:
                        request = self.engine.submit(ids, **job["sampling"])
                        pending.append((key, job["id"], request, len(ids)))
                        in_flight += 1
                    except QueueFullError as e:
                        if self.engine.max_queue == 0:  # an engine that queues nothing: no room will come
                            pending.append((key, failed_row(job["id"], e, self.columns)))
                        elif any(len(item) == 4 for item in pending):  # make room: finish our oldest
                            while pending:
                                item = pending.popleft()
                                in_flight -= len(item) == 4
                                yield self._settle(item)
                                if len(item) == 4:
                                    break
                            continue
                        else:  # the queue is another batch's on this engine: wait for it
                            time.sleep(wait)
                            wait = min(2 * wait, 0.5)
                            continue
                    except Exception as e:  # noqa: BLE001 - this row's error
                        pending.append((key, failed_row(job["id"], e, self.columns)))
                    break
            while pending and len(pending[0]) == 2:
                yield pending.popleft()
        while pending:
            yield self._settle(pending.popleft())

    def _settle(self, item):
        if len(item) == 2:
            return item
        key, rid, request, n_input = item
        return key, self._answer(rid, request, n_input)


def jobs(todo: Iterable[tuple[int, dict | RowError]], defaults: dict,
         embed: bool) -> Iterator[tuple[int, dict | RowError]]:
    """(key, job) for each (key, row), or (key, RowError) carrying the row's id."""
    for key, row in todo:
        try:
            yield key, make_job(row, defaults, embed)
        except RowError as e:
            e.row_id = row_id(row)
            yield key, e


# ---- writing -------------------------------------------------------------------------------------
def journal_path(output: str | os.PathLike) -> Path:
    return Path(str(output) + ".partial")


def _read_output(path: Path) -> list[dict]:
    """The rows of a finished OUTPUT file (JSONL or Parquet)."""
    if input_format(path) == "parquet":
        return _pyarrow().parquet.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_journal(path: Path) -> list[dict]:
    """The journal's complete lines (a killed job may have left half of its last one)."""
    rows = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


class Journal:
    """OUTPUT's rows while the job runs: appended and flushed one per line, each input row once."""

    def __init__(self, output: Path, keep: list[dict]):
        from pocketlm.bundle.atomic import Sink, replacing

        self.path = journal_path(output)
        self.written: set[int] = set()
        with replacing(str(self.path)) as tmp, Sink(str(self.path), tmp) as f:  # what is kept, rewritten whole
            for row in keep:
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                if isinstance(row.get("_row"), int):
                    self.written.add(row["_row"])
            f.sync()
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, key: int, row: dict) -> bool:
        """Appends a row for input row `key`; False (nothing written) if it has one already."""
        if key in self.written:
            return False
        self.written.add(key)
        self.file.write(json.dumps({**row, "_row": key}, ensure_ascii=False) + "\n")
        self.file.flush()
        return True

    def close(self) -> None:
        self.file.close()


def finish_output(output: Path, columns: tuple[str, ...]) -> int:
    """Turns the journal into OUTPUT (input order, the columns only) by an atomic rename; removes
    the journal. Returns the rows written."""
    from pocketlm.bundle.atomic import Sink, replacing

    journal = journal_path(output)
    rows = _read_journal(journal)
    rows.sort(key=lambda r: r.get("_row", math.inf))
    rows = [{c: r.get(c) for c in columns} for r in rows]
    with replacing(str(output)) as tmp:  # renamed onto OUTPUT (durably) only once written and synced
        if input_format(output) == "parquet":
            pa = _pyarrow()
            try:
                table = pa.Table.from_pylist(rows)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # ids of mixed types: as strings
                table = pa.Table.from_pylist([{**r, "id": None if r["id"] is None else str(r["id"])} for r in rows])
            pa.parquet.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with Sink(str(output), tmp) as f:
                for i in range(0, len(rows), 4096):  # (written in runs of lines, not a call a row)
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[i:i + 4096]).encode())
                f.sync()
    journal.unlink()
    return len(rows)


# ---- progress ------------------------------------------------------------------------------------
class Progress:
    """rows done/total, failures, generated tokens/s and ETA: one redrawn line on a terminal, a line
    every 10 % elsewhere, and a summary at the end."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.failed, self.tokens = total, 0, 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._drawn = 0.0
        self._decile = 0

    def row(self, out: dict) -> None:
        self.done += 1
        self.failed += out.get("error") is not None
        self.tokens += out.get("num_generated_tokens") or 0
        self._draw()

    def line(self) -> str:
        from pocketlm.convert.progress import _clock

        elapsed = max(time.monotonic() - self.start, 1e-9)
        eta = _clock(elapsed * (self.total - self.done) / self.done) if self.done else "--:--"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"rows {self.done}/{self.total}{failed}  {self.tokens / elapsed:.1f} tok/s  "
                f"elapsed {_clock(elapsed)}  ETA {eta}")

    def _draw(self) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self._drawn >= 0.1 or self.done == self.total:
                self._drawn = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
        elif self.total and self.done * 10 // self.total > self._decile:
            self._decile = self.done * 10 // self.total
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


# ---- the job -------------------------------------------------------------------------------------
class Plan:
    """What a job has to do: the input's rows by row number, and which are done already (resume).

    Resumption matches by id and occurrence: the k-th done row with an id is the answer of the k-th
    input row with that id (ids should be unique; repeated ones are still each answered once). Rows
    done before whose id is no longer in INPUT are kept, after the others; done rows without an id
    (they failed) are answered again. A Parquet OUTPUT holds ids of mixed types as strings, so
    against one, ids compare as text."""

    def __init__(self, input_path, output: Path, resume: bool):
        if Path(input_path).resolve() == output.resolve():
            raise InvalidInputError(f"{output}: OUTPUT must not be INPUT")
        self.rows: list[dict | RowError] = list(read_rows(input_path))
        journal = journal_path(output)
        if journal.exists() and not resume:
            raise InvalidInputError(f"{journal} holds the answers of an interrupted job: add --resume to go on "
                                    "with it, or delete it to start again")
        done: list[dict] = []
        if resume:  # the journal starts as a copy of what OUTPUT held, so it alone, when there is one
            if journal.exists():
                done = _read_journal(journal)
            elif output.exists():
                done = _read_output(output)
        key = (lambda rid: json.dumps(str(rid))) if input_format(output) == "parquet" else _key
        positions: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            rid = row_id(row)
            if rid is not None:
                positions.setdefault(key(rid), []).append(i)
        answered: set[int] = set()
        self.keep: list[dict] = []
        later: list[tuple[str, dict]] = []
        for row in done:  # a journal row names its input row: kept there if that row still has its id
            rid = row.get("id") if isinstance(row, dict) else None
            if rid is None:
                continue
            at = row.get("_row")
            if isinstance(at, int) and not isinstance(at, bool) and 0 <= at < len(self.rows) and \
                    at not in answered and row_id(self.rows[at]) is not None and key(row_id(self.rows[at])) == key(rid):
                answered.add(at)
                self.keep.append({**row, "_row": at})
            else:
                later.append((key(rid), row))
        for k, row in later:  # the others by id: the first input row with that id not answered yet
            at = next((i for i in positions.get(k, []) if i not in answered), None)
            if at is None:
                at = len(self.rows) + len(self.keep)  # an id no longer in INPUT: kept, at the end
            answered.add(at)
            self.keep.append({**row, "_row": at})
        self.todo = [(i, row) for i, row in enumerate(self.rows) if i not in answered]


def _key(rid) -> str:
    return json.dumps(rid)  # 1 and "1" are different ids


class JobLock:
    """One job per OUTPUT at a time: an exclusive lock on OUTPUT.partial.lock for the job's life (a
    second `--resume` of a job still running is refused, not interleaved)."""

    def __init__(self, output: Path):
        import fcntl

        self.path = Path(str(journal_path(output)) + ".lock")
        while True:
            self.file = open(self.path, "a")
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.close()
                raise InvalidInputError(f"another job is writing {output} (it holds {self.path})") from None
            try:  # the file locked is still the one at the path (a job ending unlinks it)
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        self.file.close()


def run_batch(input_path, output, model=None, *, engine=None, embed: bool = False, resume: bool = False,
              defaults: dict | None = None, progress: bool = True, window: int | None = None,
              **engine_kwargs) -> dict:
    """Runs a batch job in this process (see the module's doc); returns a summary dict (rows,
    failed, skipped, generated tokens, seconds)."""
    output = Path(output)
    input_format(output)
    with JobLock(output):
        plan = Plan(input_path, output, resume)
        if engine is None:
            from pocketlm.engine import Engine

            engine = Engine(model, **engine_kwargs)
        return _run_plan(plan, output, engine, embed, defaults, progress, window)


class Recorder:
    """A job's bookkeeping while it runs, whichever path answers its rows: the journal (each input row
    once), the progress line and the summary (rows, done before, failed, generated tokens, seconds).
    Use it as a context manager; `missing()` lists the rows to do that got no answer."""

    def __init__(self, plan: Plan, output: Path, progress: bool):
        self.plan = plan
        self.journal = Journal(output, plan.keep)
        self.bar = Progress(len(plan.todo)) if progress else None
        self.summary = {"rows": len(plan.rows), "skipped": len(plan.rows) - len(plan.todo), "failed": 0,
                        "generated_tokens": 0}
        self.t0 = time.perf_counter()

    def record(self, key: int, out: dict) -> None:
        if self.journal.write(key, out):
            self.summary["failed"] += out.get("error") is not None
            self.summary["generated_tokens"] += out.get("num_generated_tokens") or 0
            if self.bar is not None:
                self.bar.row(out)

    def missing(self) -> list[int]:
        return [key for key, _ in self.plan.todo if key not in self.journal.written]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.journal.close()
        if self.bar is not None:
            self.bar.finish()
        self.summary["seconds"] = time.perf_counter() - self.t0


def _run_plan(plan: Plan, output: Path, engine, embed, defaults, progress, window) -> dict:
    worker = Worker(engine, embed=embed, window=window)
    with Recorder(plan, output, progress) as recorder:
        for key, out in worker.run(jobs(plan.todo, defaults or {}, embed)):
            recorder.record(key, out)
    finish_output(output, worker.columns)
    return recorder.summary
