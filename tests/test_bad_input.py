"""Bad input caught early, with one clear line naming the problem and the fix (no model training needed)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, write_jsonl
from sftkit import prompts
from sftkit.errors import UserError
from sftkit.batchfile import read_prompts
from sftkit.generate import open_generator


@pytest.mark.parametrize("slot", ["{}", "{0}", "{0.x}"])
def test_positional_template_slot_is_refused_at_load(tmp_path, slot):
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({"prompt_input": "{instruction}\n{input}", "prompt_no_input": f"Q: {slot} A:"}))
    with pytest.raises(UserError) as err:
        prompts.load(str(path))
    msg = str(err.value)
    assert str(path) in msg and "prompt_no_input" in msg and "{instruction}" in msg and "positional" in msg
    ok = prompts.from_text("ok", '{"prompt_input": "{instruction}{{}}", "prompt_no_input": "{instruction}"}', False)
    assert prompts.render(ok, {"instruction": "q", "input": "i"}) == "q{}"  # an escaped brace stays fine


def test_batch_file_rows_are_checked_with_their_line_numbers(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "a"}, {"instruction": "b", "input": "c"}])
    assert [r["instruction"] for r in read_prompts(good)] == ["a", "b"]
    cases = {'{"question": "a"}': r"line 3 has no non-empty text in 'instruction' \(keys: \['question'\]\)",
             '{"instruction": "  "}': "line 3 has no non-empty text in 'instruction'",
             '["a", "b"]': "line 3 is a JSON list, not an object",
             '"just text"': "line 3 is a JSON str, not an object"}
    for bad, expected in cases.items():
        path = tmp_path / "q.jsonl"
        path.write_text('{"instruction": "a"}\n\n' + bad + "\n", encoding="utf-8")  # the blank line still counts
        with pytest.raises(UserError, match=expected) as err:
            read_prompts(str(path))
        assert str(path) in str(err.value) and '{"instruction": "your question"' in str(err.value)
        assert "--instruction" not in str(err.value)  # not the one-prompt advice: this is batch mode
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(str(blank))


def test_batch_keys_infer_py_writes_are_refused_not_overwritten(tmp_path):
    """An eval file's own "answer" (a reference answer), "settings", "stopped" or "_row" would be replaced by the
    answer line's: refused before the model loads, naming the line and a new name that keeps both."""
    for row, named in (({"instruction": "q", "answer": "GOLD"}, "'answer'"),
                       ({"instruction": "q", "_row": 7, "stopped": "x"}, "'_row', 'stopped'"),
                       ({"instruction": "q", "settings": "mine"}, "'settings'")):
        path = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "fine", "reference": "kept"}, row])
        with pytest.raises(UserError, match=f"line 2 has {named}, which infer.py writes into each answer line: "
                                            "rename"):
            read_prompts(path)
        with open(path, encoding="utf-8") as f:
            assert json.loads(f.readlines()[1]) == row  # the input is read, never rewritten
    path = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q", "base_answer": "mine"}])
    assert read_prompts(path)[0]["base_answer"] == "mine"  # written only with --compare_base
    with pytest.raises(UserError, match="line 1 has 'base_answer'"):
        read_prompts(path, compare_base=True)


def test_infer_checks_the_batch_file_before_loading_the_model(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model_name", str(tmp_path / "no-model"),
                          "--input_file", str(bad), "--output_file", str(tmp_path / "a.jsonl")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "line 1 has no non-empty text in 'instruction'" in out.stderr, out.stderr[-2000:]


def test_compare_base_without_an_adapter_is_refused(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model_name", TINY, "--instruction", "hi",
                          "--compare_base"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--compare_base needs a fine-tuned run: pass --adapter" in out.stderr and "adapter off" not in out.stdout
    g = open_generator(model_name=TINY, max_new_tokens=2)  # the library path refuses too, not just the CLI
    with pytest.raises(UserError, match="--compare_base needs"):
        g.answer("hi", base=True)


def test_merge_adapter_conflicts_are_refused_before_loading(tmp_path):
    """Both checks name the fix and come before any model is read (the paths given do not even exist)."""
    from infer import infer

    with pytest.raises(UserError, match="drop --merge_adapter"):
        infer(adapter=str(tmp_path / "no-run"), instruction="hi", compare_base=True, merge_adapter=True)
    with pytest.raises(UserError, match="--merge_adapter needs --adapter"):
        infer(model_name=str(tmp_path / "no-model"), instruction="hi", merge_adapter=True)


def test_batch_output_that_infer_did_not_write_is_refused_and_left_alone(tmp_path, no_model_load):
    """Resuming drops lines that are not answers; so a file of someone else's (say, the training data passed as
    --output_file by mistake) must be refused whole, before the model loads, and not touched."""
    from infer import infer

    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "a"}, {"instruction": "b"}])
    theirs = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "keep me", "output": "x"}] * 3)
    before = (tmp_path / "train.jsonl").read_bytes()
    with pytest.raises(UserError, match="line 1 is not an answer written by infer.py .* nothing was changed"):
        infer(model_name=TINY, input_file=src, output_file=theirs)
    assert (tmp_path / "train.jsonl").read_bytes() == before
    with pytest.raises(UserError, match="--output_file is the --input_file"):
        infer(model_name=TINY, input_file=src, output_file=str(tmp_path / "." / "q.jsonl"))
    ours = tmp_path / "a.jsonl"  # our answers, then a foreign line that ends with a newline: not a torn write
    ours.write_text('{"instruction": "a", "_row": 0, "answer": "x"}\n{"note": "mine"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="a.jsonl line 2 is not an answer"):
        infer(model_name=TINY, input_file=src, output_file=str(ours))
    config = tmp_path / "config.json"  # one line, no newline: looks cut off, but not like one of our answers
    config.write_text('{"lr": 0.001}', encoding="utf-8")
    with pytest.raises(UserError, match="config.json line 1 is not an answer"):
        infer(model_name=TINY, input_file=src, output_file=str(config))
    assert config.read_text(encoding="utf-8") == '{"lr": 0.001}'
    other = tmp_path / "other.jsonl"  # infer's answers, but to another file's prompts
    other.write_text('{"_row": 1, "instruction": "not b", "answer": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1 answers prompt 1, which is not that prompt of --input_file"):
        infer(model_name=TINY, input_file=src, output_file=str(other))


@pytest.mark.parametrize("bad, match", [
    ({"instruction": "   "}, "say what to answer"),
    ({"instruction": "hi", "batch_size": 0}, "--batch_size must be a positive whole number"),
    ({"instruction": "hi", "max_new_tokens": 0}, "--max_new_tokens must be a positive whole number"),
    ({"instruction": "hi", "do_sample": True, "temperature": 0.0}, "--do_sample needs --temperature > 0"),
    ({"instruction": "hi", "do_sample": True, "top_p": 1.5}, "drop --do_sample"),
])
def test_infer_numbers_are_checked_before_loading(bad, match, no_model_load):
    from infer import infer

    with pytest.raises(UserError, match=match):
        infer(model_name=TINY, **bad)
