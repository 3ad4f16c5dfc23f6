"""Checkpoints: best-by-metric and an always-current `last.ckpt`, written atomically, and checked before use."""
from __future__ import annotations

import math
import os
import tempfile
import zipfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune_lab.errors import CheckpointError

TEMP_SUFFIX = ".partial"  # `.<name>.XXXX.partial` beside the target while it is written


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a filesystem that does not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file in the destination folder, fsync, then rename over the target.

    A kill at any moment leaves either the previous checkpoint or the new one, never a truncated file,
    and nothing outside the checkpoint folder (fsspec's transaction writes to `$TMPDIR` and then copies,
    which is not atomic across filesystems). On an exception the temporary file is deleted; after a
    SIGKILL it stays behind as a hidden `*.partial` file that no `*.ckpt` pattern matches.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path:  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=folder)
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint gets the permissions of any new file
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(folder)


def inspect_checkpoint(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(contents, None) when `path` loads, else (None, why not: a short phrase). A sharded checkpoint
    (a folder: DeepSpeed, FSDP) is (None, None): its strategy reads and checks it.

    Cheap: the archive's index is read and the pickled structure unpickled with memory-mapped tensors,
    so a 300 MB checkpoint is checked without reading its weights.
    """
    if not os.path.exists(path):
        return None, "does not exist"
    if os.path.isdir(path):
        return None, None
    size = os.path.getsize(path)
    if size == 0:
        return None, "is empty (0 bytes): its write was interrupted"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None, f"is truncated or damaged ({size:,} bytes, no readable archive index): its write was interrupted"
    elif head[:1] != b"\x80":  # neither a zip archive nor torch.save's legacy pickle format
        shown = head[:24].decode("utf-8", "replace")
        return None, (f"is not a PyTorch checkpoint (it starts with {shown!r}); checkpoints written by finetune "
                "(Lightning) are zip archives such as runs/<experiment>/version_N/checkpoints/last.ckpt")
    try:
        return read_checkpoint(path), None
    except Exception as e:  # noqa: BLE001 - any failure means it does not load
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in str(e).lower() or "weights_only" in str(e):
            return None, ("holds Python objects that a safe load (weights_only) refuses; it was not written by "
                    "finetune, or a callback stored an object that is not a tensor or a plain value")
        return None, f"does not load ({type(e).__name__}: {reason[:200]})"


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint's contents with its tensors memory-mapped (cheap: for its hyperparameters and keys)."""
    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a loadable checkpoint (a short phrase), or None when it loads (see `inspect_checkpoint`)."""
    return inspect_checkpoint(path)[1]


def check_checkpoint(path: str, option: str = "--ckpt_path") -> dict[str, Any] | None:
    """The checkpoint's contents (tensors memory-mapped; None for a sharded folder), or CheckpointError
    (one line: the file, what is wrong, the fix) when it does not load."""
    contents, problem = inspect_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"{option} {path}: the checkpoint {problem}. Pass another checkpoint, or "
                              f"{option} last / best to take the newest run's that loads.")
    return contents


class TaskCheckpoint(ModelCheckpoint):
    """Best-by-metric checkpoints and an always-current `last.ckpt`.

    - `best-epoch=E-step=S.ckpt` (the top `save_top_k`): ranked only right after a validation, when the
      monitored metric has just been measured, so the file holds the weights its score belongs to and
      its name gives the step of that validation. `monitor=None` follows the task: `val/<task.monitor>`
      in the task's mode (e.g. `val/accuracy`, max).
    - `last.ckpt`: rewritten after every validation whatever the metric did, every
      `every_n_train_steps` optimizer steps (from the first interval on, before any validation), at the
      end of an epoch that has no validation, and at the end of training: the newest state to resume
      from. A step save is never named or ranked as best.

    Every file is written atomically (see `AtomicCheckpointIO`). Other arguments are ModelCheckpoint's.

    Args:
        monitor: metric to rank by; None = the task's `val/<monitor>`.
        mode: "max" or "min"; needed with an explicit `monitor`.
        save_last: keep `last.ckpt`.
        save_top_k: how many best checkpoints to keep.
        filename: name pattern of the best checkpoints.
        auto_insert_metric_name: ModelCheckpoint's filename option.
        every_n_train_steps: also refresh `last.ckpt` every N optimizer steps.
        train_time_interval: also refresh `last.ckpt` after this much training time.
        every_n_epochs: rank the best checkpoints at the validations of every N-th epoch (default 1).
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, save_last: bool = True,
                 save_top_k: int = 1, filename: str | None = "best-epoch={epoch}-step={step}",
                 auto_insert_metric_name: bool = False, every_n_train_steps: int | None = None,
                 train_time_interval: Any | None = None, every_n_epochs: int | None = None, **kwargs: Any) -> None:
        self._follow_task = monitor is None
        if mode is None and not self._follow_task:
            raise ValueError(f"checkpoint.mode ('max' or 'min') is needed with checkpoint.monitor='{monitor}'.")
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"checkpoint.every_n_train_steps must be >= 0, got {every_n_train_steps}.")
        self.step_interval = every_n_train_steps or 0
        self.time_interval = train_time_interval
        self.rank_every_n_epochs = 1 if every_n_epochs is None else every_n_epochs
        # The parent's own triggers are unused (every hook that saves is overridden); it refuses step and
        # epoch triggers together, so it is given the epoch one only.
        super().__init__(monitor=monitor, mode=mode or "min", save_last=save_last, save_top_k=save_top_k,
                         filename=filename, auto_insert_metric_name=auto_insert_metric_name,
                         every_n_epochs=self.rank_every_n_epochs, **kwargs)
        # the key this callback's state is saved under, as ModelCheckpoint formed it for these arguments
        # (checkpoints written before this class took over the triggers keep resuming their ranking)
        self._key_epochs = every_n_epochs if every_n_epochs is not None else (
            0 if (self.step_interval or train_time_interval is not None) else 1)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, every_n_train_steps=self.step_interval,
                                        every_n_epochs=self._key_epochs, train_time_interval=self.time_interval)

    def set_monitor(self, monitor: str, mode: str) -> None:
        """Rank by `monitor` in `mode` ("max" or "min")."""
        if mode not in ("min", "max"):
            raise ValueError(f"checkpoint mode must be 'min' or 'max', got '{mode}'.")
        self.monitor, self.mode = monitor, mode
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Resolved here, before checkpoint restore: `state_key` (under which this callback's state is
        # saved) includes the monitor, so it must be final before a resume reads it.
        if self._follow_task and hasattr(pl_module, "configure_task") and pl_module.configure_task():
            self.set_monitor(f"val/{pl_module.task.monitor}", pl_module.task.monitor_mode)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's or a sharded strategy's
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    # ---------------------------------------------------------------- when to save
    def _may_save(self, trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return not trainer.fast_dev_run and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _step_due(self, trainer) -> bool:
        import time

        due = self.step_interval > 0 and trainer.global_step % self.step_interval == 0
        if self.time_interval is not None:
            now = time.monotonic()
            elapsed = self._last_time_checked is not None and now - self._last_time_checked >= self.time_interval.total_seconds()
            elapsed = trainer.strategy.broadcast(elapsed)  # every rank decides alike (no hang in the barrier)
            if elapsed:
                self._last_time_checked = now
                due = True
        return due

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._may_save(trainer) and self._last_global_step_saved != trainer.global_step and self._step_due(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._may_save(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.rank_every_n_epochs >= 1 and (trainer.current_epoch + 1) % self.rank_every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)  # also when a step save wrote this step: the state moved on

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after the epoch's own validation (if any), which already wrote last.ckpt at this step.
        if self._may_save(trainer) and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # ---------------------------------------------------------------- resume into a new directory
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run writes into a new run directory. Lightning then forgets the best score, so the
        # first validation after a resume would always count as "best" (and be exported) even when it
        # is worse. Keep the ranking; files of the earlier run are never deleted (_remove_checkpoint).
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        if moved:
            state_dict = {**state_dict, "dirpath": self.dirpath, "last_model_path": ""}
        super().load_state_dict(state_dict)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if self.dirpath and os.path.dirname(os.path.abspath(filepath)) == os.path.abspath(self.dirpath):
            super()._remove_checkpoint(trainer, filepath)
