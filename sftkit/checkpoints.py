"""Whether a trainer checkpoint can be resumed from, and whether a saved adapter's weights are whole: a kill or a
full disk mid-save leaves one part of a checkpoint, or a file cut short."""

import json
from pathlib import Path


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def incomplete(checkpoint: Path) -> str:
    """Why a checkpoint cannot be resumed from ('' when it can): a kill or a full disk mid-save leaves one part."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is cut off"
    weights = next((checkpoint / n for n in ("adapter_model.safetensors", "model.safetensors")
                    if (checkpoint / n).is_file()), None)
    if weights is None:
        return "no adapter weights"
    if not readable_weights(weights):
        return f"{weights.name} is cut off or damaged"
    if not (checkpoint / "optimizer.pt").is_file():
        return "no optimizer state (optimizer.pt)"
    return ""


def readable_weights(path: Path) -> bool:
    """Whether a safetensors file's header reads and its tensors fill the file exactly (sizes, not values)."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else None
    except (OSError, ValueError):
        return False
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):  # not a header of tensors
        return False
    return 8 + size + end == path.stat().st_size  # safetensors refuses bytes beyond them too
