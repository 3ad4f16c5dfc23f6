"""The error type for bad input, shared by every package (this module imports nothing from the project)."""
from __future__ import annotations


class InputError(ValueError):
    """Input the user must fix (a file, a config value, a checkpoint). Its message names what is wrong,
    where (file, line, config key) and the fix; `finetune` prints it as one line, without a traceback
    (set FINETUNE_TRACEBACK=1 to see one)."""


class CheckpointError(InputError):
    """A checkpoint file that does not load, or does not fit the run it is given to."""
