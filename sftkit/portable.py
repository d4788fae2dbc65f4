"""Merged models and run folders that every loader reads the same way: transformers 4.x and 5.x, llama.cpp.

transformers 5 saves RoPE settings only as `rope_parameters` and names its tokenizer class `TokenizersBackend`.
transformers 4.57 ignores `rope_parameters` without a word (it then uses rope_theta 10000 and no llama3 scaling:
wrong positions past the first few tokens) and refuses the tokenizer class. Both versions and llama.cpp's
converter read the older keys `rope_theta` / `rope_scaling`, and transformers 5 prefers them when both are present,
so writing them (equal to `rope_parameters`) is safe everywhere.
"""

import json
import logging
import math
from pathlib import Path

from .errors import UserError

log = logging.getLogger("sftkit")
OLD_CLASS = "PreTrainedTokenizerFast"  # reads tokenizer.json in transformers 4.x; an alias of the new class in 5.x
NEW_CLASSES = {"TokenizersBackend"}
# Keys transformers 5 writes about the session that saved the tokenizer, not about the tokenizer itself.
SESSION_KEYS = ("is_local", "local_files_only")
PAD_CANDIDATES = ("<|finetune_right_pad_id|>",)  # Llama 3.1's reserved padding token, distinct from EOS


def legacy_rope(config: dict) -> tuple[float | None, dict | None]:
    """(rope_theta, rope_scaling) as transformers 4.x writes them, from whichever layout the config uses."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "full_attention" in params:  # per-layer-type RoPE: no 4.x equivalent
        return config.get("rope_theta"), config.get("rope_scaling")
    theta = params.get("rope_theta", config.get("rope_theta"))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}:
        scaling = None  # plain RoPE: 4.x writes no rope_scaling at all
    return theta, scaling


def same_rope(a: tuple, b: tuple) -> bool:
    """Whether two (theta, scaling) pairs mean the same RoPE (`type` is the older spelling of `rope_type`)."""
    def norm(scaling):
        if not scaling:
            return {}
        s = dict(scaling)
        s.setdefault("rope_type", s.pop("type", "default"))
        s.pop("type", None)
        return {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in s.items()}
    return float(a[0] or 10000.0) == float(b[0] or 10000.0) and norm(a[1]) == norm(b[1])


def inv_freq_4x(config: dict) -> list[float]:
    """RoPE inverse frequencies as transformers 4.x derives them from a raw config.json: only `rope_theta` and
    `rope_scaling` count (default and llama3 types; others raise). Used to check a portable folder without 4.x."""
    theta = float(config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = [1.0 / theta ** (i / dim) for i in range(0, dim, 2)]
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return freqs
    if kind != "llama3":
        raise ValueError(f"inv_freq_4x knows default and llama3 RoPE, not {kind}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:  # high frequencies: kept
            out.append(f)
        elif wavelen > low_wavelen:  # low frequencies: divided by the factor
            out.append(f / factor)
        else:  # in between: a smooth blend of the two
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}. Save the model again (--save_merged) and retry.") from err


def _write(path: Path, data: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _token_id(folder: Path, token: str) -> int | None:
    """The id of a token in tokenizer.json (its added tokens first, then the vocabulary)."""
    path = folder / "tokenizer.json"
    if not token or not path.is_file():
        return None
    data = _read(path)
    for added in data.get("added_tokens", []):
        if added.get("content") == token:
            return added["id"]
    return data.get("model", {}).get("vocab", {}).get(token)


def _text(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


def fix_tokenizer(folder: Path) -> dict:
    """tokenizer_config.json that transformers 4.x loads: an old class name, no session keys, a pad token.
    Returns {"pad_token": ..., "pad_token_id": ...} (empty without a tokenizer_config.json)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    cfg = _read(path)
    if cfg.get("tokenizer_class") in NEW_CLASSES:
        cfg["tokenizer_class"] = OLD_CLASS
    for key in SESSION_KEYS:
        cfg.pop(key, None)
    # 4.x wants a dict of named extra special tokens; 5.x may write a list (no names to give them).
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg.pop("extra_special_tokens")
    pad = _text(cfg.get("pad_token"))
    if not pad:
        # Padding with EOS would teach nothing wrong at inference, but a distinct pad is what Llama 3.1 reserves.
        pad = next((t for t in PAD_CANDIDATES if _token_id(folder, t) is not None), _text(cfg.get("eos_token")))
        if pad:
            cfg["pad_token"] = pad
            log.info("tokenizer had no pad token: set to %s", pad)
    _write(path, cfg)
    return {"pad_token": pad, "pad_token_id": _token_id(folder, pad)}


def make_portable(merged_dir: str, source_config: dict | None = None) -> dict:
    """Rewrites merged_dir's config.json and tokenizer_config.json in place so that transformers 4.x and 5.x and
    llama.cpp's converter read the same model. source_config: the base model's config.json as a dict (its RoPE
    keys are copied verbatim when they mean what the merged model uses). Works on a run folder too (tokenizer
    only). Returns what was set, for run.json."""
    folder = Path(merged_dir)
    if not folder.is_dir():
        raise UserError(f"{merged_dir} is not a folder: save the merged model first (--save_merged 16bit).")
    done = {"tokenizer": fix_tokenizer(folder)}
    path = folder / "config.json"
    if not path.is_file():
        return done
    cfg = _read(path)
    ours = legacy_rope(cfg)
    theirs = legacy_rope(source_config or {})
    if source_config and same_rope(ours, theirs):
        # The source's own spelling: a diff against the base model shows no RoPE change.
        theta = source_config.get("rope_theta", theirs[0])
        scaling = source_config.get("rope_scaling", theirs[1])
    else:
        theta, scaling = ours
        if source_config and theirs[0] is not None:
            # Training may scale RoPE on purpose (a --max_seq_length past the model's window): keep what it used.
            log.info("merged RoPE differs from the base model's (%s vs %s): the merged model's is kept", ours, theirs)
    if theta is not None:
        cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    if isinstance(cfg.get("rope_parameters"), dict) and "full_attention" not in cfg["rope_parameters"]:
        # Kept and made equal to the old keys, which transformers 5 would prefer anyway.
        cfg["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]  # the name transformers before 4.56 reads
    pad_id = done["tokenizer"].get("pad_token_id")
    if cfg.get("pad_token_id") is None and pad_id is not None:
        cfg["pad_token_id"] = pad_id
    elif cfg.get("pad_token_id") is None and source_config and source_config.get("pad_token_id") is not None:
        cfg["pad_token_id"] = source_config["pad_token_id"]
    _write(path, cfg)
    done.update(rope_theta=theta, rope_scaling=scaling, pad_token_id=cfg.get("pad_token_id"))
    return done
