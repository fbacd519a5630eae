"""`unime quickstart`: the whole pipeline on the embedded default, in one resumable command.

unime quickstart [--out runs/quickstart] [--size default|ci] [--backend transformers|auto] [key=value ...]
"""

from unime.quickstart.config import QuickstartConfig, load_quickstart_config
from unime.quickstart.pipeline import run_quickstart
from unime.quickstart.stages import STAGES

__all__ = ["STAGES", "QuickstartConfig", "load_quickstart_config", "run_quickstart"]
