"""The length policy (sftkit/lengths.py), held against what TRL's SFTTrainer itself prepares from the same rows:
the same token counts, the same answer starts, and at a cut, the rows it keeps (with the loss masked) are ours."""

import logging
import shutil

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from conftest import FIXTURE, SAMPLE, TINY, needs_fixture
from sftkit import lengths, prompts
from sftkit.errors import UserError

KO = prompts.load("alpaca_ko")
CHAT = prompts.load("llama-3.1-chat")


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY)


def real_tokenizer(tmp_path):
    """The real Llama 3.1 tokenizer (as unsloth/Meta-Llama-3.1-8B has it), copied to tmp_path, never the repo."""
    for f in (FIXTURE / "base-unsloth").iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path / "tokenizer.json")
    return AutoTokenizer.from_pretrained(tmp_path)


def trl_rows(model, tok, rows, max_length, **cfg):
    """The training rows exactly as SFTTrainer prepares them (EOS, tokens, labels, cut, drop); nothing is trained."""
    args = SFTConfig(output_dir="/tmp/unused", report_to="none", bf16=False, use_cpu=True,
                     gradient_checkpointing=False, max_length=max_length, **cfg)
    return SFTTrainer(model=model, processing_class=tok, train_dataset=rows, args=args).train_dataset


def completion_rows(rows):
    """data.py's prompt/completion layout, built here so these tests do not depend on how data.py reads rows."""
    return Dataset.from_list([{"prompt": prompts.render(KO, r), "completion": r["output"]} for r in rows])


def sample_rows(n=40):
    """Alpaca rows of the sample with inputs of growing length, so a cut falls in prompts and in answers."""
    return completion_rows({**r, "input": "맥락 " * (i % 9) * 4} for i, r in enumerate(Dataset.from_json(SAMPLE)
                                                                                      .select(range(n))))


def chat_rows(n=30):
    base = Dataset.from_json(SAMPLE).select(range(n))
    return Dataset.from_list([{"messages": [{"role": "system", "content": "짧게 " * (i % 7) * 5},
                                            {"role": "user", "content": r["instruction"]},
                                            {"role": "assistant", "content": r["output"]},
                                            {"role": "user", "content": "더?"},
                                            {"role": "assistant", "content": r["output"][:12]}]}
                              for i, r in enumerate(base)])


def layouts(tok):
    """(name, rows in a layout data.py gives the trainer, the SFTConfig loss setting training uses for them)."""
    pc = sample_rows()
    text = pc.map(lambda r: {"text": r["prompt"] + r["completion"]}, remove_columns=["prompt", "completion"])
    tok.chat_template = CHAT.text
    with_eos = pc.map(lambda r: {"completion": r["completion"] + tok.eos_token})
    return [("prompt/completion", pc, {"completion_only_loss": True}),
            ("the same with EOS", with_eos, {"completion_only_loss": True}),
            ("text", text, {"completion_only_loss": False}),
            ("chat", chat_rows(), {"assistant_only_loss": True})]


def first_label(labels) -> int:
    return next((i for i, x in enumerate(labels) if x != -100), len(labels))


ALL = ("prompt/completion", "the same with EOS", "text", "chat")


