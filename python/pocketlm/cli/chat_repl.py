"""`pocketlm chat`'s interactive loop: line editing and history (GNU readline at a terminal, the history
kept across runs), multi-line input, slash commands, Ctrl-C to stop an answer, and a conversation that
outlives the context (the session shifts it, keeping the system prompt; one dim line says so).

    >>> a question                      one turn
    >>> \"\"\"                              a block: every line up to one that ends with \"\"\" is one turn
    ... several lines
    ... \"\"\"
    >>> first line \\                    a line that ends with a backslash goes on on the next
    ... second line

Slash commands (Ollama's and llama.cpp's users know most of them): /help, /clear, /system TEXT,
/set PARAM VALUE (/set alone lists them), /stats, /save FILE, /load FILE, /bye. Without a terminal,
standard input is read the same way (a script of turns and commands), strictly as UTF-8.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pocketlm.errors import InvalidInputError, PocketLMError

PROMPT, MORE = ">>> ", "... "
HISTORY_LENGTH = 1000

HELP = """Commands:
  /set PARAM VALUE   set a sampling option: temperature, top_k, top_p, min_p, repeat_penalty,
                     frequency_penalty, presence_penalty, seed, max_tokens (/set alone: the values)
  /system TEXT       set the system prompt (the conversation stays; it is read again)
  /clear             forget the conversation (the system prompt stays)
  /stats             the last answer's speed and the context's use
  /save FILE         save the conversation and its KV cache; /load FILE resumes one
  /bye               exit (also /exit, /quit, Ctrl-D)
  /help, /?          this list
Input: \"\"\" starts and ends a block of several lines; a line ending with \\ goes on on the next.
Ctrl-C stops an answer; at the prompt it clears the line."""

def history_path() -> Path:
    """Where the chat history lives across runs: $POCKETLM_HISTORY, else $XDG_STATE_HOME/pocketlm/chat_history
    (~/.local/state/pocketlm/chat_history)."""
    if os.environ.get("POCKETLM_HISTORY"):
        return Path(os.environ["POCKETLM_HISTORY"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "pocketlm" / "chat_history"


class LineReader:
    """Lines of the user's input: through readline at a terminal (editing, history), else standard
    input decoded strictly. Raises EOFError at the end, KeyboardInterrupt on Ctrl-C at a terminal."""

    def __init__(self, interactive: bool, decode: Callable[[bytes, str], str], check: Callable[[str, str], str]):
        self.interactive = interactive
        self._decode, self._check = decode, check
        self._n = 0
        self._history: Path | None = None
        if interactive:
            try:
                import readline
            except ImportError:  # (no GNU readline: plain input())
                return
            readline.parse_and_bind("set enable-bracketed-paste on")  # a paste is one edit, not one turn per line
            readline.set_history_length(HISTORY_LENGTH)
            path = history_path()
            try:
                readline.read_history_file(path)
            except OSError:
                pass
            self._history = path

    def read(self, prompt: str) -> str:
        self._n += 1
        if self.interactive:
            return self._check(input(prompt), f"line {self._n} of the input")
        raw = sys.stdin.buffer.readline()
        if not raw:
            raise EOFError
        return self._decode(raw, f"line {self._n} of standard input").rstrip("\r\n")

    def save_history(self) -> None:
        if self._history is None:
            return
        import readline

        try:
            self._history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self._history)
        except OSError as e:  # a read-only home: the chat goes on without it
            print(f"pocketlm: could not save the chat history to {self._history}: {e.strerror}", file=sys.stderr)


def read_turn(reader: LineReader) -> str:
    """One turn of input: a line, a \"\"\" block, or lines joined by a trailing backslash."""
    line = reader.read(PROMPT)
    if line.lstrip().startswith('"""'):
        text = line.lstrip()[3:]
        if text.rstrip().endswith('"""') and text.strip():
            return text.rstrip()[:-3]
        parts = [text] if text else []
        while True:
            try:
                more = reader.read(MORE)
            except EOFError:  # the input ended inside the block: it is the last turn
                if not "".join(parts).strip():
                    raise
                return "\n".join(parts).strip("\n")
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                return "\n".join(parts).strip("\n")
            parts.append(more)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = reader.read(MORE)
        except EOFError:  # a continuation the input never gave
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def saved_messages(session, path: str) -> list[dict]:
    """The conversation a session file keeps in its extra (`pocketlm chat --session`), checked."""
    messages = session.saved_extra.get("messages", [])
    if not (isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in messages)):
        raise InvalidInputError(f"{path}: the saved conversation's messages are malformed")
    return messages


