"""Untrained special-token rows: found for the template's tokens, set to the trained mean, or trained by peft."""

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import TINY, needs_fixture
from sftkit import own_template, prompts, special_tokens
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
    return untrained_fixture_base(tmp_path)


def untrained_fixture_base(tmp_path):
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
    own = own_template.from_tokenizer(instruct)
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


def test_target_modules_naming_the_embeddings_trains_them_in_full(tmp_path):
    """--target_modules ...,embed_tokens,lm_head (as Unsloth's notebooks write it): LoRA on the projections, both
    matrices trained in full (--train_embeddings), recorded, saved with the adapter and loaded back by infer.py."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import quick_args
    from sftkit.generate import open_generator
    from train_unsloth import train

    out = train(**quick_args(tmp_path, target_modules="q_proj,v_proj,embed_tokens,lm_head", max_steps=3,
                             save_steps=0))
    assert json.loads((Path(out) / "run.json").read_text())["tokens"]["special"]["train_embeddings"] is True
    saved = load_file(str(Path(out) / "adapter_model.safetensors"))
    emb = [v for k, v in saved.items() if "embed_tokens" in k]
    assert len(emb) == 1 and any("lm_head" in k for k in saved) and any("lora_A" in k for k in saved)
    ids = torch.tensor([[0, 5, 100, 1000]])
    assert not torch.allclose(emb[0][ids[0]].float(), AutoModelForCausalLM.from_pretrained(TINY)
                              .get_input_embeddings()(ids)[0].float())  # trained: not the base's rows
    g = open_generator(out, max_new_tokens=4)
    torch.testing.assert_close(g.model.get_input_embeddings()(ids.to(g.device))[0].float().cpu(),
                               emb[0][ids[0]].float())
