"""Untrained special-token rows: found for the template's tokens, set to the trained mean, or trained by peft."""

import importlib
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import FIXTURE, TINY, needs_fixture
from sftkit import prompts, special_tokens
from test_chat_template import fixture_model, fixture_tokenizer

HEADERS_EOT = [128006, 128007, 128009]  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>
RESERVED = list(range(128011, 128256))  # the base model's reserved tokens: untrained too, never used


def tiny_with_zero_rows():
    """The shipped tiny model with the input rows of ids 2, 3 and 4 (its chat template's control tokens) zeroed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY)
    with torch.no_grad():
        model.get_input_embeddings().weight[[2, 3, 4]] = 0
    return model


@pytest.fixture
def base(tmp_path):
    """The fixture's base layout on a tiny random model whose control-token rows look as in the real base model:
    zero input rows, and output rows that are one repeated vector."""
    model = fixture_model("base-unsloth", tmp_path)
    with torch.no_grad():
        emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb[HEADERS_EOT + RESERVED] = 0
        out[HEADERS_EOT + RESERVED] = out[5].clone()
    return model, fixture_tokenizer("base-unsloth")


@needs_fixture
def test_template_tokens_of_each_kind():
    tok = fixture_tokenizer("base-unsloth")
    assert special_tokens.template_token_ids(tok, prompts.load("llama-3.1-chat")) == [128000, *HEADERS_EOT]
    assert special_tokens.template_token_ids(tok, prompts.load("alpaca_ko")) == [128000, 128001]
    instruct = fixture_tokenizer("instruct-meta")
    own = prompts.from_tokenizer(instruct)
    assert special_tokens.template_token_ids(instruct, own) == [128000, *HEADERS_EOT]


@needs_fixture
def test_untrained_rows_are_found_and_set_to_the_trained_mean(base, caplog):
    model, tok = base
    ids = special_tokens.template_token_ids(tok, prompts.load("llama-3.1-chat"))
    assert special_tokens.untrained(model, ids) == HEADERS_EOT  # BOS is trained
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    before_emb, before_out = emb.detach().clone(), out.detach().clone()
    with caplog.at_level(logging.INFO, logger="sftkit"):
        assert special_tokens.fix_untrained(model, ids, tok) == HEADERS_EOT
    assert len(caplog.records) == 1 and "<|eot_id|>" in caplog.records[0].getMessage()
    live = torch.ones(emb.shape[0], dtype=torch.bool)
    live[HEADERS_EOT + RESERVED] = False  # the reserved rows count for nothing
    untouched = torch.ones(emb.shape[0], dtype=torch.bool)
    untouched[HEADERS_EOT] = False
    for after, before in ((emb, before_emb), (out, before_out)):
        expected = before[live].mean(dim=0)
        for i in HEADERS_EOT:
            torch.testing.assert_close(after[i].detach(), expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(after[untouched].detach(), before[untouched])  # trained (and unused) rows stay as they were
    assert special_tokens.untrained(model, ids) == []
    assert special_tokens.fix_untrained(model, ids, tok) == []  # nothing left: no second log line


def unsloth_like(seen: dict):
    """A stand-in for Unsloth's fix_untrained_tokens, as it acts on the base model: it sets two of the template's
    rows, zeroes the output row of a token its rows never use (<|eot_id|>, input row left zero) and, outside the
    template's tokens, changes a reserved token's rows."""
    def fixer(model, tokenizer, ids_of_rows):
        seen["rows"] = ids_of_rows
        for w in special_tokens.matrices(model):
            w.data[HEADERS_EOT[:2]] = 0.5
            w.data[RESERVED[0]] = 0.25
        model.get_output_embeddings().weight.data[128009] = 0
    return fixer


@needs_fixture
def test_the_backends_own_fix_goes_first_and_sftkit_sets_only_what_it_left(base, caplog):
    """Unsloth's path: its fix gets the rows as training renders them; a row it left untrained (zero input row) is
    set by sftkit, since the template still writes it; rows it changed outside the template's tokens are put back,
    since the adapter would not carry them."""
    model, tok = base
    template = prompts.load("llama-3.1-chat")
    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답 {i}"}]}
            for i in range(3)]
    rendered = special_tokens.row_ids(tok, template, rows)
    assert len(rendered) == 3 and all(set(HEADERS_EOT) <= set(r) for r in rendered)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    reserved = (emb[RESERVED[0]].detach().clone(), out[RESERVED[0]].detach().clone())
    seen = {}
    ids = special_tokens.template_token_ids(tok, template)
    with caplog.at_level(logging.INFO, logger="sftkit"):
        got = special_tokens.fix_with(unsloth_like(seen), model, ids, tok, rendered, "Unsloth's")
    assert got == (HEADERS_EOT[:2], [128009]) and seen["rows"] is rendered
    assert torch.all(emb[HEADERS_EOT[:2]] == 0.5) and torch.all(out[HEADERS_EOT[:2]] == 0.5)
    for w in (emb, out):  # sftkit's mean for <|eot_id|>: neither zero nor the stand-in's value
        assert w[128009].abs().sum() > 0 and not torch.all(w[128009] == 0.5)
    assert torch.equal(emb[RESERVED[0]], reserved[0]) and torch.equal(out[RESERVED[0]], reserved[1])
    assert special_tokens.untrained(model, ids) == []
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "changed 2 rows of tokens the template does not use" in said and "set by Unsloth's own fix" in said


@needs_fixture
def test_run_record_says_which_fix_set_each_row(base):
    model, tok = base
    rows = [{"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답"}]}]
    extra, rec = special_tokens.prepare(model, tok, prompts.load("llama-3.1-chat"), False, rows,
                                        ("Unsloth's", unsloth_like({})))
    assert rec == {"untrained": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   "set_by_backend": ["<|start_header_id|>", "<|end_header_id|>"], "set_by_sftkit": ["<|eot_id|>"],
                   "train_embeddings": False}
    assert extra == special_tokens.lora_token_kwargs(model, HEADERS_EOT)  # the adapter trains all three


@pytest.fixture
def unsloth_tokenizer_utils():
    """Unsloth's own unsloth_zoo.tokenizer_utils, on a CPU: the package's __init__ refuses a machine without a GPU,
    but this module needs none, so it is loaded from the installed package without running that __init__."""
    spec = importlib.util.find_spec("unsloth_zoo")
    if spec is None:
        pytest.skip("unsloth_zoo is not installed (pip install -r requirements.txt installs it)")
    before = set(sys.modules)
    package = types.ModuleType("unsloth_zoo")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["unsloth_zoo"] = package
    try:
        yield importlib.import_module("unsloth_zoo.tokenizer_utils")
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("unsloth_zoo"):
                del sys.modules[name]


@pytest.fixture(params=["shipped-tiny", "fixture-base"])
def untrained_base(request, tmp_path):
    """(model, tokenizer, the template's untrained ids and their names) as a base model has them: zero input rows,
    output rows one repeated vector; also unused tokens untrained the same way (reserved ones). The shipped tiny
    model runs everywhere, the real tokenizer's layout where the fixture is."""
    from transformers import AutoTokenizer

    if request.param == "fixture-base":
        if FIXTURE is None:
            pytest.skip(needs_fixture.kwargs["reason"])
        model, tok = request.getfixturevalue("base")
        return model, tok, HEADERS_EOT, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    model = tiny_with_zero_rows()
    with torch.no_grad():
        model.get_input_embeddings().weight[100:110] = 0  # unused tokens, untrained like the reserved ones
        out = model.get_output_embeddings().weight
        out[[2, 3, 4, *range(100, 110)]] = out[5].clone()
    tok = AutoTokenizer.from_pretrained(TINY)
    return model, tok, [2, 3, 4], tok.convert_ids_to_tokens([2, 3, 4])


def test_unsloths_own_fix_sets_the_template_rows_and_nothing_the_adapter_does_not_carry(untrained_base,
                                                                                         unsloth_tokenizer_utils):
    """The Unsloth path's seam with Unsloth's real fix_untrained_tokens: the template's control tokens are set by
    it; the unused untrained rows it zeroes (tokens no row uses) and every other row stay as they were, since the
    adapter carries only the template's rows; the matrices stay frozen."""
    from sftkit.backend.models import unsloth_row_fix

    model, tok, ids, names = untrained_base
    model.requires_grad_(False)  # as before LoRA: the fix must not leave the matrices trainable
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    before = emb.detach().clone(), out.detach().clone()
    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답 {i}"}]}
            for i in range(6)]
    extra, rec = special_tokens.prepare(model, tok, prompts.load("llama-3.1-chat"), False, rows,
                                        ("Unsloth's", unsloth_row_fix))
    assert rec["untrained"] == names and rec["set_by_backend"] == names and rec["set_by_sftkit"] == []
    assert special_tokens.untrained(model, ids) == []
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(emb[others], before[0][others]) and torch.equal(out[others], before[1][others])
    assert not emb.requires_grad and not out.requires_grad
    assert extra == special_tokens.lora_token_kwargs(model, ids)


