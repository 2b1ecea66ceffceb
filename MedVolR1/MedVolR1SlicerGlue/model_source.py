"""Where the evidence model comes from, and asking before a multi-gigabyte download.

A Hugging Face id typed as the model ("Qwen/Qwen2.5-VL-3B-Instruct") is downloaded on first use:
several gigabytes.  The panel asks first (`download_plan` says whether to ask and what to say) and
shows the download's progress (`DownloadProgress`, fed by a tqdm class that huggingface_hub's
`snapshot_download(tqdm_class=...)` drives).  A local folder, or an id already in the cache, needs
nothing.  huggingface_hub is imported only when a download is planned or run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from MedVolR1Lib.errors import Cancelled
from MedVolR1Lib.grounder import _HUB_ID, _looks_like_path  # the library's own rule for "hub id or folder"

TYPICAL_SIZE = "several gigabytes (about 7 GB for a 3B model, 16 GB for a 7B model)"


def looks_like_path(text: str) -> bool:
    """A Hugging Face id is 'org/name'; anything else with a separator, '~' or a drive letter is a folder."""
    return _looks_like_path(text)


def looks_like_hub_id(text: str) -> bool:
    """'org/name' that is not an existing local folder (a folder named like an id wins, as transformers does)."""
    text = (text or "").strip()
    return bool(_HUB_ID.match(text)) and not looks_like_path(text) and not Path(text).expanduser().exists()


def is_downloaded(repo_id: str, cache_dir: Optional[str] = None) -> bool:
    """True when the model's config is already in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # not installed yet: nothing can be cached either
        return False
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return isinstance(found, str)


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    question: str  # what the confirmation dialog asks


def download_plan(model: str, cache_dir: Optional[str] = None) -> Optional[DownloadPlan]:
    """None when nothing must be downloaded (no model, a folder, or already cached); else what to ask."""
    model = (model or "").strip()
    if not model or not looks_like_hub_id(model) or is_downloaded(model, cache_dir):
        return None
    return DownloadPlan(
        model,
        f"The evidence model '{model}' is not on this computer yet. Download it from Hugging Face now? "
        f"This is {TYPICAL_SIZE} and can take a long time; it is kept for later sessions.",
    )


def confirm_download(plan: Optional[DownloadPlan], ask: Callable[[str], bool]) -> bool:
    """True when the run may go ahead: nothing to download, or the user agreed to `plan.question`."""
    return plan is None or bool(ask(plan.question))


@dataclass
class DownloadProgress:
    """Shared between the download thread (writes) and the GUI thread (reads); plain floats, no locks needed."""

    done_bytes: float = 0.0
    total_bytes: float = 0.0
    done_files: float = 0.0
    total_files: float = 0.0
    cancelled: bool = False
    bars: list = field(default_factory=list, repr=False)

    @property
    def fraction(self) -> float:
        if self.total_bytes > 0:
            return min(1.0, self.done_bytes / self.total_bytes)
        if self.total_files > 0:
            return min(1.0, self.done_files / self.total_files)
        return 0.0

    @property
    def message(self) -> str:
        if self.total_bytes > 0:
            return f"{self.done_bytes / 1e9:.2f} of {self.total_bytes / 1e9:.2f} GB"
        return f"{int(self.done_files)} of {int(self.total_files)} files" if self.total_files else "starting"

    def tqdm_class(self):
        """A tqdm class for `snapshot_download(tqdm_class=...)` that reports here instead of printing."""
        from tqdm.auto import tqdm as base_tqdm

        progress = self

        class _PanelTqdm(base_tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True  # nothing printed; we count ourselves (a disabled tqdm counts nothing)
                self._is_bytes = kwargs.get("unit") == "B"
                self._counted_total = 0.0
                self._counted = float(kwargs.get("initial", 0) or 0)
                super().__init__(*args, **kwargs)
                progress.bars.append(self)
                self._add_total(kwargs.get("total") or 0)
                self._add_done(self._counted)

            def _add_total(self, total: float) -> None:
                delta, self._counted_total = float(total) - self._counted_total, float(total)
                if self._is_bytes:
                    progress.total_bytes += delta
                else:
                    progress.total_files += delta

            def _add_done(self, n: float) -> None:
                if self._is_bytes:
                    progress.done_bytes += n
                else:
                    progress.done_files += n

            def update(self, n=1):
                if progress.cancelled:
                    raise Cancelled("model download cancelled by the user")
                if self.total is not None and float(self.total) != self._counted_total:
                    self._add_total(float(self.total))  # huggingface_hub grows totals as files are found
                n = float(n or 0)
                self._counted += n
                self._add_done(n)
                return True

        return _PanelTqdm


class ModelDownload:
    """`snapshot_download` on a thread.  The GUI thread waits in a pump loop (processEvents + sleep, which
    releases the GIL) behind a modal progress dialog; Cancel raises at the next progress update."""

    def __init__(self, repo_id: str, cache_dir: Optional[str] = None) -> None:
        self.repo_id = repo_id
        self.cache_dir = cache_dir
        self.progress = DownloadProgress()
        self.path: Optional[str] = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="MedVolR1-model-download", daemon=True)

    def start(self) -> "ModelDownload":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            from huggingface_hub import snapshot_download

            self.path = snapshot_download(self.repo_id, cache_dir=self.cache_dir, tqdm_class=self.progress.tqdm_class())
        except BaseException as exc:  # noqa: BLE001 - shown to the user by the GUI thread
            self.error = exc

    def cancel(self) -> None:
        self.progress.cancelled = True

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()
