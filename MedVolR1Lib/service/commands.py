"""What `medvolr1 serve` and `medvolr1 propagate|segment --server` do (cli.py only parses flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..evidence import Evidence
from ..pipeline import PipelineConfig
from ..progress import ProgressCallback
from ..volume import Volume
from . import protocol as p


def run_server(config: PipelineConfig, host: str, port: int, token_file: Optional[str], max_request_mb: int,
               cache_dir: Optional[str]) -> int:
    from .server import ServerSettings, read_token, serve

    from platformdirs import user_cache_dir

    settings = ServerSettings(host, port, read_token(token_file), max_request_mb << 20)
    return serve(config, settings, cache_dir or str(Path(user_cache_dir("medvolr1")) / "server"))


def _remote_result(server: str, token_file: Optional[str], volume: Volume, request, progress: Optional[ProgressCallback]):
    from .remote import RemoteClient

    job = RemoteClient(server, token_file=token_file).start(volume, request, name="remote run")
    while not job.wait(0.2):
        state = job.poll()
        if progress is not None:
            progress(state.fraction, state.message)
    state = job.poll()
    if state.error is not None:
        raise state.error
    reply = state.result
    return p.segmentation_result(reply, volume), reply.provenance


def remote_propagate(server: str, token_file: Optional[str], volume: Volume, evidence: Evidence, query: Optional[str],
                     progress: Optional[ProgressCallback] = None):
    """(SegmentationResult, provenance) computed by the server's models."""
    request = p.Propagate(volume.fingerprint, Evidence.coerce(evidence).to_dict(), query or "")
    return _remote_result(server, token_file, volume, request, progress)


def remote_segment(server: str, token_file: Optional[str], volume: Volume, query: str, progress: Optional[ProgressCallback] = None):
    return _remote_result(server, token_file, volume, p.Segment(volume.fingerprint, query), progress)
