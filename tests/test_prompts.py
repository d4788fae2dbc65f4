import pytest

from sftkit import prompts
from sftkit.errors import UserError


def test_bundled_templates_load_and_list():
    names = prompts.available()
    assert {"alpaca_ko", "alpaca", "llama-3.1-chat", "chatml"} <= set(names)
    assert prompts.load("alpaca_ko").fields == {"instruction", "input"}
    assert prompts.load("llama-3.1-chat").stop == "<|eot_id|>"
    assert prompts.load("chatml").stop == "<|im_end|>"


def test_templates_resolve_from_the_code_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prompts.load("alpaca_ko").kind == "instruction"


def test_render_picks_the_input_variant_and_keeps_braces_literal():
    t = prompts.load("alpaca_ko")
    with_input = prompts.render(t, {"instruction": "요약해 줘 {x}", "input": "a {b} }{ {{c}}", "output": ""})
    assert "### 입력:\na {b} }{ {{c}}\n" in with_input
    assert "요약해 줘 {x}" in with_input
    assert with_input.endswith("### 응답:\n")
    no_input = prompts.render(t, {"instruction": "안녕", "input": "  "})
    assert "### 입력" not in no_input and no_input.endswith("### 응답:\n")


def test_unknown_field_and_missing_template_are_clear_errors(tmp_path):
    bad = tmp_path / "ctx.json"
    bad.write_text('{"prompt_input": "{instruction} {input} {context}", "prompt_no_input": "{instruction}"}')
    t = prompts.load(str(bad))
    with pytest.raises(UserError, match=r"context.*--columns"):
        prompts.render(t, {"instruction": "q", "input": "i"})
    with pytest.raises(UserError, match="not found.*alpaca_ko"):
        prompts.load("no-such-template")
    broken = tmp_path / "broken.json"
    broken.write_text('{"prompt_input": "{instruction", "prompt_no_input": "x"}')
    with pytest.raises(UserError, match="literal brace"):
        prompts.load(str(broken))


def test_split_answer_cuts_after_the_response_heading():
    t = prompts.load("alpaca")
    assert prompts.split_answer(t, "### Instruction:\nhi\n\n### Response:\n hello ") == "hello"


def test_raw_text_has_a_template_of_kind_text():
    t = prompts.load("none")
    assert (t.name, t.kind, t.text) == ("none", "text", "")
    assert prompts.from_text("none", "", "text") == t  # as rebuilt from run.json
    assert prompts.from_text("none", "", False) == t
    assert prompts.render(t, {"instruction": "옛날 옛적에", "input": ""}) == "옛날 옛적에"
    assert prompts.split_answer(t, "  이어지는 글 ") == "이어지는 글"


def test_auto_and_own_need_the_data_and_the_tokenizer():
    with pytest.raises(UserError, match="--prompt auto is resolved"):
        prompts.load("auto")
    assert prompts.for_data("auto", "alpaca")[0].name == "alpaca_ko"  # no tokenizer needed for Alpaca data
    assert prompts.for_data("alpaca", "alpaca")[1] == "--prompt alpaca"


def test_messages_put_the_system_turn_first_and_replace_an_old_one():
    history = [{"role": "system", "content": "old"}, {"role": "user", "content": "a"},
               {"role": "assistant", "content": "b"}]
    assert prompts.messages("q", "ctx", history, system="new") == [
        {"role": "system", "content": "new"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "q\n\nctx"}]
    assert prompts.messages("q", history=history) == history + [{"role": "user", "content": "q"}]


def test_system_prompt_needs_a_chat_template():
    from transformers import AutoTokenizer

    from conftest import TINY

    tok = AutoTokenizer.from_pretrained(TINY)
    with pytest.raises(UserError, match="--system needs a chat template"):
        prompts.prompt_ids(tok, prompts.load("alpaca_ko"), "q", system="짧게")
    chat = prompts.load("llama-3.1-chat")
    ids = prompts.prompt_ids(prompts.attach(tok, chat), chat, "q", system="짧게")
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n짧게<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
