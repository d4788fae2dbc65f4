"""Stop ids: every EOS of the generation config, the tokenizer's EOS and the template's end of turn; generate stops
at each of them."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from conftest import FIXTURE, TINY, needs_fixture
from sftkit import own_template, prompts, stopping
from test_chat_template import fixture_model, fixture_tokenizer


class EmitAt(LogitsProcessor):
    """Makes the model write `token` as its `step`-th new token and no stop id before it: a model trained to end
    its answers with that token, without the training."""

    def __init__(self, prompt_len: int, step: int, token: int, stops):
        self.prompt_len, self.step, self.token, self.stops = prompt_len, step, token, list(stops)

    def __call__(self, input_ids, scores):
        scores[:, self.stops] = -float("inf")
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores[:, :] = -float("inf")
            scores[:, self.token] = 0.0
        return scores


def generate(model, tok, template, token, step=3, max_new_tokens=12):
    kwargs = stopping.generate_kwargs(tok, template, model.generation_config)
    ids = prompts.prompt_ids(prompts.attach(tok, template), template, "안녕하세요")
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList(
                                 [EmitAt(len(ids), step, token, kwargs["eos_token_id"])]), **kwargs)
    return stopping.cut_answer(tok, template, out[0, len(ids):].tolist(), kwargs["eos_token_id"])


@needs_fixture
@pytest.mark.parametrize("flavour, template, expected", [
    ("base-meta", "alpaca_ko", [128001]),
    ("base-meta", "llama-3.1-chat", [128001, 128009]),
    ("base-unsloth", "llama-3.1-chat", [128001, 128009]),
    ("instruct-meta", "alpaca_ko", [128001, 128008, 128009]),
    ("instruct-meta", "own", [128001, 128008, 128009]),
])
def test_stop_ids_of_the_fixture_layouts(flavour, template, expected):
    tok = fixture_tokenizer(flavour)
    config = GenerationConfig.from_pretrained(FIXTURE / flavour)
    t = own_template.from_tokenizer(tok) if template == "own" else prompts.load(template)
    assert stopping.stop_ids(tok, t, config) == expected
    kwargs = stopping.generate_kwargs(tok, t, config)
    assert kwargs["eos_token_id"] == expected and "stop_strings" not in kwargs
    assert kwargs["pad_token_id"] == (128004 if flavour == "base-unsloth" else expected[0])


def test_stop_ids_of_the_shipped_model():
    tok = AutoTokenizer.from_pretrained(TINY)
    config = GenerationConfig.from_pretrained(TINY)
    assert stopping.stop_ids(tok, prompts.load("alpaca_ko"), config) == [1]
    assert stopping.stop_ids(tok, prompts.load("llama-3.1-chat"), config) == [1, 4]
    assert stopping.stop_ids(tok, prompts.load("llama-3.1-chat")) == [1, 4]  # without a generation config too
    chatml = stopping.generate_kwargs(tok, prompts.load("chatml"), config)  # <|im_end|> is text in this vocabulary
    assert chatml["eos_token_id"] == [1] and chatml["stop_strings"] == ["<|im_end|>"]
    assert stopping.cut_answer(tok, prompts.load("chatml"), tok.encode("네<|im_end|>더", add_special_tokens=False),
                           [1]) [:2] == ("네", True)


@pytest.mark.parametrize("token", [1, 4])
def test_generation_stops_at_each_stop_id_of_the_shipped_model(token):
    model, tok = AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY)
    answer, stopped, tokens = generate(model, tok, prompts.load("llama-3.1-chat"), token)
    assert stopped and tokens == 3


def test_a_row_that_never_writes_a_stop_runs_to_the_limit():
    model, tok = AutoModelForCausalLM.from_pretrained(TINY), AutoTokenizer.from_pretrained(TINY)
    answer, stopped, tokens = generate(model, tok, prompts.load("llama-3.1-chat"), token=7, max_new_tokens=6)
    assert not stopped and tokens == 6


@needs_fixture
@pytest.mark.parametrize("token", [128001, 128008, 128009])
def test_generation_stops_at_each_stop_id_of_the_instruct_layout(token, tmp_path):
    tok = fixture_tokenizer("instruct-meta")
    model = fixture_model("instruct-meta", tmp_path)
    model.generation_config = GenerationConfig.from_pretrained(FIXTURE / "instruct-meta")
    answer, stopped, tokens = generate(model, tok, own_template.from_tokenizer(tok), token)
    assert stopped and tokens == 3
