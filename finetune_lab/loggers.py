"""Loggers of a `finetune` run: W&B that never blocks a run on the network, and a CSV file beside it."""
from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

OFFLINE_MODES = ("offline", "dryrun")


def wandb_mode() -> str:
    """"online", "offline" or "disabled": `WANDB_MODE` first, else online only with `WANDB_API_KEY` (or in a
    W&B sweep agent's run, `WANDB_SWEEP_ID`)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in OFFLINE_MODES:
        return "offline"
    if mode in ("online", "disabled"):
        return mode
    # a W&B sweep agent's run must reach the server (the agent itself is logged in)
    return "online" if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_SWEEP_ID") else "offline"


def wandb_reachable(timeout: float) -> str | None:
    """None when the W&B server accepts a connection within `timeout` seconds, else why not."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} is not reachable ({type(e).__name__}: {e})"


class FinetuneWandbLogger(WandbLogger):
    """Lightning's `WandbLogger`, made safe for machines without a network.

    - Online or offline: `WANDB_MODE` decides first (offline, online, disabled); unset, a run is online
      only when `WANDB_API_KEY` is set.
    - An online run that cannot start (the server is not reachable within `init_timeout` seconds, or
      `wandb.init` fails or times out) falls back to an offline run with a warning instead of failing
      or hanging the run; upload it later with `wandb sync`.
    - `tags` may be set after construction (`set_tags`), before the run starts.
    - wandb's deprecated `anonymous` setting is not passed (it warns on every run).

    Args:
        init_timeout: seconds to wait for the W&B server (connection check, then `wandb.init`).
        **kwargs: WandbLogger's arguments.
    """

    def __init__(self, init_timeout: float = 15.0, **kwargs: Any) -> None:
        self.mode = wandb_mode()
        kwargs.setdefault("offline", self.mode == "offline")
        super().__init__(**kwargs)
        self.init_timeout = init_timeout
        self.fell_back_offline: str | None = None  # why an online run went offline
        # Lightning always passes `anonymous`, which wandb 0.31 no longer supports (it warns).
        self._wandb_init.pop("anonymous", None)

    def set_tags(self, tags: list[str]) -> None:
        """Tags of the W&B run; effective until the run starts (the first log)."""
        self._wandb_init["tags"] = list(tags)

    @property
    def tags(self) -> list[str]:
        return list(self._wandb_init.get("tags") or [])

    def _go_offline(self, reason: str) -> None:
        rank_zero_warn(f"W&B: {reason}; this run logs offline to {self.save_dir} instead "
                       "(upload it later with the `wandb sync` command printed at the end).")
        self.fell_back_offline = reason
        self._offline = True
        self._wandb_init["mode"] = "offline"

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and not self._offline and self.mode == "online":
            # behind a proxy a direct connection says nothing: wandb.init's own timeout decides
            proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"))
            unreachable = None if proxied else wandb_reachable(self.init_timeout)
            if unreachable is not None:
                self._go_offline(f"the server {unreachable}")
            else:
                import wandb

                settings = self._wandb_init.get("settings") or wandb.Settings()
                settings.init_timeout = self.init_timeout
                self._wandb_init["settings"] = settings
                try:
                    return WandbLogger.experiment.fget(self)
                except Exception as e:  # noqa: BLE001 - wandb raises CommError, UsageError, timeouts...
                    self._experiment = None
                    self._go_offline(f"online initialisation failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return WandbLogger.experiment.fget(self)


class RunCSVLogger(CSVLogger):
    """`CSVLogger` writing `metrics.csv` straight into the run directory, which already holds config.yaml
    and wandb/: Lightning's "exists and is not empty. Previous log files ... will be deleted" warning is
    kept only for a folder that already has a metrics.csv (the file it would overwrite)."""

    @property
    def experiment(self):
        if self._experiment is None and not os.path.isfile(os.path.join(self.log_dir, "metrics.csv")):
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
                return super().experiment
        return super().experiment