@needs_fixture
def test_rows_for_the_backends_fix_are_the_first_and_last_as_rendered():
    tok = fixture_tokenizer("base-unsloth")
    rows = [{"text": f"row {i}"} for i in range(10)]
    got = special_tokens.row_ids(tok, prompts.load("alpaca_ko"), rows, n=4)
    assert [tok.decode(r, skip_special_tokens=True) for r in got] == ["row 0", "row 1", "row 8", "row 9"]
    pair = special_tokens.row_ids(tok, prompts.load("alpaca_ko"), [{"prompt": "Q: ", "completion": "A"}])
    assert tok.decode(pair[0], skip_special_tokens=True) == "Q: A"


@needs_fixture
def test_a_trained_model_has_nothing_to_fix(tmp_path):
    model = fixture_model("instruct-meta", tmp_path)  # random rows everywhere: nothing zero
    ids = special_tokens.template_token_ids(fixture_tokenizer("instruct-meta"), prompts.load("llama-3.1-chat"))
    assert special_tokens.untrained(model, ids) == []


def test_tied_embeddings_are_one_matrix_and_stay_tied(tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(TINY)
    cfg.tie_word_embeddings = True
    model = LlamaForCausalLM(cfg)
    assert len(special_tokens.matrices(model)) == 1
    assert special_tokens.embedding_params(cfg) == cfg.vocab_size * cfg.hidden_size
    with torch.no_grad():
        model.get_input_embeddings().weight[4] = 0
    assert special_tokens.fix_untrained(model, [4]) == [4]
    assert model.get_output_embeddings().weight[4].norm() > 0
    assert special_tokens.lora_embedding_kwargs(model) == {"modules_to_save": ["embed_tokens"],
                                                           "ensure_weight_tying": True}


def test_train_embeddings_adapter_saves_and_loads_both_matrices(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    assert special_tokens.embedding_params(AutoConfig.from_pretrained(TINY)) == 2 * 2048 * 64
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float16)
    extra = special_tokens.lora_embedding_kwargs(model)
    assert extra == {"modules_to_save": ["embed_tokens", "lm_head"]}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **extra))
    from sftkit.backend import Choice, trainable_in_fp32

    fp16_hf = Choice("hf", "cuda:0", "Tesla T4", "fp16", "test")  # what a T4 on the plain path runs
    assert trainable_in_fp32(peft_model, fp16_hf) == 2  # the fp16 copies of both matrices (LoRA: fp32 already)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    trained = peft_model.get_input_embeddings().weight
    assert trained.requires_grad and peft_model.get_output_embeddings().weight.requires_grad
    with torch.no_grad():
        trained[4] = 0.5
        peft_model.get_output_embeddings().weight[4] = -0.25
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), tmp_path / "adapter")
    assert torch.all(loaded.get_input_embeddings().weight[4] == 0.5)
    assert torch.all(loaded.get_output_embeddings().weight[4] == -0.25)


