"""Owns the pipelines and the opened volumes, and answers one request at a time (worker process or server).

Pipelines are kept per configuration and volumes per fingerprint, so the propagator's cached image
features survive between requests: a re-propagation after a box drag encodes nothing.

With `background=True` (the local worker) a PreEncode request starts encoding the volume's slices between
requests: the worker's loop calls `background_step()` (one slice) whenever no request is waiting.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import MedVolR1Error
from ..pipeline import Pipeline, PipelineConfig
from ..propagation.preencode import PreEncoder
from ..progress import ProgressCallback
from ..volume import Volume
from . import protocol as p

MAX_VOLUMES = 4
# The evidence model's settings; every other PipelineConfig field builds the propagator (Pipeline.propagator), so
# pipelines that differ only in these share one propagator and its embeddings.
EVIDENCE_MODEL_FIELDS = ("model", "adapter", "num_views", "image_size", "lenient")
PROPAGATOR_FIELDS = tuple(f.name for f in dataclasses.fields(PipelineConfig) if f.name not in EVIDENCE_MODEL_FIELDS)


class UnknownVolume(MedVolR1Error):
    """The worker does not hold this volume (new worker, or evicted): the client sends it again."""


@dataclass
class EngineCounters:
    requests: int = 0
    grounder_runs: int = 0  # VLM calls (Find evidence, Segment from a query)
    propagations: int = 0


class Engine:
    """`handle(request, progress)` -> final reply; never raises (errors become ErrorReply)."""

    def __init__(self, fixed_config: Optional[PipelineConfig] = None, *, max_volumes: int = MAX_VOLUMES,
                 pipeline_factory: Callable[[PipelineConfig], Pipeline] = Pipeline, background: bool = False) -> None:
        self._fixed = fixed_config  # a server decides its models; a local worker takes the client's
        self._factory = pipeline_factory
        self._pipelines: dict[str, Pipeline] = {}
        self._volumes: "OrderedDict[str, Volume]" = OrderedDict()
        self._max_volumes = max_volumes
        self.counters = EngineCounters()
        self._background = background  # only a loop that calls background_step() between requests sets it
        self._preencoder: Optional[PreEncoder] = None
        self._preencode_key: Optional[tuple[str, str]] = None  # (volume id, propagator key) it encodes for

    def handle(self, request, progress: Optional[ProgressCallback] = None):
        self.counters.requests += 1
        try:
            return self._dispatch(request, progress)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the client as a typed reply
            if not isinstance(exc, MedVolR1Error):
                traceback.print_exc(file=sys.stderr)
            return p.error_reply(exc)

    # --------------------------------------------------------------------------------------------- internals
    def _dispatch(self, request, progress):
        if isinstance(request, p.OpenVolume):
            volume = request.to_volume()
            self._volumes[volume.fingerprint] = volume
            self._volumes.move_to_end(volume.fingerprint)
            while len(self._volumes) > self._max_volumes:
                self._volumes.popitem(last=False)
            if self._preencode_key is not None and self._preencode_key[0] not in self._volumes:
                self._preencoder.stop()
            return p.VolumeOpened(volume.fingerprint)
        if isinstance(request, p.Stats):
            return p.StatsReply(self.stats(request.config))
        if isinstance(request, p.CloseVolume):
            self._close(request.volume_id)
            return p.VolumeClosed(request.volume_id)
        if isinstance(request, p.PreEncode):
            return self._pre_encode(request)
        volume = self._volume(request.volume_id)
        pipeline = self._pipeline(request.config)
        if isinstance(request, p.FindEvidence):
            self.counters.grounder_runs += 1
            grounding = pipeline.ground(volume, request.query, progress=progress)
            return p.EvidenceFound(**_grounding_fields(grounding))
        if isinstance(request, p.Segment):
            self.counters.grounder_runs += 1
            self.counters.propagations += 1
            return _mask_reply(pipeline.segment(volume, request.query, progress=progress), pipeline)
        if isinstance(request, p.Propagate):
            self.counters.propagations += 1
            evidence = p.evidence_from_dict(request.evidence)
            result = pipeline.propagate(volume, evidence, progress=progress, query=request.query or None)
            return _mask_reply(result, pipeline)
        raise p.ProtocolError(f"{type(request).__name__} is not a request")

    # ------------------------------------------------------------------------------- background pre-encoding
    def _pre_encode(self, request: p.PreEncode) -> p.PreEncodeStatus:
        """Start (or re-centre on the viewed slice) the background encoding; the model loads in the first step."""
        volume = self._volume(request.volume_id)
        if not self._background:
            return p.PreEncodeStatus(volume.fingerprint, 0, volume.num_slices, "off")
        key = (volume.fingerprint, _propagator_key(self._config(request.config)))
        if key == self._preencode_key and self._preencoder.status().state != "stopped":
            self._preencoder.look_at(request.slice_index)
        else:
            if self._preencoder is not None:  # another volume or other propagator settings: not needed now
                self._preencoder.stop(release=self._preencode_key[1] != key[1])
            pipeline = self._pipeline(request.config)
            self._preencoder = PreEncoder(lambda: self._loaded_propagator(pipeline), volume, request.slice_index)
            self._preencode_key = key
        return self._preencode_status()

    def _preencode_status(self) -> p.PreEncodeStatus:
        status = self._preencoder.status()
        return p.PreEncodeStatus(self._preencode_key[0], status.ready, status.total, status.state, status.current,
                                 status.nbytes, status.budget_bytes)

    def background_pending(self) -> bool:
        """Whether `background_step()` has work (the worker then polls for requests instead of blocking)."""
        return self._preencoder is not None and self._preencoder.pending

    def background_step(self) -> bool:
        """One unit of background work (one slice); an error stops the background work and is logged, never raised."""
        if not self.background_pending():
            return False
        try:
            return self._preencoder.step()
        except Exception:  # noqa: BLE001 - background work must never take the worker down
            traceback.print_exc(file=sys.stderr)
            self._preencoder.stop()
            return False

    def stop_background(self) -> None:
        """Cancel: no more background work until the next PreEncode (the embeddings already made are kept)."""
        if self._preencoder is not None:
            self._preencoder.stop()

    def _close(self, volume_id: str) -> None:
        """Forget the volume: its voxels, its background encoding and its embeddings."""
        self._volumes.pop(volume_id, None)
        if self._preencode_key is not None and self._preencode_key[0] == volume_id:
            self._preencoder.stop(release=True)
        for pipeline in self._pipelines.values():
            propagator = pipeline._propagator
            if getattr(propagator, "bound_fingerprint", None) == volume_id:
                propagator.embedding_store.clear()

    # --------------------------------------------------------------------------------------------- lookups
    def _volume(self, volume_id: str) -> Volume:
        if volume_id not in self._volumes:
            raise UnknownVolume(f"volume {volume_id[:12]} is not open here")
        self._volumes.move_to_end(volume_id)
        return self._volumes[volume_id]

    def _config(self, data: Optional[dict]) -> PipelineConfig:
        return self._fixed if self._fixed is not None else p.config_from_dict(data)

    def _pipeline_key(self, data: Optional[dict]) -> str:
        return json.dumps(p.config_to_dict(self._config(data)), sort_keys=True)

    def _pipeline(self, data: Optional[dict]) -> Pipeline:
        """The pipeline for these settings; pipelines that differ only in their VLM share one propagator, so the
        embeddings encoded in the background serve a request whatever evidence model it names."""
        key = self._pipeline_key(data)
        if key not in self._pipelines:
            self._pipelines[key] = self._factory(self._config(data))
        pipeline = self._pipelines[key]
        self._adopt_twin(pipeline)
        return pipeline

    def _adopt_twin(self, pipeline: Pipeline) -> None:
        if pipeline._propagator is None:
            mine = _propagator_key(pipeline.config)
            twin = next((q._propagator for q in self._pipelines.values()
                         if q._propagator is not None and _propagator_key(q.config) == mine), None)
            pipeline._propagator = twin

    def _loaded_propagator(self, pipeline: Pipeline):
        """The pipeline's propagator: a twin pipeline's if one has loaded it meanwhile, else loaded now."""
        self._adopt_twin(pipeline)
        return pipeline.propagator

    def stats(self, config: Optional[dict] = None) -> dict:
        """Counters, opened volumes, and the encoder work of the pipeline for `config` (0 before it loads)."""
        key = self._pipeline_key(config)
        pipeline = self._pipelines.get(key)
        return {
            "requests": self.counters.requests,
            "grounder_runs": self.counters.grounder_runs,
            "propagations": self.counters.propagations,
            "volumes": list(self._volumes),
            "pipelines": len(self._pipelines),
            "encoded_slices": encoded_slices(pipeline._propagator) if pipeline is not None else 0,
            "preencode": dataclasses.asdict(self._preencode_status()) if self._preencoder is not None else None,
        }


def _propagator_key(config: PipelineConfig) -> str:
    return json.dumps({name: getattr(config, name) for name in PROPAGATOR_FIELDS}, sort_keys=True, default=list)


def encoded_slices(propagator) -> int:
    """Slices the propagator's image encoder has run on (MedSAM2 counts frames, LiteMedSAM slices)."""
    if propagator is None:
        return 0
    if hasattr(propagator, "encoded_frames"):
        return int(propagator.encoded_frames)
    stats = getattr(propagator, "stats", None)
    return int(getattr(stats, "encoded_slices", 0))


def _grounding_fields(grounding) -> dict:
    anchor = grounding.anchor
    return {
        "anchor": anchor.to_dict() if anchor is not None else None,
        "reasoning": grounding.reasoning or "",
        "raw_text": grounding.raw_text or "",
        "query": grounding.query,
        "slices": tuple(grounding.slices),
        "timings": {k: float(v) for k, v in (grounding.timings or {}).items() if isinstance(v, (int, float))},
    }


def _mask_reply(result, pipeline: Pipeline) -> p.MaskResult:
    return p.MaskResult(
        mask=result.mask,
        evidence=result.evidence.to_dict(),
        query=result.query or "",
        target_name=result.target_name,
        timings={k: float(v) for k, v in result.timings.items()},
        grounding=_grounding_fields(result.grounding) if result.grounding is not None else None,
        provenance=pipeline.describe(),
    )
