"""Hugging Face Hub upload of saved LoRAs and states, and --resume from a Hub state, with sd-scripts' options.

An upload starts only after the file is complete on disk, and a failed upload is one logged line: the local file
is the run's result and is never touched by it.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from library.errors import ConfigError

logger = logging.getLogger("loraforge")

_HUB_OPTIONS = ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_repo_visibility",
                "save_state_to_huggingface", "async_upload")
_REPO_TYPES = ("model", "dataset", "space")


def parse_hub_resume(spec: str) -> tuple[str, str, str | None, str | None]:
    """sd-scripts' --resume form for the Hub: owner/repo/path/in/repo[:revision[:repo_type]]."""
    parts = spec.split("/")
    if len(parts) < 3 or not all(parts[:2]):
        raise ConfigError(f"--resume {spec} with --resume_from_huggingface: expected owner/repo/path_in_repo"
                          "[:revision[:repo_type]]")
    repo_id, path = "/".join(parts[:2]), "/".join(parts[2:])
    revision = repo_type = None
    if ":" in path:
        pieces = path.split(":")
        path, revision = pieces[0], pieces[1]
        repo_type = pieces[2] if len(pieces) > 2 else "model"
    return repo_id, path, revision, repo_type


def check_hub(args: argparse.Namespace) -> None:
    """The Hub options' problems in one line, before any model loads."""
    if not args.huggingface_repo_id:
        given = [f"--{o}" for o in _HUB_OPTIONS if getattr(args, o)]
        if given:
            raise ConfigError(f"{given[0]} needs --huggingface_repo_id (the repository to upload to)")
    if args.huggingface_repo_type not in (None, *_REPO_TYPES):
        raise ConfigError(f"--huggingface_repo_type {args.huggingface_repo_type}: choose one of {', '.join(_REPO_TYPES)}")
    if args.huggingface_repo_visibility not in (None, "public", "private"):
        raise ConfigError(f"--huggingface_repo_visibility {args.huggingface_repo_visibility}: public or private")
    if args.save_state_to_huggingface and not args.save_state:
        logger.warning("--save_state_to_huggingface uploads the states --save_state writes; without --save_state "
                       "only the LoRA files are uploaded")
    if args.resume_from_huggingface:
        if not args.resume:
            raise ConfigError("--resume_from_huggingface needs --resume owner/repo/path_in_repo[:revision[:type]]")
        parse_hub_resume(args.resume)


def download_state(args: argparse.Namespace) -> str:
    """Fetch the Hub state folder that --resume names; returns the local folder to load."""
    from huggingface_hub import snapshot_download

    repo_id, path, revision, repo_type = parse_hub_resume(args.resume)
    logger.info("downloading the state %s/%s%s from the Hub", repo_id, path, f"@{revision}" if revision else "")
    try:
        root = snapshot_download(repo_id=repo_id, revision=revision, repo_type=repo_type,
                                 allow_patterns=[f"{path}/*"], token=args.huggingface_token)
    except Exception as exc:  # the Hub's errors are many (network, auth, not found): each is one line here
        raise ConfigError(f"--resume {args.resume}: cannot download from the Hub ({type(exc).__name__}: {exc})") from None
    folder = Path(root) / path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ConfigError(f"--resume {args.resume}: no files at {path} in {repo_id}")
    return str(folder)


class HubUploader:
    """Uploads what the trainer saved; never raises, so a Hub problem never costs the local result."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.threads: list[threading.Thread] = []
        self._repo_ready = False

    @property
    def enabled(self) -> bool:
        return bool(self.args.huggingface_repo_id)

    def upload(self, path: Path, *, wait: bool = False) -> None:
        """Upload a saved file or state folder under --huggingface_path_in_repo (in the background with
        --async_upload unless `wait`: the last save is uploaded before the run ends, as in sd-scripts)."""
        if not self.enabled:
            return
        if self.args.async_upload and not wait:
            thread = threading.Thread(target=self._upload, args=(path,), name=f"hub-upload-{path.name}")
            thread.start()
            self.threads.append(thread)
        else:
            self._upload(path)

    def wait(self) -> None:
        for thread in self.threads:
            thread.join()
        self.threads.clear()

    def _upload(self, path: Path) -> None:
        from huggingface_hub import HfApi

        a = self.args
        in_repo = f"{a.huggingface_path_in_repo.rstrip('/')}/{path.name}" if a.huggingface_path_in_repo else path.name
        try:
            api = HfApi(token=a.huggingface_token)
            if not self._repo_ready:
                # as sd-scripts: a new repository is private unless public is asked for
                api.create_repo(repo_id=a.huggingface_repo_id, repo_type=a.huggingface_repo_type,
                                private=a.huggingface_repo_visibility != "public", exist_ok=True)
                self._repo_ready = True
            if path.is_dir():
                api.upload_folder(repo_id=a.huggingface_repo_id, repo_type=a.huggingface_repo_type,
                                  folder_path=str(path), path_in_repo=in_repo)
            else:
                api.upload_file(repo_id=a.huggingface_repo_id, repo_type=a.huggingface_repo_type,
                                path_or_fileobj=str(path), path_in_repo=in_repo)
            logger.info("uploaded %s to the Hub: %s/%s", path.name, a.huggingface_repo_id, in_repo)
        except Exception as exc:  # whatever the Hub raises, the local file stays and training goes on
            logger.error("upload of %s to the Hub failed (%s: %s); the local file is kept", path, type(exc).__name__,
                         str(exc).splitlines()[0] if str(exc) else "")
