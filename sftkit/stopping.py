"""Where generation stops: every end-of-sequence id the model's generation config names, the tokenizer's EOS, and the
template's end-of-turn token.

Endless answers mostly come from stopping on one id while the model ends its turn with another: a Llama 3.1
Instruct model ends a turn with <|eot_id|> (128009) while its base's EOS is <|end_of_text|> (128001), and its
generation config lists 128001, 128008 (<|eom_id|>) and 128009. transformers' generate takes eos_token_id as a
list and stops a row at any of them, in every decoding mode (streamed, batched, static cache).
"""

import json
from pathlib import Path
from types import SimpleNamespace


def as_ids(value) -> list[int]:
    """generation_config.eos_token_id as a list: it may be an int, a list, or None."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(tokenizer, template, generation_config=None) -> list[int]:
    """Every id that ends an answer, deduplicated, in this order: the generation config's, the tokenizer's EOS, the
    template's end-of-turn token (where it is one token in this vocabulary)."""
    ids = as_ids(getattr(generation_config, "eos_token_id", None)) + as_ids(tokenizer.eos_token_id)
    if template.kind == "chat" and template.stop in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(template.stop))
    return list(dict.fromkeys(ids))


def stop_strings(tokenizer, template) -> list[str]:
    """The template's end-of-turn text where it is several tokens in this vocabulary (generate matches it as text)."""
    if template.kind == "chat" and template.stop and template.stop not in tokenizer.get_vocab():
        return [template.stop]
    return []


def generate_kwargs(tokenizer, template, generation_config=None) -> dict:
    """The arguments generate() needs to stop on all of them: eos_token_id as a list, a pad id (the tokenizer's, else
    the first stop id: rows that finish early are padded with it), and stop_strings where the stop is text."""
    ids = stop_ids(tokenizer, template, generation_config)
    kwargs = {"eos_token_id": ids, "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else ids[0]}
    strings = stop_strings(tokenizer, template)
    if strings:
        kwargs.update(stop_strings=strings, tokenizer=tokenizer)
    return kwargs


def cut_answer(tokenizer, template, new_tokens: list, stops) -> tuple[str, bool, int]:
    """(answer text, whether it ended on a stop, tokens before the stop) of one row of generated ids. What follows
    the first stop id is padding for a row that finished before the others."""
    stops = set(stops)
    end = next((i for i, t in enumerate(new_tokens) if t in stops), None)
    kept = list(new_tokens[:end]) if end is not None else list(new_tokens)
    text = tokenizer.decode(kept, skip_special_tokens=True)
    stopped = end is not None
    for s in stop_strings(tokenizer, template):
        if s in text:
            text, stopped = text.split(s, 1)[0], True
    return text.strip(), stopped, len(kept)


def write_stop_ids(folder, tokenizer, template) -> list[int]:
    """Puts every id that ends an answer into folder/generation_config.json's eos_token_id, keeping the ids there,
    so that clients which take their stops from it (transformers' generate and pipeline, servers loading the
    folder) stop where infer.py does. A base model trained on a chat template ends its turns with <|eot_id|>, which
    the base's own config (128001 alone) does not list: without it, their answers ran on into invented turns."""
    path, model = Path(folder) / "generation_config.json", Path(folder) / "config.json"
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
    else:  # transformers would derive these from config.json; a file holding eos alone would hide the rest
        model_cfg = json.loads(model.read_text(encoding="utf-8")) if model.is_file() else {}
        cfg = {k: model_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if model_cfg.get(k) is not None}
    ids = stop_ids(tokenizer, template, SimpleNamespace(eos_token_id=cfg.get("eos_token_id")))
    if ids:
        cfg["eos_token_id"] = ids if len(ids) > 1 else ids[0]
        path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return ids
