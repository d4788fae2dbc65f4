"""Template files checked when they load, before any model: Jinja syntax, chat turns whose content the template
drops, instruction slots that leak the answer or drop the input, and templates that refuse a system turn."""

import json
from pathlib import Path

import pytest

from conftest import TINY, quick_args, write_jsonl
from sftkit import own_template, prompts, special_tokens
from sftkit.errors import UserError

HEAD = "{#- stop: <|eot_id|> -#}\n"
LLAMA = (HEAD + "{{- bos_token -}}\n{%- for message in messages -%}\n{CHECK}"
         "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}\n"
         "{%- if message['role'] == 'assistant' -%}\n"
         "{%- generation -%}{{- message[KEY] | trim + '<|eot_id|>' -}}{%- endgeneration -%}\n"
         "{%- else -%}\n{{- message[KEY] | trim + '<|eot_id|>' -}}\n{%- endif -%}\n{%- endfor -%}\n"
         "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}\n")
NO_SYSTEM = "{%- if message['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}\n"
ALTERNATE = ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
             "{%- endif -%}\n")
CHAT = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "반가워요"}]
SYSTEM = {"role": "system", "content": "짧게 답해"}


def llama(check: str = "", key: str = "'content'") -> str:
    """The built-in llama-3.1-chat layout, with a line of checks at the top of each turn, reading `key`."""
    return LLAMA.replace("{CHECK}", check).replace("KEY", key)


def write(tmp_path, name: str, text) -> str:
    path = Path(tmp_path) / name
    path.write_text(text if isinstance(text, str) else json.dumps(text, ensure_ascii=False), encoding="utf-8")
    return str(path)


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


# --- 1. Jinja syntax ---------------------------------------------------------------------------------------------

def test_a_jinja_syntax_error_names_the_file_and_line_at_load(tmp_path, no_model_load):
    from sftkit.generate import open_generator

    text = HEAD + "{#- ChatML -#}\n{% for m in messages %}{{ m['content'] }{% endfor %}\n"
    path = write(tmp_path, "broken.jinja", text)
    with pytest.raises(UserError) as err:
        prompts.load(path)
    msg = str(err.value)
    assert path in msg and "line 3" in msg and "unexpected '}'" in msg and "each {{ closes with }}" in msg
    with pytest.raises(UserError, match="Jinja syntax error at line 3"):  # inference: before the model loads
        open_generator(model_name=TINY, prompt=path)
    with pytest.raises(UserError, match="Jinja syntax error at line 2: .*endfor"):  # as rebuilt from run.json
        prompts.from_text("own", HEAD + "{% for m in messages %}{{ m['content'] }}\n", "chat")


def test_generation_tags_and_the_shipped_templates_parse():
    for name in prompts.available():
        assert prompts.load(name).name == name
    assert prompts.render_chat(llama(), CHAT).count("<|eot_id|>") == 2


# --- 2. turns whose content the template drops -------------------------------------------------------------------

def test_a_chat_template_reading_another_key_than_content_is_refused(tmp_path):
    path = write(tmp_path, "wrongkey.jinja", llama(key="'text'"))
    with pytest.raises(UserError) as err:
        prompts.load(path)
    msg = str(err.value)
    assert path in msg and "user and assistant turns" in msg and "message['content']" in msg
    with pytest.raises(UserError, match="drops the content of the user and assistant"):
        prompts.for_data(path, "chat")  # how training picks it, before the model loads


def test_only_the_roles_whose_content_is_dropped_are_named(tmp_path):
    # Writes the assistant's turn from message['content'] but the others from message['value'].
    text = llama().replace("{{- message['content'] | trim + '<|eot_id|>' -}}\n{%- endif",
                           "{{- message['value'] | trim + '<|eot_id|>' -}}\n{%- endif")
    with pytest.raises(UserError, match=r"the user turn: "):
        prompts.load(write(tmp_path, "half.jinja", text))
    # A template that skips system turns (Phi-3's original layout) is a layout, not a misread key: it loads.
    silent = llama(check="{%- if message['role'] != 'system' -%}").replace("{%- endfor", "{%- endif -%}{%- endfor")
    assert prompts.load(write(tmp_path, "silent.jinja", silent)).kind == "chat"


def test_a_template_that_cannot_render_a_conversation_is_refused(tmp_path):
    text = HEAD + "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    with pytest.raises(UserError, match="cannot render a plain user/assistant conversation"):
        prompts.load(write(tmp_path, "bad.jinja", text))


# --- 3. instruction slots ------------------------------------------------------------------------------------------

