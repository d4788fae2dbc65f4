"""Exports: merged model, GGUF, Hub upload. None may put the finished adapter at risk or leak the token."""

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, quick_args
from sftkit.errors import UserError
from train_unsloth import train

SECRET = "hf_test_secret_never_written_0123456789"


def test_merged_16bit_loads_with_plain_transformers_and_matches_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors.torch import load_file

    out = train(**quick_args(tmp_path, save_merged="16bit"))
    merged_dir = Path(out) / "merged-16bit"
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["exports"]["merged"] == str(merged_dir)
    saved = load_file(str(merged_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # 16-bit on a CPU too, in the base's own dtype
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())  # really merged, no adapter left
    # Each weight is the fp32 merge of base + adapter, rounded once to bf16.
    exact = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32), out)
    exact = exact.merge_and_unload().state_dict()
    for name, weight in saved.items():
        assert torch.equal(weight, exact[name].to(torch.bfloat16)), name
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok("### 지시문:\n안녕하세요\n\n### 응답:\n", return_tensors="pt")["input_ids"]
    assert merged.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_bad_export_flags_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match="needs a CUDA GPU.*16bit"):
        train(**quick_args(tmp_path, save_merged="4bit"))
    with pytest.raises(UserError, match="HF_TOKEN"):
        train(**quick_args(tmp_path, push_to_hub="me/model"))
    with pytest.raises(UserError, match="not one of"):
        train(**quick_args(tmp_path, save_merged="8bit"))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_gguf_without_llama_cpp_is_refused_before_training_with_the_install_command(tmp_path, monkeypatch):
    import sys

    from sftkit import gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(UserError, match="GGUF export needs llama-cpp-python.*" + gguf.INSTALL.replace("(", ".")):
        train(**quick_args(tmp_path, save_gguf="q4_k_m"))
    assert not (tmp_path / "run").exists()  # known before anything was started
    with pytest.raises(UserError, match="did you mean q4_k_m"):
        train(**quick_args(tmp_path, save_gguf="q4_km"))


def test_gguf_export_on_the_plain_path_offline(tmp_path):
    """--save_gguf on the CPU path: a 16-bit merge that other loaders read (rope keys, 4.x tokenizer class), GGUF
    files from llama.cpp's own converter and quantizer, a tokenization check in llama.cpp, an Ollama Modelfile."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -r requirements-gguf.txt "
                        "with CMAKE_ARGS, see .ci/run)")
    from sftkit import modelfile

    out = train(**quick_args(tmp_path, max_steps=4, save_steps=0, save_gguf="f16,q8_0"))
    rec = json.loads((Path(out) / "run.json").read_text())
    files = rec["exports"]["gguf"]["files"]
    assert [Path(f).name for f in files] == ["model-f16.gguf", "model-q8_0.gguf"]
    assert all(Path(f).stat().st_size > 100_000 for f in files)
    merged = json.loads((Path(out) / "merged-16bit" / "config.json").read_text())
    assert merged["rope_theta"] and merged["rope_scaling"]["rope_type"] == "llama3"  # what llama.cpp and 4.x read
    card = modelfile.read_modelfile((Path(out) / "gguf" / "Modelfile").read_text(encoding="utf-8"))
    assert card["from"] == "./model-q8_0.gguf" and "### 응답:\n{{ .Response }}" in card["template"]
    assert rec["exports"]["gguf"]["ollama"][0].endswith("ollama create run -f Modelfile")


class FakeApi:
    def __init__(self, token=None):
        FakeApi.token, FakeApi.calls = token, []

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))


def test_push_uses_the_env_token_and_never_saves_or_prints_it(tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = train(**quick_args(tmp_path, push_to_hub="me/tiny-ko"))
    assert FakeApi.token == SECRET  # handed to the client in memory
    (_, repo, kw), (_, upload) = FakeApi.calls
    assert repo == "me/tiny-ko" and kw["private"] is True
    staged = Path(upload["folder_path"])
    assert staged == Path(out) / "hub-upload"
    assert json.loads((Path(out) / "run.json").read_text())["exports"]["hub"].endswith("me/tiny-ko")
    # What goes up: the adapter, its config, tokenizer, run.json and a model card; no checkpoint, no optimizer.
    names = {f.name for f in staged.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "run.json", "README.md"} <= names
    assert not any(n.startswith("checkpoint-") or n.endswith(".pt") for n in names)
    # No absolute local path anywhere in it (the tiny model, the data file and the run folder are all local).
    for f in staged.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md"):
            text = f.read_text(encoding="utf-8")
            assert str(tmp_path) not in text and "/work/" not in text and str(Path.cwd()) not in text, f
    assert json.loads((staged / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
    # The tokenizer goes up byte for byte: its merges ("/", "..") are data, not paths to scrub.
    assert (staged / "tokenizer.json").read_bytes() == (Path(out) / "tokenizer.json").read_bytes()
    card = (staged / "README.md").read_text(encoding="utf-8")
    for needed in ("base_model: tiny-llama", "korean_safe_sample.jsonl", "alpaca_ko", "r=16", "lr 0.01",
                   "python infer.py --adapter", "AutoPeftModelForCausalLM", "Ollama", "### 응답:"):
        assert needed in card, needed
    for f in Path(out).rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def test_the_plain_path_merges_on_the_cpu_when_the_16bit_base_would_not_fit_the_gpu():
    """--save_merged 16bit on the hf backend loads a fresh 16-bit base beside the training model: an 8B base is
    ~15 GiB, a whole T4, so there it must go to the CPU; small models stay on the GPU; 4-bit needs the GPU."""
    from sftkit.backend import merge_device, sixteen_bit_gib

    eight_b = sixteen_bit_gib("unsloth/Meta-Llama-3.1-8B")  # the built-in shape: no download
    assert 14.5 < eight_b < 15.5
    device, why = merge_device("16bit", eight_b, free_gib=8.5)  # a T4 with the 4-bit training model on it
    assert device == "CPU" and "does not fit the 8.5 GiB free" in why and "15 GiB of RAM" in why
    assert merge_device("16bit", eight_b, free_gib=70.0)[0] == "GPU"
    assert merge_device("4bit", eight_b, free_gib=8.5)[0] == "GPU"
    assert merge_device("16bit", sixteen_bit_gib(TINY), free_gib=8.5)[0] == "GPU"


def test_a_failed_upload_says_how_to_upload_without_training_again(tmp_path, monkeypatch, tiny_run):
    from sftkit.exports import push
    from sftkit.runfolder import RunFolder

    class Refused(FakeApi):
        def upload_folder(self, **kw):
            raise PermissionError("403: token has read access only")

    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = RunFolder(tiny_run)
    with pytest.raises(UserError) as err:
        push(tiny_run, "me/tiny-ko", folder, folder.read(), api=Refused(token=SECRET))
    msg = str(err.value)
    staged = Path(tiny_run) / "hub-upload"
    assert "403" in msg and f"hf upload me/tiny-ko {staged} . --private" in msg and SECRET not in msg
    assert (staged / "adapter_model.safetensors").is_file()  # the clean copy is there to upload again
