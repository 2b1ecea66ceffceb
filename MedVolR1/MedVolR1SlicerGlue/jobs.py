"""Where the panel's model work runs: a warm local worker process, or a `medvolr1 serve` server.

Not on a Python thread: Slicer's main thread holds the GIL while Qt idles, so a thread would only run
during the 100 ms polls.  The GUI thread pumps the returned `Job` from its QTimer (`Job.poll()` never
blocks), and Cancel stops the worker process (or drops the HTTP exchange).
"""

from __future__ import annotations

from typing import Optional

from MedVolR1Lib.service.client import WorkerClient
from MedVolR1Lib.service.jobs import Job, JobState, run_blocking  # noqa: F401 - JobState is part of this API
from MedVolR1Lib.service.protocol import Stats
from MedVolR1Lib.volume import Volume

from .settings import PanelSettings


class ModelRunner:
    """One client per place the models can run (local interpreter, or server URL + token), kept warm."""

    def __init__(self, log_dir: Optional[str] = None) -> None:
        self._log_dir = log_dir
        self._clients: dict[tuple, object] = {}

    def client(self, settings: PanelSettings):
        url = settings.server_url.strip()
        if url:
            key = ("remote", url, settings.server_token_file.strip())
            if key not in self._clients:
                from MedVolR1Lib.service.remote import RemoteClient

                self._clients[key] = RemoteClient(url, token_file=key[2] or None)
        else:
            key = ("local", settings.python_executable.strip())
            if key not in self._clients:
                self._clients[key] = WorkerClient(key[1], log_dir=self._log_dir)
        return self._clients[key]

    def start(self, settings: PanelSettings, volume: Optional[Volume], request, name: str) -> Job:
        return self.client(settings).start(volume, request, name=name)

    def stats(self, settings: PanelSettings, config: Optional[dict] = None, timeout: float = 60.0) -> dict:
        """Counters of the worker or server (volumes held, encoder work for `config`): proves cached features are reused."""
        return run_blocking(self.start(settings, None, Stats(config), "stats"), timeout).stats

    def shutdown(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
