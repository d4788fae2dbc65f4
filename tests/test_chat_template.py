"""--prompt auto and the model's own chat template, token by token on the real Llama 3.1 tokenizer (fixture)."""

import datetime
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import FIXTURE, TINY, needs_fixture
from sftkit import own_template, prompts
from sftkit.errors import UserError

BOS, HEADER_START, HEADER_END = 128000, 128006, 128007
CHAT = [{"role": "system", "content": "너는 짧게 답한다."}, {"role": "user", "content": "김치찌개 끓이는 법?"},
        {"role": "assistant", "content": "김치를 볶고 물을 부으세요."}, {"role": "user", "content": "더 짧게"},
        {"role": "assistant", "content": "볶고 끓여요."}]


def fixture_dir(flavour: str, out: Path) -> Path:
    """A model folder as the Hub has it (tokenizer and config, no weights) for one fixture flavour."""
    out.mkdir(parents=True, exist_ok=True)
    for f in (FIXTURE / flavour).iterdir():
        shutil.copy(f, out / f.name)
    shutil.copy(FIXTURE / "tokenizer.json", out / "tokenizer.json")
    return out


_LOADED = {}  # flavour -> (tokenizer, its own chat template): loading the 17 MB tokenizer takes seconds


def fixture_tokenizer(flavour: str):
    """The flavour's tokenizer, loaded once per session, handed back as loaded (template, padding, pad token)."""
    from transformers import AutoTokenizer

    if flavour not in _LOADED:
        tok = AutoTokenizer.from_pretrained(fixture_dir(flavour, Path(tempfile.mkdtemp()) / flavour))
        _LOADED[flavour] = tok, tok.chat_template, tok.padding_side, tok.pad_token
    tok, own, side, pad = _LOADED[flavour]
    tok.chat_template, tok.padding_side, tok.pad_token = own, side, pad  # TRL sets a pad token where none was
    return tok


def fixture_model(flavour: str, out: Path):
    """A tiny random Llama (2 layers, hidden 64) with the full 128,256-token vocabulary, in float32 for the CPU."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(AutoConfig.from_pretrained(fixture_dir(flavour, out))).float()


@pytest.fixture
def instruct():
    return fixture_tokenizer("instruct-meta")


def trl_row(tokenizer, conversation, tmp_path):
    """TRL's own preparation and collator, as training runs them: (input ids, labels) of one chat row."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = fixture_model("instruct-meta", tmp_path / "model")
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", assistant_only_loss=True, max_length=512,
                     use_cpu=True, bf16=False)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, args=args,
                         train_dataset=Dataset.from_list([{"messages": conversation}]))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def expected_labels(tokenizer, ids, conversation):
    """Independently of any mask code: after each assistant header, the trimmed content's tokens and <|eot_id|>."""
    start, end, eot = tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    header = [start, *tokenizer.encode("assistant", add_special_tokens=False), end,
              *tokenizer.encode("\n\n", add_special_tokens=False)]
    answers = [m["content"].strip() for m in conversation if m["role"] == "assistant"]
    labels, i = [-100] * len(ids), 0
    for answer in answers:
        while ids[i:i + len(header)] != header:
            i += 1
        i += len(header)
        span = tokenizer.encode(answer, add_special_tokens=False) + [eot]
        assert ids[i:i + len(span)] == span
        labels[i:i + len(span)] = span
        i += len(span)
    return labels


@needs_fixture
@pytest.mark.parametrize("conversation", [CHAT, CHAT[1:]], ids=["system-turn", "default-system-block"])
def test_instruct_template_trains_on_assistant_turns_only(instruct, conversation, tmp_path):
    template, reason = prompts.for_data("auto", "chat", instruct)
    assert template.name == "own" and template.stop == "<|eot_id|>" and "own template" in reason
    prompts.attach(instruct, template)
    ids, labels = trl_row(instruct, conversation, tmp_path)
    assert labels == expected_labels(instruct, ids, conversation)  # content + <|eot_id|> of each answer, nothing else
    assert ids.count(BOS) == 1 and ids[0] == BOS
    text = instruct.decode(ids)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in text  # Meta's system block
    if conversation[0]["role"] == "system":
        assert "Today Date: 26 Jul 2024\n\n너는 짧게 답한다.<|eot_id|>" in text  # the row's system turn, inside it
    trained = {i for i, label in enumerate(labels) if label != -100}
    assert not trained & {i for i, t in enumerate(ids) if t in (BOS, HEADER_START, HEADER_END)}


@needs_fixture
def test_inference_prompt_is_the_training_prefix(instruct, tmp_path):
    template, _ = prompts.for_data("auto", "chat", instruct)
    prompts.attach(instruct, template)
    ids, labels = trl_row(instruct, CHAT[:3], tmp_path)
    first_answer = next(i for i, label in enumerate(labels) if label != -100)
    asked = prompts.prompt_ids(instruct, template, CHAT[1]["content"], system=CHAT[0]["content"])
    assert asked == ids[:first_answer]  # --system renders the system block exactly as training did
    plain = prompts.prompt_ids(instruct, template, "안녕")
    assert instruct.decode(plain).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                             "Cutting Knowledge Date")  # the default block without --system


