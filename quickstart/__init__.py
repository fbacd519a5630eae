"""`unime quickstart`: the whole pipeline on the embedded default, in one resumable command.

unime quickstart [--out runs/quickstart] [--size default|ci] [--serve.backend transformers|auto] [key=value ...]
"""

from unime.quickstart.config import (
    QuickstartCommand,
    QuickstartConfig,
    load_quickstart_config,
    parse_quickstart_settings,
)
from unime.quickstart.pipeline import run_quickstart, run_quickstart_command
from unime.quickstart.stages import STAGES

__all__ = [
    "STAGES",
    "QuickstartCommand",
    "QuickstartConfig",
    "load_quickstart_config",
    "parse_quickstart_settings",
    "run_quickstart",
    "run_quickstart_command",
]
