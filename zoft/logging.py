"""Metrics go to metrics.jsonl always, and to W&B when asked (offline unless a key is set).

Core code returns metric dicts; only this module routes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zoft.errors import ZoftError


def check_metrics_kept(path: Path, keep_bytes: int):
    """A resumed run's metrics.jsonl must still hold every line its checkpoint saw: one replaced while
    the run wrote it (a git stash or checkout under a live run) is shorter, and cutting it back to
    ``keep_bytes`` would pad the gap with NUL bytes."""
    size = path.stat().st_size if path.exists() else 0
    if size < keep_bytes:
        raise ZoftError(f"{path} is shorter than its checkpoint recorded ({size} < {keep_bytes} bytes): it was"
                        " replaced or cut while the run wrote it, so the run cannot continue; remove its folder to rerun")


class JsonlLogger:
    def __init__(self, path: Path, keep_bytes: int | None = None):
        """Appends to ``path``; with ``keep_bytes`` (a resumed run), first cuts the file back to
        the lines its checkpoint had seen."""
        self._file = open(path, "a", encoding="utf-8")
        if keep_bytes is not None:
            self._file.truncate(keep_bytes)
            self._file.seek(keep_bytes)

    def position(self) -> int:
        return self._file.tell()

    def log(self, metrics: dict, step: int):
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def summary(self, summary: dict):
        pass

    def close(self):
        self._file.close()


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class WandbLogger:
    """Never prompts: offline mode (``wandb sync`` later) unless an API key is configured."""

    def __init__(self, run_dir: Path, config: dict, project: str, name: str, group: str, job_type: str, tags):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
        self._run = wandb.init(
            project=project, name=name, group=group, job_type=job_type, tags=list(tags),
            config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict, step: int):
        self._run.log(metrics, step=step)

    def summary(self, summary: dict):
        self._run.summary.update(summary)

    def artifact(self, path: Path, name: str, kind: str, metadata: dict):
        import wandb

        artifact = wandb.Artifact(name, type=kind, metadata=metadata)
        for f in Path(path).iterdir():
            if f.is_file() and not f.name.startswith("."):
                artifact.add_file(str(f))
        self._run.log_artifact(artifact)

    def close(self):
        self._run.finish()