def test_train_only_the_template_tokens_rows(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY)
    before_emb = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    extra = special_tokens.lora_token_kwargs(model, [4, 2, 3])
    assert extra == {"trainable_token_indices": {"embed_tokens": [2, 3, 4], "lm_head": [2, 3, 4]}}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **extra))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == lora + 2 * 3 * 64
    optim = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    x = torch.tensor([[0, 2, 3, 4, 7, 4]])
    peft_model(x, labels=x).loss.backward()
    optim.step()
    merged = peft_model.merge_and_unload()
    for after, before in ((merged.get_input_embeddings().weight, before_emb),
                          (merged.get_output_embeddings().weight, before_out)):
        changed = (after.detach() != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == [2, 3, 4]  # the three rows moved, no other


def test_fixed_rows_travel_in_the_adapter(tmp_path):
    """Set to the mean, then trained as trainable tokens: the adapter holds the rows, so a base model loaded
    fresh (its rows zero again) answers with them, merged or not."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_with_zero_rows()
    assert special_tokens.fix_untrained(model, [0, 2, 3, 4]) == [2, 3, 4]
    rows = model.get_input_embeddings().weight[[2, 3, 4]].detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"],
                                                  **special_tokens.lora_token_kwargs(model, [2, 3, 4])))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_with_zero_rows(), tmp_path / "adapter")
    torch.testing.assert_close(loaded.get_input_embeddings()(torch.tensor([[2, 3, 4]]))[0], rows)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged.get_input_embeddings().weight[[2, 3, 4]], rows)
    assert special_tokens.untrained(merged, [2, 3, 4]) == []


@pytest.mark.gpu
def test_unsloth_trains_chat_rows_once_the_rows_are_set(tmp_path):
    """Unsloth refuses untrained rows the data uses while embeddings are frozen; set to the mean first, it trains,
    and LoRA alone leaves them as set."""
    from test_chat_template import CHAT, unsloth_tiny, unsloth_trainer

    model, tok, fast = unsloth_tiny()
    template = prompts.load("llama-3.1-chat")
    prompts.attach(tok, template)
    ids = special_tokens.template_token_ids(tok, template)
    with torch.no_grad():
        model.get_input_embeddings().weight[[2, 3, 4]] = 0
    assert special_tokens.untrained(model, ids) == [2, 3, 4]
    assert special_tokens.fix_untrained(model, ids, tok) == [2, 3, 4]
    rows = model.get_input_embeddings().weight[[2, 3, 4]].detach().clone()
    trainer = unsloth_trainer(model, tok, fast, [{"messages": CHAT}] * 4, tmp_path, assistant_only_loss=True)
    trainer.train()
    assert all(h["loss"] == h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert torch.equal(trainer.model.get_input_embeddings().weight[[2, 3, 4]], rows)


def test_training_sets_trains_and_ships_the_rows(tmp_path):
    """Chat data on a model whose control-token rows are zero, through train_unsloth on the plain path: the rows are
    found and set, both matrices' rows train as trainable tokens (TRL's default chunked loss reads lm_head.weight
    past peft's wrapper: it failed here), and infer.py's loader gets the trained rows back from the adapter."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from conftest import quick_args, write_jsonl
    from sftkit.generate import open_generator
    from train_unsloth import train

    tiny_with_zero_rows().save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답변 {i}"}]}
            for i in range(8)]
    out = train(**quick_args(tmp_path, model_name=str(tmp_path / "model"), backend="hf", max_steps=4, save_steps=0,
                             dataset=write_jsonl(tmp_path / "chat.jsonl", rows)))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["template"] == "llama-3.1-chat" and len(rec["tokens"]["special"]["untrained"]) == 3
    set_only = tiny_with_zero_rows()
    special_tokens.fix_untrained(set_only, [2, 3, 4])  # the rows before training
    w = {k.split(".token_adapter")[0].rsplit(".", 1)[-1]: v for k, v in
         load_file(str(Path(out) / "adapter_model.safetensors")).items() if "trainable_tokens_delta" in k}
    assert set(w) == {"embed_tokens", "lm_head"}
    assert not torch.allclose(w["lm_head"], set_only.get_output_embeddings().weight[[2, 3, 4]])  # trained
    assert w["embed_tokens"].abs().sum(dim=1).gt(0).all()
    g = open_generator(out, max_new_tokens=4)
    torch.testing.assert_close(g.model.get_input_embeddings()(torch.tensor([[2, 3, 4]]))[0].float(),
                               w["embed_tokens"].float())
