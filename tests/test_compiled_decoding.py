"""--cuda_graphs: transformers' compiled decoding, allowed for bitsandbytes 4-bit. The speed is a GPU matter
(benchmarks/bench_infer.py); here, on a CPU, that the 4-bit + LoRA decode step traces as one graph and decodes
the same tokens, and that the option's argument checks come before any model loads."""

import logging

import pytest

from conftest import TINY
from sftkit.errors import UserError
from sftkit.generate import compiled_decoding, open_generator

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_4bit_lora_decode_step_compiles_whole_and_keeps_the_tokens():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    # float32 compute: the static cache's masked attention over 64 slots sums in another order than the
    # dynamic cache's, which in bf16 can flip a near-tied greedy token of this random model; the question here is
    # whether the step compiles whole and computes the same thing.
    torch.manual_seed(0)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=q, dtype=torch.float32)  # CPU bnb
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=MODULES, init_lora_weights=False)).eval()
    base = lora.get_base_model()
    assert not base.hf_quantizer.is_compileable  # what transformers says on its own, so it would decode eagerly
    tok = AutoTokenizer.from_pretrained(TINY)
    ids = tok("### 지시문:\n안녕하세요\n\n### 응답:\n", return_tensors="pt")["input_ids"]
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)
    with torch.inference_mode():
        eager = lora.generate(input_ids=ids, **gen)
        kw = compiled_decoding(lora, backend="eager", max_cache_len=64)  # eager backend: no C++ compiler needed
        kw["compile_config"].fullgraph = True  # a graph break anywhere in the step is an error, not a fallback
        kw["compile_config"]._compile_all_devices = True  # transformers compiles on accelerators only unless told
        compiled = lora.generate(input_ids=ids, **gen, **kw)
    assert base.hf_quantizer.is_compileable and hasattr(base, "_compiled_call")
    assert torch.equal(eager.sequences, compiled.sequences)
    e, c = torch.stack(eager.logits), torch.stack(compiled.logits)
    assert ((c - e).norm() / e.norm()).item() < 1e-3  # measured 1.7e-4


def test_cuda_graphs_refuse_the_unsloth_backend_before_loading(no_model_load):
    with pytest.raises(UserError, match="use --backend auto"):
        open_generator(model_name=TINY, backend="unsloth", cuda_graphs=True)
    with pytest.raises(UserError, match="--backend 'hff' is not one of"):  # not silently turned into hf
        open_generator(model_name=TINY, backend="hff", cuda_graphs=True)


def test_cuda_graphs_on_a_cpu_loads_with_transformers_and_says_it_decodes_eagerly(caplog):
    with caplog.at_level(logging.INFO, logger="sftkit"):
        g = open_generator(model_name=TINY, cuda_graphs=True, max_new_tokens=4)
    assert g.choice.backend == "hf" and "compile_config" not in g.gen
    assert "no CUDA GPU, so decoding runs eagerly" in caplog.text
    assert "backend=hf device=cpu (CPU) dtype=fp32 because --cuda_graphs decodes with plain transformers" in caplog.text
    assert g.answer("안녕하세요")["tokens"] == 4


def test_a_quantizer_transformers_cannot_compile_stays_eager(caplog):
    """Only bitsandbytes 4-bit is let through; another non-compileable quantizer gets no static cache and no
    compile (so Generator.compiled stays False and batch mode does not pad)."""
    from types import SimpleNamespace

    model = SimpleNamespace(hf_quantizer=SimpleNamespace(is_compileable=False))
    with caplog.at_level(logging.INFO, logger="sftkit"):
        assert compiled_decoding(model, max_cache_len=64) == {}
    assert "does not compile SimpleNamespace models, so decoding stays eager" in caplog.text


def test_cuda_graphs_compile_only_on_gpus_where_they_were_checked(monkeypatch, caplog):
    """Below compute capability 8.0 (a T4) --cuda_graphs is dropped before the backend is chosen, so the user's
    backend stands (auto keeps Unsloth's fast generation there; --backend unsloth is not refused)."""
    from sftkit import generate
    from sftkit.generate import graphs_off_because

    assert not any(graphs_off_because(cc) for cc in ((9, 0), (8, 0), (8, 9)))  # H100/H200, A100, L4
    assert "compute capability 7.5" in graphs_off_because((7, 5)) and graphs_off_because((7, 0))  # T4, V100
    monkeypatch.setattr(generate, "cuda_available", lambda: True)
    monkeypatch.setattr(generate, "torch_capability", lambda: (7, 5))
    with caplog.at_level(logging.INFO, logger="sftkit"):
        g = open_generator(model_name=TINY, cuda_graphs=True, max_new_tokens=2)  # this CPU plays a T4
    assert "--cuda_graphs is off: compute capability 7.5" in caplog.text
    assert "because --cuda_graphs" not in caplog.text and "compile_config" not in g.gen
    with pytest.raises(UserError) as err:  # the refusal is about this CPU, no longer about --cuda_graphs
        open_generator(model_name=TINY, backend="unsloth", cuda_graphs=True)
    assert "use --backend auto" not in str(err.value)
