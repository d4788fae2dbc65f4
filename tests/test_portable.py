import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURE, TINY, needs_fixture
from sftkit.errors import UserError
from sftkit.portable import inv_freq_4x, legacy_rope, make_portable

TF4 = os.environ.get("TRANSFORMERS4_PATH", "")
needs_tf4 = pytest.mark.skipif(not TF4, reason="TRANSFORMERS4_PATH is not set; to check with transformers 4.x: pip "
                               "install --no-deps --target DIR transformers==4.57.6 tokenizers==0.22.2 "
                               "huggingface_hub==0.36.2, then TRANSFORMERS4_PATH=DIR")


def inv_freq_5x(folder):
    """RoPE inverse frequencies as this transformers (5.x) computes them for a model folder."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(folder)
    kind = cfg.rope_parameters["rope_type"]
    if kind == "default":
        theta = cfg.rope_parameters["rope_theta"]
        return 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    return ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")[0].double()


def saved_by_5x(src, out, tokenizer_from=None):
    """A folder as transformers 5 writes a merged model: config.json and tokenizer files in its own layout."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(src).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_from or src).save_pretrained(out)
    return out


def fixture_folder(tmp_path, flavour):
    out = tmp_path / flavour
    shutil.copytree(FIXTURE / flavour, out)
    shutil.copy(FIXTURE / "tokenizer.json", out / "tokenizer.json")
    return out


def test_transformers5_layout_loses_rope_for_4x_and_make_portable_restores_it(tmp_path):
    source = json.loads((Path(TINY) / "config.json").read_text())
    out = saved_by_5x(TINY, tmp_path / "merged")
    before = json.loads((out / "config.json").read_text())
    assert "rope_theta" not in before  # the bug: 4.x falls back to 10000 and no scaling
    assert not torch.allclose(torch.tensor(inv_freq_4x(before), dtype=torch.float64), inv_freq_5x(TINY))
    done = make_portable(str(out), source)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and done["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    want = inv_freq_5x(TINY)  # the source model, as transformers 5 reads it
    assert torch.allclose(torch.tensor(inv_freq_4x(cfg), dtype=torch.float64), want, rtol=1e-6)
    assert torch.allclose(inv_freq_5x(out), want, rtol=1e-6)  # and 5.x reads the portable folder the same
    assert cfg["pad_token_id"] == 5 and cfg["torch_dtype"] == cfg["dtype"]


@needs_fixture
def test_llama31_source_keys_are_kept_verbatim(tmp_path):
    src = fixture_folder(tmp_path, "base-unsloth")
    source = json.loads((src / "config.json").read_text())
    out = saved_by_5x(src, tmp_path / "merged")
    make_portable(str(out), source)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == source["rope_theta"] == 500000.0
    assert cfg["rope_scaling"] == source["rope_scaling"]  # same keys, same spelling as the Hub's config
    assert cfg["rope_parameters"] == {**source["rope_scaling"], "rope_theta": 500000.0}
    for freqs in (inv_freq_4x(cfg), inv_freq_4x(source)):
        assert torch.allclose(torch.tensor(freqs, dtype=torch.float64), inv_freq_5x(src), rtol=1e-6)
    assert cfg["pad_token_id"] == 128004


@needs_fixture
def test_tokenizer_config_loads_with_an_old_class_and_gets_a_pad_token(tmp_path):
    from transformers import AutoTokenizer

    src = fixture_folder(tmp_path, "base-meta")  # meta-llama/Llama-3.1-8B: no pad token
    out = saved_by_5x(src, tmp_path / "merged")
    before = AutoTokenizer.from_pretrained(out)
    assert before.pad_token is None
    make_portable(str(out), json.loads((src / "config.json").read_text()))
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "is_local" not in tok_cfg and "local_files_only" not in tok_cfg
    after = AutoTokenizer.from_pretrained(out)
    assert after.pad_token == "<|finetune_right_pad_id|>" and after.pad_token_id == 128004
    text = "아래는 작업을 설명하는 지시문입니다.\n\n### 응답:\n"
    assert after(text)["input_ids"] == before(text)["input_ids"]
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 128004


def test_run_folder_without_config_gets_its_tokenizer_fixed(tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(TINY).save_pretrained(tmp_path)
    done = make_portable(str(tmp_path))
    assert done == {"tokenizer": {"pad_token": "<|finetune_right_pad_id|>", "pad_token_id": 5}}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (tmp_path / "config.json").exists()


def test_rope_scaled_in_training_is_kept(tmp_path):
    """A --max_seq_length past the model's window scales RoPE on purpose: the merged model's own value wins."""
    out = saved_by_5x(TINY, tmp_path / "merged")
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    (out / "config.json").write_text(json.dumps(cfg))
    make_portable(str(out), json.loads((Path(TINY) / "config.json").read_text()))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["rope_theta"] == 500000.0
    assert legacy_rope(cfg) == (500000.0, {"rope_type": "linear", "factor": 2.0})


def test_not_a_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--save_merged 16bit"):
        make_portable(str(tmp_path / "missing"), {})


TF4_PROBE = """
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], sys.argv[2]
cfg = AutoConfig.from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
ids = tok(text, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0, -1].tolist()
print(json.dumps({"version": transformers.__version__, "rope_theta": cfg.rope_theta,
                  "rope_scaling": cfg.rope_scaling, "pad": tok.pad_token_id, "ids": ids[0].tolist(),
                  "logits": logits}))
"""


@needs_tf4
def test_transformers4_reads_the_portable_folder_like_transformers5(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    AutoModelForCausalLM.from_pretrained(TINY).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    make_portable(str(out), json.loads((Path(TINY) / "config.json").read_text()))
    text = "### 지시문:\n" + "긴 문장으로 위치가 멀리 가도록 " * 12 + "\n\n### 응답:\n"  # far positions: RoPE matters
    env = dict(os.environ, PYTHONPATH=TF4)
    done = subprocess.run([sys.executable, "-c", TF4_PROBE, str(out), text], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    assert old["version"].startswith("4.")
    assert old["rope_theta"] == 500000.0 and old["rope_scaling"]["rope_type"] == "llama3" and old["pad"] == 5
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert old["ids"] == ids[0].tolist()
    with torch.no_grad():
        new = model(ids).logits[0, -1]
    assert torch.allclose(torch.tensor(old["logits"]), new, atol=1e-4)
