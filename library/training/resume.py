"""--resume: find the newest complete state, check it against this run, then load it — all before the model.

A state save replaces `NAME-state` in two renames (old folder aside, new folder in). A power cut between them
leaves the new, complete folder under its temporary name `.NAME-state.tmp-PID` (or only the previous one under
`.NAME-state.old-PID`); resume looks at those too and takes the newest complete one, saying where it found it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.errors import ConfigError
from library.training import state_io

logger = logging.getLogger("loraforge")


@dataclass
class FoundState:
    folder: Path
    manifest: dict | None  # None: an older accelerate-format folder

    @property
    def step(self) -> int:
        if self.manifest is None:
            return -1
        return int(self.manifest.get("step", -1))


def leftover_copies(state_dir: Path) -> list[Path]:
    """The temporary / set-aside copies an interrupted replace of `state_dir` may have left."""
    if not state_dir.parent.is_dir():
        return []
    return sorted(p for pattern in (f".{state_dir.name}.tmp-*", f".{state_dir.name}.old-*")
                  for p in state_dir.parent.glob(pattern) if p.is_dir())


def remove_leftover_copies(state_dir: Path) -> None:
    """After a complete save the folder itself is the newest state: older copies only mislead a resume."""
    for path in leftover_copies(state_dir):
        shutil.rmtree(path, ignore_errors=True)


def _complete(folder: Path) -> FoundState | None:
    manifest = state_io.read_manifest(folder)
    if manifest is not None:
        return FoundState(folder, manifest)
    if state_io.is_legacy_state(folder):
        return FoundState(folder, None)
    return None


def find_state(value: str) -> FoundState:
    """The newest complete state among `value` and the copies an interrupted save left beside it."""
    folder = Path(value)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--resume {value}: is a file; give the <output_name>-state folder written by --save_state")
    found = [s for s in (_complete(p) for p in [folder, *leftover_copies(folder)] if p.is_dir()) if s is not None]
    if not found:
        if folder.is_dir() and (folder / state_io.TENSORS).exists():
            raise ConfigError(f"--resume {value}: incomplete state ({state_io.MANIFEST} missing: the save was cut "
                              "short); resume from an earlier state")
        if folder.is_dir():
            raise ConfigError(f"--resume {value}: not a training state folder (no {state_io.MANIFEST}); "
                              "give the <output_name>-state folder written by --save_state")
        raise ConfigError(f"--resume {value}: state folder not found (it is written by --save_state as "
                          "<output_name>-state)")
    best = max(found, key=lambda s: (s.step, s.folder == folder))
    if best.folder != folder:
        logger.warning("--resume %s: the newest complete state is %s (step %d), left by a save that was cut "
                       "short; resuming from it", value, best.folder, best.step)
    return best


def check_settings(found: FoundState, run: dict[str, Any]) -> None:
    """Name every setting that differs from the one the state was saved with, in one line."""
    if found.manifest is None:
        return
    saved = found.manifest.get("run", {})
    differ = [f"{k} {saved[k]!r} -> {v!r}" for k, v in run.items() if k in saved and saved[k] != v]
    if differ:
        raise ConfigError(f"--resume {found.folder}: saved with other settings: {'; '.join(differ)}; use the "
                          "settings of that run, or start a new run without --resume")


def load(found: FoundState, rank: int) -> dict[str, Any]:
    """Every part of the state (network, optimizer, lr_scheduler, progress, rng), tensors on the CPU."""
    if found.manifest is None:
        return state_io.read_legacy_state(found.folder, rank)
    parts = state_io.read_state(found.folder, found.manifest)
    if rank:
        rank_folder = found.folder.with_name(f"{found.folder.name}.rank{rank}")
        manifest = state_io.read_manifest(rank_folder)
        if manifest is not None:
            parts.update(state_io.read_state(rank_folder, manifest))
        else:
            parts.pop("rng", None)
    return parts
