"""Generation stops at every id of the model's generation_config.eos_token_id, not only the tokenizer's EOS: an
Instruct model ends turns with <|eot_id|> (128009), tool calls with <|eom_id|> (128008), text with
<|end_of_text|> (128001). Each is tested with a model trained to emit it, in the one-prompt (streamed), batch
and chat modes."""

from pathlib import Path

import pytest
import torch

from conftest import needs_fixture, real_tokenizer_model

pytestmark = needs_fixture
QUESTION = "비밀번호는 어떻게 만들까요?"


def trained_to_stop_with(stop_id: int, out: Path) -> str:
    """The Instruct layout's tiny model, trained (all weights, plain PyTorch) to answer QUESTION with "네" and then
    `stop_id`, under its own chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_tokenizer_model("instruct-meta", out)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    answer = tok("네", add_special_tokens=False)["input_ids"] + [stop_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()  # it learned the answer and its stop
    model.save_pretrained(path)
    return path


def run_folder_on(base: str, run: Path) -> str:
    """A run folder whose adapter starts as the identity (LoRA B = 0), on a model trained to stop at one id."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit import own_template
    from sftkit.runfolder import RunFolder
    from sftkit.runrecord import RunRecord

    template = own_template.from_tokenizer(AutoTokenizer.from_pretrained(base))
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    adapter.save_pretrained(run)
    RunFolder(run).save(RunRecord(status="finished", args={"model_name": base, "max_seq_length": 256,
                                                           "load_in_4bit": False},
                                  model_path=base, template=template.name, template_kind="chat",
                                  template_text=template.text))
    return str(run)


@pytest.mark.parametrize("stop_id", [128001, 128008, 128009])
def test_generation_stops_at_every_stop_id_in_every_mode(tmp_path, stop_id, capsys):
    from sftkit.generate import open_generator

    g = open_generator(model_name=trained_to_stop_with(stop_id, tmp_path / "m"), prompt="own", max_new_tokens=20)
    assert stop_id in g.stop_ids
    streamed = g.answer(QUESTION, stream=True)
    assert capsys.readouterr().out.strip() == "네"  # streamed, and nothing after the stop
    batch = g.answer_batch([{"instruction": QUESTION}, {"instruction": QUESTION}])
    chat = g.answer(QUESTION, history=[{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "안녕하세요"}])
    for result in (streamed, *batch):
        assert result == {"answer": "네", "stopped": "eos", "tokens": 1}, result
    assert chat["stopped"] == "eos" and chat["tokens"] < 20


def test_compare_base_stops_there_too(tmp_path):
    """--compare_base answers with the adapter off, then on: both must stop at <|eom_id|> (128008), which only the
    generation config lists. The run folder holds an adapter that starts as the identity (LoRA B = 0) on the
    model trained to emit it."""
    from sftkit.generate import open_generator

    g = open_generator(run_folder_on(trained_to_stop_with(128008, tmp_path / "m"), tmp_path / "run"),
                       max_new_tokens=20)
    for adapter_off in (True, False):
        assert g.answer(QUESTION, base=adapter_off) == {"answer": "네", "stopped": "eos", "tokens": 1}


def test_a_merged_base_trained_on_chat_stops_at_end_of_turn_in_plain_transformers(tmp_path):
    """A base model (EOS <|end_of_text|>, generation config 128001 alone) trained on Llama 3.1's chat template ends
    its turns with <|eot_id|>. --save_merged writes every stop id into the merged generation_config.json, so plain
    transformers (generate, pipeline, with no eos argument) stops there as infer.py does, instead of running on."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import write_jsonl
    from train_unsloth import train

    base = real_tokenizer_model("base-meta", tmp_path / "m")
    rows = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "네"}]}] * 8
    run = train(model_name=base, dataset=write_jsonl(tmp_path / "chat.jsonl", rows), prompt="llama-3.1-chat",
                max_steps=30, learning_rate=3e-2, warmup_steps=0, per_device_train_batch_size=8,
                gradient_accumulation_steps=1, save_steps=0, max_seq_length=128, output_dir=str(tmp_path / "run"),
                save_merged="16bit")
    merged = Path(run) / "merged-16bit"
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [128001, 128009]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert out == tok("네", add_special_tokens=False)["input_ids"] + [128009], out  # learned, and stopped there
