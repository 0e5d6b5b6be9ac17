"""A live `pocketlm serve` on 127.0.0.1: started as the user starts it, stopped with SIGTERM (which
must end it cleanly, exit status 0)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from testutil import child_env

API_KEY = "sk-test-pocketlm"
START_SECONDS = 240  # the first start converts SmolLM2's GGUF into the bundle cache


class LiveServer:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", *args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=child_env())
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if "listening on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_SECONDS) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("pocketlm serve did not start:\n" + "".join(self.lines))
        match = re.search(r"listening on (http://\S+)", "".join(self.lines))
        self.url = match.group(1)

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", API_KEY),
                             max_retries=0, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def log(self) -> str:
        return "".join(self.lines)



os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the client must not send loopback traffic elsewhere