@needs_fixture
def test_tagged_template_renders_exactly_as_metas(instruct):
    original = json.loads((FIXTURE / "instruct-meta" / "tokenizer_config.json").read_text())["chat_template"]
    instruct.chat_template = original
    template = own_template.from_tokenizer(instruct)
    assert "{% generation %}" not in original and "{% generation %}" in template.text
    for conv in (CHAT, CHAT[1:], CHAT[1:3]):
        for gen in (False, True):
            msgs = conv[:-1] if gen else conv
            assert (instruct.apply_chat_template(msgs, chat_template=template.text, tokenize=False,
                                                 add_generation_prompt=gen)
                    == instruct.apply_chat_template(msgs, chat_template=original, tokenize=False,
                                                    add_generation_prompt=gen))
    ids, mask = own_template.prefix_mask(instruct, CHAT, original)  # the same spans, found by rendering prefixes
    assert ids == instruct.apply_chat_template(CHAT, chat_template=template.text, return_dict=True)["input_ids"]
    assert instruct.decode([t for t, m in zip(ids, mask) if m]) == "김치를 볶고 물을 부으세요.<|eot_id|>볶고 끓여요.<|eot_id|>"


@needs_fixture
def test_a_clock_date_is_pinned_at_training(tmp_path, monkeypatch):
    import trl
    import transformers.utils.chat_template_utils as ctu

    tok = fixture_tokenizer("base-meta")
    llama32 = Path(trl.__file__).parent / "chat_templates" / "llama3_2.jinja"  # Meta's 3.2 template: strftime_now
    tok.chat_template = llama32.read_text(encoding="utf-8")
    template, _ = prompts.for_data("auto", "chat", tok)
    today = datetime.date.today().strftime("%d %b %Y")

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 1, 2)

    monkeypatch.setattr(ctu, "datetime", Later)  # inference on a later day
    saved = prompts.from_text(template.name, template.text, "chat")  # as infer.py rebuilds it from run.json
    later = tok.apply_chat_template(CHAT[1:2], chat_template=saved.text, tokenize=False)
    assert f"Today Date: {today}\n" in later
    assert "02 Jan 2031" in tok.apply_chat_template(CHAT[1:2], tokenize=False)  # the unpinned original drifts


@needs_fixture
@pytest.mark.parametrize("flavour", ["base-meta", "base-unsloth", "instruct-meta"])
def test_auto_policy_on_the_fixture_layouts(flavour, tmp_path):
    tok = fixture_tokenizer(flavour)
    assert prompts.for_data("auto", "alpaca", tok)[0].name == "alpaca_ko"
    assert prompts.for_data("auto", "text", tok)[0].kind == "text"
    assert prompts.for_data("chatml", "chat", tok)[0].name == "chatml"  # an explicit name is kept
    chat, reason = prompts.for_data("auto", "chat", tok)
    assert chat.name == ("own" if flavour == "instruct-meta" else "llama-3.1-chat")
    assert ("own template" if flavour == "instruct-meta" else "no chat template of its own") in reason


def test_auto_policy_on_the_shipped_model():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    template, reason = prompts.for_data("auto", "chat", tok)
    assert template.name == "llama-3.1-chat" and "base model" in reason
    with pytest.raises(UserError, match="no chat template of its own"):
        prompts.for_data("own", "chat", tok)


def test_a_template_that_cannot_be_tagged_needs_train_on_inputs():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    tok.chat_template = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + "
                         "m['content'] + '<|eot_id|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}"
                         "{% endif %}")
    with pytest.raises(UserError, match="--train_on_inputs"):
        prompts.for_data("auto", "chat", tok)
    template, _ = prompts.for_data("auto", "chat", tok, answers_only=False)  # whole conversations: usable as it is
    assert template.stop == "<|eot_id|>"
    ids, mask = own_template.prefix_mask(tok, CHAT[1:3], template.text)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "김치를 볶고 물을 부으세요.<|eot_id|>"


def test_attach_puts_only_chat_templates_on_the_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    before = tok.chat_template
    prompts.attach(tok, prompts.load("alpaca_ko"))
    assert tok.chat_template == before
    chat = prompts.load("llama-3.1-chat")
    assert prompts.attach(tok, chat).chat_template == chat.text


# --- On the GPU: the same through Unsloth's patched trainer ----------------------------------------------------

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unsloth_tiny():
    """The shipped tiny model through Unsloth in 4-bit, and Unsloth's FastLanguageModel."""
    import unsloth  # noqa: F401 - before trl, so that it patches SFTTrainer
    import torch
    from unsloth import FastLanguageModel

    dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    model, tok = FastLanguageModel.from_pretrained(TINY, max_seq_length=256, load_in_4bit=True, dtype=dtype)
    return model, tok, FastLanguageModel


def unsloth_trainer(model, tok, fast, rows, tmp_path, lora_kwargs=None, **config):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = fast.get_peft_model(model, r=4, lora_alpha=4, target_modules=MODULES, random_state=0,
                                **(lora_kwargs or {}))
    bf16 = torch.cuda.get_device_capability()[0] >= 8
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=256, max_steps=2,
                     per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, bf16=bf16, fp16=not bf16,
                     **config)
    return SFTTrainer(model=model, processing_class=tok, args=args, train_dataset=Dataset.from_list(rows))


@pytest.mark.gpu
def test_unsloth_trains_on_the_assistant_turns_of_metas_template(tmp_path):
    import trl

    model, tok, fast = unsloth_tiny()
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja").read_text(encoding="utf-8")
    template, _ = prompts.for_data("auto", "chat", tok)  # Meta's 3.1 template, as TRL ships it for comparison
    prompts.attach(tok, template)
    trainer = unsloth_trainer(model, tok, fast, [{"messages": CHAT}] * 4, tmp_path, assistant_only_loss=True)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert labels == expected_labels(tok, ids, CHAT) and ids.count(tok.bos_token_id) == 1
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # trained, no NaN
