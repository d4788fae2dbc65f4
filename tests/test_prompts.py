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
    bad.write_text('{"prompt_input": "{instruction} {context}", "prompt_no_input": "{instruction}"}')
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
