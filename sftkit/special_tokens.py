"""Special tokens a template writes whose embedding rows the model never trained.

Llama 3.1 base was never trained on its chat control tokens (<|start_header_id|>, <|end_header_id|>, <|eot_id|>):
their input-embedding rows are zero, and their output (lm_head) rows are not zero but all one repeated vector
(Unsloth's observation), so a zero test on the output side alone misses them. Frozen like that, LoRA on the
projections cannot make the model emit <|eot_id|> reliably: it never learns to stop. The remedies: set the rows to
the mean of the trained rows (as Unsloth's fix_untrained_tokens does), then train just those rows (peft
trainable_token_indices: kilobytes, and the adapter carries them to inference), or train the whole matrices
(--train_embeddings: peft modules_to_save, about a billion parameters on the 8B shape).
"""

import logging

from .own_template import probes
from .prompts import Template

log = logging.getLogger("sftkit")
DEAD = 1e-3  # a row whose norm is below this share of a typical row's norm is untrained
CHUNK = 8192  # rows per step: a whole 128k x 4096 matrix in float32 would be 2 GB
SCAN = 500  # rows tokenized for Unsloth's fix, which looks for the tokens in the first and last 250 rows


def template_token_ids(tokenizer, template: Template) -> list[int]:
    """The added (special) tokens this template makes the model read or write: for a chat template, those of a
    rendered conversation (system turn where the template takes one, two exchanges, generation prompt) and its stop
    token; for an instruction or text template, BOS and the EOS that ends every answer."""
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    if template.kind == "chat":
        ids, probe = [], probes(tokenizer, template.text)[1]
        for msgs, gen in ((probe, False), (probe[:-1], True)):
            ids += tokenizer.apply_chat_template(msgs, chat_template=template.text, tokenize=True, return_dict=True,
                                                 add_generation_prompt=gen)["input_ids"]
        ids.append(tokenizer.convert_tokens_to_ids(template.stop) if template.stop in tokenizer.get_vocab() else None)
    else:
        ids = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    return sorted({i for i in ids if i is not None and i in added})


def matrices(model) -> list:
    """The input embedding and, where it is not the same tensor (untied), the output embedding."""
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != weights[0].data_ptr():
        weights.append(out.weight)
    return weights


def norms(weight):
    """Each row's norm, in float32 a chunk at a time (the whole matrix at once would be 2 GB on an 8B model)."""
    import torch

    with torch.no_grad():
        return torch.cat([weight[i:i + CHUNK].float().norm(dim=1).cpu() for i in range(0, weight.shape[0], CHUNK)])


def dead(weight):
    """A boolean per row: zero or near it, measured against the median row of this matrix."""
    n = norms(weight)
    return n <= DEAD * float(n[n > 0].median()) if bool((n > 0).any()) else n == n


def untrained(model, ids, flags=None) -> list[int]:
    """The ids (within the matrices) whose input or output embedding row is untrained."""
    flags = flags or [dead(w) for w in matrices(model)]
    size = min(len(f) for f in flags)
    return sorted({i for i in ids if 0 <= i < size and any(bool(f[i]) for f in flags)})


def trained_mean(weight, skip):
    """The mean of the rows not flagged in skip (a boolean per row), summed in float32 a chunk at a time."""
    import torch

    total = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    keep = ~skip
    with torch.no_grad():
        for start in range(0, weight.shape[0], CHUNK):
            rows = keep[start:start + CHUNK].to(weight.device)
            total += weight[start:start + CHUNK][rows].float().sum(dim=0)
    return total / max(int(keep.sum()), 1)


def fix_untrained(model, ids, tokenizer=None) -> list[int]:
    """Sets the input and output rows of every untrained id to the mean of that matrix's trained rows (what Unsloth's
    fix does, without its scaling by how often the data uses each token), so the model can read and emit them.
    Rows untrained in the input embedding (reserved tokens too) are left out of both means, since their output rows
    are untrained copies that are not zero. Other rows are left as they are. Returns the ids set; logs one line."""
    import torch

    weights = matrices(model)
    flags = [dead(w) for w in weights]
    bad = untrained(model, ids, flags)
    if not bad:
        return []
    with torch.no_grad():
        for weight, skip in zip(weights, flags):
            size = min(len(skip), len(flags[0]))
            skip[:size] |= flags[0][:size]
            weight[torch.tensor(bad, device=weight.device)] = trained_mean(weight, skip).to(weight.dtype)
    names = tokenizer.convert_ids_to_tokens(bad) if tokenizer is not None else bad
    log.info("special tokens %s had untrained embedding rows (as in a base model): set to the mean of the trained "
             "rows, as Unsloth does; --train_embeddings trains them instead", ", ".join(map(str, names)))
    return bad


