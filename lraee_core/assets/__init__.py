"""Files shipped with the package: the tiny model's architecture and the embedded default checkpoint."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
MODEL_CONFIGS_DIR = ASSETS_DIR / "model_configs"  # open_clip JSON architectures of the project's own models
DEFAULT_CHECKPOINT = ASSETS_DIR / "default"  # the checkpoint `make serve` loads when none is configured