def same_as_trl(model, tok, counts=ALL, cut=ALL):
    """Token counts for the layouts in `counts`, verdicts at a cut for those in `cut` (an SFTTrainer costs a second
    or more with the real tokenizer: datasets hashes it for every map)."""
    for name, rows, loss in layouts(tok):
        if name not in counts:
            continue
        ours = list(lengths.measure(rows, tok))
        whole = trl_rows(model, tok, rows, None, **loss)  # no cut: every token TRL would train on
        assert [n for n, _ in ours] == [len(ids) for ids in whole["input_ids"]], name  # EOS and BOS counted
        if name != "text":  # where the loss starts is where we say the answer starts
            assert [s for _, s in ours] == [first_label(x) for x in whole["labels"]], name
        if name not in cut:
            continue
        cap = sorted(ours)[len(ours) // 3][1] + 2  # inside some prompts, inside many answers
        kept, report = lengths.fit_lengths(rows, tok, cap, train_on_inputs=name == "text")
        cut = trl_rows(model, tok, rows, cap, **loss)
        if name != "text":  # with the loss masked TRL drops answerless rows too: the same rows
            assert report["rows_dropped_too_long"] > 0, name
            assert len(cut) == len(kept) == len(rows) - report["rows_dropped_too_long"], name
            assert sorted(map(str, cut["prompt" if "prompt" in rows.column_names else "messages"])) == \
                sorted(map(str, kept["prompt" if "prompt" in rows.column_names else "messages"])), name
        assert report["answers_truncated"] == sum(n > cap for n, _ in lengths.measure(kept, tok)) > 0, name
        assert report["longest_tokens"] == max(len(ids) for ids in cut["input_ids"]) == cap, name
        assert report["longest_row_tokens"] == max(n for n, _ in ours), name


def test_counts_and_verdicts_match_what_the_trainer_prepares(model):
    same_as_trl(model, AutoTokenizer.from_pretrained(TINY))


@needs_fixture
def test_counts_and_verdicts_match_the_trainer_with_the_real_llama_tokenizer(model, tmp_path):
    same_as_trl(model, real_tokenizer(tmp_path), counts=("prompt/completion", "text", "chat"),
                cut=("prompt/completion", "chat"))


def test_train_on_inputs_never_trains_a_row_whose_answer_was_cut_away(model, caplog):
    tok = AutoTokenizer.from_pretrained(TINY)
    short = {"instruction": "안녕", "input": "", "output": "반가워요."}
    rows = completion_rows([short, {**short, "input": "긴 맥락 " * 40}])
    starts = [s for _, s in lengths.measure(rows, tok)]
    cap = starts[1] - 3  # the long row's prompt alone overflows it
    # TRL, training on every token, would keep the long row: a prompt cut short, no answer, no EOS.
    assert len(trl_rows(model, tok, rows, cap, completion_only_loss=False)) == 2
    with caplog.at_level(logging.INFO, logger="sftkit"):
        kept, report = lengths.fit_lengths(rows, tok, cap, train_on_inputs=True)
    assert len(kept) == 1 and kept[0]["completion"] == "반가워요."
    assert (report["rows_dropped_too_long"], report["answers_truncated"]) == (1, 0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "1 of 2 rows dropped" in said[0] and "answers cut" not in said[0]
    assert f"--max_seq_length {report['longest_row_tokens']} keeps every row" in said[0]


def test_no_row_left_is_one_line_with_the_counts_and_the_fix():
    tok = AutoTokenizer.from_pretrained(TINY)
    rows = completion_rows([{"instruction": "질문 " * 30, "input": "", "output": "답"}] * 3)
    with pytest.raises(UserError) as err:
        lengths.fit_lengths(rows, tok, 16, train_on_inputs=False)
    msg = str(err.value)
    assert "no row fits --max_seq_length 16" in msg and "all 3 rows" in msg and "Raise --max_seq_length" in msg


def test_rows_that_fit_are_kept_as_they_are_and_the_log_stays_quiet(caplog):
    tok = AutoTokenizer.from_pretrained(TINY)
    rows = completion_rows(Dataset.from_json(SAMPLE))
    with caplog.at_level(logging.INFO, logger="sftkit"):
        kept, report = lengths.fit_lengths(rows, tok, 1024, train_on_inputs=False)
    assert kept is rows and not caplog.records
    assert report == {"max_seq_length": 1024, "rows_checked": len(rows), "rows_dropped_too_long": 0,
                      "answers_truncated": 0, "longest_tokens": report["longest_row_tokens"],
                      "longest_row_tokens": max(n for n, _ in lengths.measure(rows, tok))}
    assert 0 < report["longest_tokens"] < 1024


def test_a_raw_text_row_is_cut_never_dropped():
    tok = AutoTokenizer.from_pretrained(TINY)
    rows = Dataset.from_list([{"text": "아주 긴 글 " * 50}, {"text": "짧은 글"}])
    kept, report = lengths.fit_lengths(rows, tok, 8, train_on_inputs=True)
    assert len(kept) == 2 and (report["rows_dropped_too_long"], report["answers_truncated"]) == (0, 1)