class ChatREPL:
    """The conversation of `pocketlm chat`: `messages` (with the system prompt first, if any) on
    `session`, sampling options `sampling` (Session.generate's names), saved to `save_path` after each
    answer when given."""

    def __init__(self, engine, session, messages: list[dict], sampling: dict, save_path: str | None,
                 verbose: bool, parsers: dict[str, Callable], stats_line: Callable):
        self.engine, self.session, self.messages = engine, session, messages
        self.sampling = dict(sampling)
        self.save_path = save_path
        self.verbose = verbose
        self.parsers = parsers
        self.stats_line = stats_line
        self.dim = sys.stderr.isatty()

    # ---- output -----------------------------------------------------------
    def note(self, text: str) -> None:
        """One line on standard error, dim at a terminal."""
        print(f"\x1b[2m{text}\x1b[0m" if self.dim else text, file=sys.stderr, flush=True)

    # ---- turns --------------------------------------------------------------
    def answer(self, text: str) -> None:
        session = self.session
        self.messages.append({"role": "user", "content": text})
        reply: list[str] = []
        evicted = session.evicted_tokens
        pieces = session.chat(self.messages, **self.sampling)
        interrupted = False
        try:
            for piece in pieces:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:  # the turn failed (a template, a setting): it never happened
            if not reply:
                self.messages.pop()
                raise
            interrupted = True  # (an answer under way that failed: kept as far as it went)
        finally:
            pieces.close()  # (cancels the rest of an interrupted answer)
        sys.stdout.write("\n")
        sys.stdout.flush()
        # what was said stays in the conversation, an interrupted answer as far as it went
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        if interrupted:
            self.note("[answer stopped]")
        elif session.last_stats.finish_reason == "length":
            self.note(f"[the answer reached its limit of {session.last_stats.generated_tokens} tokens: "
                      f"/set max_tokens N for longer ones]")
        if session.evicted_tokens > evicted:
            self.note(f"[the context of {session.max_context} tokens is full: the oldest "
                      f"{session.evicted_tokens - evicted} tokens after the first {session.keep} were dropped]")
        self.save()
        if self.verbose:
            print(self.stats_line(session.last_stats), file=sys.stderr)

    def save(self) -> None:
        if self.save_path:  # after every answer: a crash or a kill loses nothing said
            self.session.save(self.save_path, extra={"messages": self.messages})

    # ---- commands -----------------------------------------------------------
    def command(self, text: str) -> bool:
        """Runs a slash command; False when the chat should end."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            print(HELP, file=sys.stderr)
        elif name in ("/clear", "/reset"):
            del self.messages[1 if self.messages and self.messages[0]["role"] == "system" else 0:]
            self.session.reset()
            self.save()
            self.note("[conversation cleared]")
        elif name == "/system":
            self.set_system(arg)
        elif name == "/set":
            self.set_option(arg)
        elif name in ("/stats", "/show"):
            self.show_stats()
        elif name == "/save":
            if not arg:
                raise InvalidInputError("/save needs a file name")
            self.session.save(arg, extra={"messages": self.messages})
            self.note(f"[saved {len(self.messages)} messages and {self.session.position} tokens to {arg}]")
        elif name == "/load":
            if not arg:
                raise InvalidInputError("/load needs a file name")
            self.load(arg)
        else:
            raise InvalidInputError(f"unknown command {name!r}; /help lists them")
        return True

    def set_system(self, text: str) -> None:
        if not text:
            raise InvalidInputError("/system needs the text of the system prompt")
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})
        session = self.session
        session.reset()  # read again under the new prompt; a shifting session keeps the new one
        if session.on_overflow == "shift":
            session.keep = self.engine.chat_keep(self.messages, max_context=session.max_context)
        self.save()
        self.note("[system prompt set]")

    def set_option(self, arg: str) -> None:
        if not arg:
            shown = ", ".join(f"{k} {self.sampling.get(SETTING_NAMES[k])}" for k in SETTING_NAMES)
            print(f"options: {shown} (None: the model's default)", file=sys.stderr)
            return
        key, _, value = arg.partition(" ")
        key = key.lower().replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in SETTING_NAMES:
            raise InvalidInputError(f"/set: unknown option {key!r}; one of {', '.join(SETTING_NAMES)}")
        if not value.strip():
            raise InvalidInputError(f"/set {key} needs a value")
        try:
            parsed = self.parsers[key](value.strip())
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise InvalidInputError(f"/set {key}: {e}") from None
        self.sampling[SETTING_NAMES[key]] = parsed
        self.note(f"[{key} = {parsed}]")

    def show_stats(self) -> None:
        s = self.session
        if s.last_stats.generated_tokens:
            print(self.stats_line(s.last_stats), file=sys.stderr)
        print(f"[context: {s.position} of {s.max_context} tokens, {s.evicted_tokens} dropped by shifts; KV "
              f"{s.kv_bytes / 2**20:.1f} MiB ({self.engine.kv_type}); {len(self.messages)} messages]", file=sys.stderr)

    def load(self, path: str) -> None:
        session = self.engine.load_session(path)
        messages = saved_messages(session, path)
        self.session, self.messages[:] = session, messages
        self.note(f"[loaded {len(messages)} messages and {session.position} tokens from {path}]")

    # ---- the loop -----------------------------------------------------------
    def run(self, reader: LineReader) -> int:
        if reader.interactive and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # Started with SIGINT ignored (from a script's background job, nohup'd, some IDE
            # consoles: the disposition is inherited): at a terminal, Ctrl-C must still stop an
            # answer and clear the line, as it does from a shell's foreground.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                try:
                    text = read_turn(reader).strip()
                except KeyboardInterrupt:  # at the prompt: the line is dropped, the chat goes on
                    print("^C", file=sys.stderr)
                    self.note("[Ctrl-D or /bye to exit]")
                    continue
                except EOFError:
                    print(file=sys.stderr)
                    return 0
                if not text:
                    continue
                try:
                    if text.startswith("/") and "\n" not in text:  # (a block that starts with / is text)
                        if not self.command(text):
                            return 0
                    else:
                        self.answer(text)
                except (PocketLMError, ValueError, OSError) as e:  # a bad command, value or file: said, and
                    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # the chat goes on
                        e = f"{e.filename}: {e.strerror}"
                    print(f"pocketlm: error: {e}", file=sys.stderr)
        finally:
            reader.save_history()


# /set name -> Session.generate's keyword; ALIASES: the names of llama.cpp's and Ollama's options
SETTING_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "repeat_penalty": "repetition_penalty", "frequency_penalty": "frequency_penalty",
                 "presence_penalty": "presence_penalty", "seed": "seed", "max_tokens": "max_tokens"}
ALIASES = {"temp": "temperature", "num_predict": "max_tokens", "n_predict": "max_tokens", "n": "max_tokens"}