KO = json.loads((prompts.PROMPTS_DIR / "alpaca_ko.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("key", ["prompt_input", "prompt_no_input"])
def test_an_answer_slot_in_a_prompt_is_refused(tmp_path, key):
    path = write(tmp_path, "leak.json", {**KO, key: KO[key].replace("### 응답:\n", "### 응답:\n{output}")})
    with pytest.raises(UserError) as err:
        prompts.load(path)
    msg = str(err.value)
    assert path in msg and f"{key} has the answer's slot {{output}}" in msg and f"Remove {{output}} from {key}" in msg


def test_a_prompt_input_without_the_input_slot_is_refused_for_data_with_inputs(tmp_path):
    """Refused where rows have an input (it would be dropped); a Q/A set without inputs may use such a template."""
    from datasets import Dataset

    from sftkit import data

    path = write(tmp_path, "noinput.json", {**KO, "prompt_input": "지시: {instruction}\n응답:\n"})
    template = prompts.load(path)
    rows = [{"instruction": "질문", "output": "답"}] * 3
    assert len(data.read_rows(Dataset.from_list(rows), template)[0]) == 3
    # The row with an input first: Dataset.from_list takes its columns from the first row.
    with_input = [{"instruction": "질문", "input": "이 문장", "output": "답"}] + rows[:2]
    with pytest.raises(UserError) as err:
        data.read_rows(Dataset.from_list(with_input), template)
    msg = str(err.value)
    assert "prompt_input has no {input} slot" in msg and "1 row(s)" in msg and "Add {input} to prompt_input" in msg


# --- 4. templates that refuse a system turn ----------------------------------------------------------------------

@pytest.mark.parametrize("check", [NO_SYSTEM, ALTERNATE])
def test_sftkits_probes_leave_out_a_system_turn_the_template_refuses(tmp_path, check):
    template = prompts.load(write(tmp_path, "gemma-like.jinja", llama(check)))
    assert special_tokens.template_token_ids(tokenizer(), template) == [0, 2, 3, 4]  # BOS, headers, <|eot_id|>


def test_a_models_own_template_refusing_system_is_still_tagged():
    """Gemma's template refuses a system turn; TRL has a tagged version, which sftkit keeps once it renders the
    probes as the original does (the probes used to include a system turn: untagged, and answers-only refused)."""
    import trl

    tok = tokenizer()
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text(encoding="utf-8")
    template, _ = prompts.for_data("own", "chat", tok)
    assert prompts.TAGS.search(template.text) and "System role not supported" in template.text


def test_rows_with_a_system_turn_the_template_refuses_are_named():
    template = prompts.from_text("gemma-like", llama(NO_SYSTEM), "chat")
    first = prompts.from_text("first", HEAD + "{{ messages[0]['content'] }}{% for m in messages %}{{ m['content'] }}"
                              "<|eot_id|>{% endfor %}", "chat")  # reads turn 0, as Llama 3.1's own template does
    own_template.check_conversations(first, [[], [CHAT[0]], CHAT])  # rows without an answer are dropped anyway
    rows = [CHAT, CHAT, [SYSTEM, *CHAT], CHAT]
    own_template.check_conversations(template, [CHAT] * 3)
    with pytest.raises(UserError) as err:
        own_template.check_conversations(template, rows)
    msg = str(err.value)
    assert msg.startswith("row 2:") and "System role not supported" in msg and "drop the system turns" in msg
    alternating = prompts.from_text("alt", llama(ALTERNATE), "chat")
    with pytest.raises(UserError, match=r"row 1: .*\(assistant, user\).*alternate"):
        own_template.check_conversations(alternating, [CHAT, CHAT[::-1]])


def test_system_prompt_on_a_template_that_refuses_it_is_refused_before_loading(tmp_path, no_model_load):
    from sftkit.generate import open_generator

    path = write(tmp_path, "nosys.jinja", llama(NO_SYSTEM))
    with pytest.raises(UserError, match=r"--system: .*'nosys' refuses a system turn \(System role not supported\)"):
        open_generator(model_name=TINY, prompt=path, system="짧게 답해")
    prompts.check_system(prompts.load("chatml"), "짧게 답해")  # a template with a system turn takes it


def test_training_with_a_template_that_refuses_system_turns(tmp_path):
    from train_unsloth import train

    path = write(tmp_path, "nosys.jinja", llama(NO_SYSTEM))
    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답 {i}"}]}
            for i in range(8)]
    run = train(**quick_args(tmp_path, dataset=write_jsonl(tmp_path / "chat.jsonl", rows), prompt=path,
                             max_steps=2, save_steps=0, max_samples=0))
    assert (Path(run) / "run.json").is_file()
