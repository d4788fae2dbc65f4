import pytest
from transformers import AutoConfig, LlamaConfig

from conftest import TINY
from sftkit import backend
from sftkit.errors import UserError


def test_dtype_follows_the_hardware():
    assert backend.choose_dtype("auto", False)[0] == "fp32"
    dt, why = backend.choose_dtype("auto", True, (7, 5), "Tesla T4")
    assert dt == "fp16" and "no native bf16" in why  # a T4 claims bf16 through emulation; we do not trust it
    assert backend.choose_dtype("auto", True, (8, 0), "A100")[0] == "bf16"
    assert backend.choose_dtype("fp16", True, (9, 0), "H100")[0] == "fp16"


def test_bf16_on_a_t4_is_a_clear_error():
    with pytest.raises(UserError, match=r"Tesla T4.*7\.5.*--dtype fp16"):
        backend.choose_dtype("bf16", True, (7, 5), "Tesla T4")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        backend.choose_dtype("fp16", False)
    with pytest.raises(UserError, match="not one of"):
        backend.choose_dtype("fp8", False)


def test_cpu_choice_is_hf_and_says_why(caplog):
    caplog.set_level("INFO", logger="sftkit")
    c = backend.choose("auto", "auto")
    assert (c.backend, c.device, c.dtype) == ("hf", "cpu", "fp32")
    assert "Unsloth needs one" in c.reason
    assert any("backend=hf" in r.message and "because" in r.message for r in caplog.records)
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        backend.choose("unsloth", "auto")


def test_rope_keeps_native_llama3_and_scales_others_linearly():
    cfg = AutoConfig.from_pretrained(TINY)
    assert backend.extend_rope(cfg, 512) == ""  # inside the window: untouched
    msg = backend.extend_rope(cfg, 4096)
    assert "native llama3" in msg and cfg.max_position_embeddings == 4096
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    plain = LlamaConfig(max_position_embeddings=1024, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    msg = backend.extend_rope(plain, 3072)
    assert "linear" in msg and plain.rope_parameters["rope_type"] == "linear"
    assert plain.rope_parameters["factor"] == pytest.approx(3.0) and plain.max_position_embeddings == 3072


def test_scaled_rope_reaches_past_the_window_on_the_tiny_model():
    import torch

    c = backend.choose("hf", "auto")
    model, tok, notes = backend.load_model(TINY, 2048, c, load_in_4bit=False)
    assert any("1024 -> 2048" in n for n in notes) and model.config.max_position_embeddings == 2048
    ids = torch.randint(10, 2000, (1, 1500))  # longer than the tiny model's 1024-token window
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 1500, model.config.vocab_size) and torch.isfinite(logits).all()


def test_model_path_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        backend.check_model_path("./no/such/model")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="without config.json.*infer.py --adapter"):
        backend.check_model_path(str(tmp_path))
    backend.check_model_path(TINY)  # a real model folder passes
    backend.check_model_path("unsloth/Meta-Llama-3.1-8B")  # a Hub id is left to the Hub
    with pytest.raises(UserError, match="does not exist"):  # deeper than owner/name: no Hub id, refused at once
        backend.check_model_path("work/examples/tiny-llama")


def test_a_name_neither_local_nor_loadable_from_the_hub_says_where_it_looked(tmp_path, monkeypatch):
    """From another folder, a relative path such as examples/tiny-llama reads as a Hub id: when the Hub cannot give
    it either, the error says the folder is not under the current one (the usual cause), not only the Hub's error."""
    from sftkit.backend import choose, models
    from sftkit.errors import UserError

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "_from_pretrained", offline)
    with pytest.raises(UserError, match=f"There is no folder 'examples/tiny-llama' in {tmp_path}.*relative to"):
        models.load_model("examples/tiny-llama", 64, choose("hf", "auto"))