def row_ids(tokenizer, template: Template, rows, n: int = SCAN) -> list[list[int]]:
    """Token ids of the first and last n/2 rows (all when fewer), rendered as TRL tokenizes them for training: what
    Unsloth's fix scans (its first and last 250 rows) and counts each token's frequency on (so its scaling sees
    these rows only, not the whole data set)."""
    picks = range(len(rows)) if len(rows) <= n else [*range(n // 2), *range(len(rows) - n // 2, len(rows))]
    out = []
    for i in picks:
        r = rows[int(i)]
        if "messages" in r:
            out.append(tokenizer.apply_chat_template(r["messages"], chat_template=template.text, tokenize=True,
                                                     return_dict=True)["input_ids"])
        else:
            text = r["text"] if "text" in r else r["prompt"] + r["completion"]
            out.append(tokenizer(text)["input_ids"])
    return out


def fix_with(fixer, model, bad, tokenizer, ids_of_rows, who: str = "the backend's") -> tuple[list[int], list[int]]:
    """Runs a backend's own fix (Unsloth's fix_untrained_tokens on its path) on the untrained rows `bad` (as
    untrained() found them among the template's ids), then sftkit's for any it left as they were. Rows it set
    outside those ids (Unsloth sets every untrained row the data or template use, and zeroes the output rows of
    reserved tokens) are put back: the adapter carries only these ids' rows, so inference would not see those
    changes. Returns (ids the backend's fix set, ids sftkit's set)."""
    import torch

    if not bad:
        return [], []
    weights = matrices(model)
    others = sorted(set(torch.nonzero(dead(weights[0])).flatten().tolist()) - set(bad))
    where = [torch.tensor(others, dtype=torch.long, device=w.device) for w in weights]
    kept = [w[at].cpu() for w, at in zip(weights, where)]
    before = [w[torch.tensor(bad, device=w.device)].clone() for w in weights]
    fixer(model, tokenizer, ids_of_rows)
    moved = 0
    with torch.no_grad():
        for w, at, rows in zip(weights, where, kept):
            moved += int((w[at].cpu() != rows).any(dim=1).sum())
            w[at] = rows.to(w.device)
    if moved:
        log.info("%s fix also changed %d rows of tokens the template does not use (reserved ones): put back, since "
                 "the adapter does not carry them", who, moved)
    after = [w[torch.tensor(bad, device=w.device)] for w in weights]
    # Set means changed in every matrix. Unsloth zeroes the output row of a token its sample of rows never uses,
    # leaving the zero input row as it was: sftkit's fix then gives both the mean, since the template writes it.
    done = [i for k, i in enumerate(bad) if all(not torch.equal(b[k], a[k]) for b, a in zip(before, after))]
    if done:
        log.info("special tokens %s had untrained embedding rows (as in a base model): set by %s own fix",
                 ", ".join(map(str, tokenizer.convert_ids_to_tokens(done))), who)
    return done, fix_untrained(model, [i for i in bad if i not in done], tokenizer)


def prepare(model, tokenizer, template, rows, fixer=None, *, train_embeddings: bool) -> tuple[dict, dict]:
    """(extra LoRA arguments, what run.json records). Control tokens the template uses whose embedding or lm_head
    rows were never trained (zero in the real Llama 3.1 base: <|start_header_id|>, <|eot_id|>, ...) are set from the
    trained rows (by the backend's own fix where it has one, fixer: Unsloth's; else, or for rows it left, sftkit's
    mean), and the adapter trains and carries those rows (peft trainable_token_indices: kilobytes), so a model that
    never saw <|eot_id|> learns to end its turns and infer.py gets the rows back with the adapter.
    --train_embeddings trains both matrices in full instead."""
    ids = template_token_ids(tokenizer, template)
    bad = untrained(model, ids)
    by_backend, by_sftkit = [], []
    if bad and fixer:  # fixer: (name, function), the backend's own fix
        by_backend, by_sftkit = fix_with(fixer[1], model, bad, tokenizer, row_ids(tokenizer, template, rows), fixer[0])
    elif bad or train_embeddings:
        by_sftkit = fix_untrained(model, ids, tokenizer)
    extra = lora_embedding_kwargs(model) if train_embeddings else lora_token_kwargs(model, bad) if bad else {}
    names = tokenizer.convert_ids_to_tokens
    return extra, {"untrained": names(bad), "set_by_backend": names(by_backend), "set_by_sftkit": names(by_sftkit),
                   "train_embeddings": train_embeddings}


# --- --train_embeddings ----------------------------------------------------------------------------------------

def embedding_params(cfg) -> int:
    """Parameters of embed_tokens and lm_head (one matrix when they are tied), from a config object or dict."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    text = get("text_config")  # multimodal configs nest the language model's
    if text:
        return embedding_params(text)
    return int(get("vocab_size")) * int(get("hidden_size")) * (1 if get("tie_word_embeddings", False) else 2)


def embedding_names(model) -> list[str]:
    """The module names (last part, as peft matches them) of the input and, untied, the output embedding."""
    tied = len(matrices(model)) == 1
    wanted = [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()])
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if any(module is w for w in wanted)})


def lora_embedding_kwargs(model) -> dict:
    """LoraConfig arguments that train the input and output embeddings as full copies (peft modules_to_save); the
    saved adapter then holds both matrices, and loading it restores them. Tied embeddings: the input one alone,
    and peft ties lm_head to its trained copy."""
    tied = len(matrices(model)) == 1
    return {"modules_to_save": embedding_names(model), **({"ensure_weight_tying": True} if tied else {})}


def lora_token_kwargs(model, ids) -> dict:
    """LoraConfig arguments that train only these tokens' rows of both embeddings (peft trainable_token_indices):
    len(ids) x hidden x 2 parameters instead of the whole matrices (1.05 billion on the 8B shape), and an adapter
    of kilobytes that loads like any other. Tied embeddings: peft follows the tie."""
    return {"trainable_token_indices": {name: sorted(set(ids)) for name in embedding_names(model)}}
