"""The Unsloth path's row fix: Unsloth's own fix_untrained_tokens sets the template's untrained rows (its real
function, loaded on a CPU from the installed unsloth_zoo, and a stand-in that acts as it does), sftkit's mean the
rows it leaves, and the rows it changes outside the template's tokens are put back."""

import importlib
import importlib.util
import logging
import sys
import types

import pytest
import torch

from conftest import FIXTURE, TINY, needs_fixture
from sftkit import prompts, special_tokens
from test_chat_template import fixture_tokenizer
from test_special_tokens import HEADERS_EOT, RESERVED, tiny_with_zero_rows, untrained_fixture_base


@pytest.fixture
def base(tmp_path):
    return untrained_fixture_base(tmp_path)


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
        got = special_tokens.fix_with(unsloth_like(seen), model, special_tokens.untrained(model, ids), tok, rendered,
                                      "Unsloth's")
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
    extra, rec = special_tokens.prepare(model, tok, prompts.load("llama-3.1-chat"), rows,
                                        ("Unsloth's", unsloth_like({})), train_embeddings=False)
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
    extra, rec = special_tokens.prepare(model, tok, prompts.load("llama-3.1-chat"), rows,
                                        ("Unsloth's", unsloth_row_fix), train_embeddings=False)
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
