"""Special tokens on the GPU, on the real Llama 3.1 tokenizer: the rows a base model never trained, carried by an
adapter trained through Unsloth and loaded back through Unsloth; and the stop ids only the generation config lists,
in the modes that exist only on a GPU (--cuda_graphs) or decode through Unsloth (--compare_base)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fixture, quick_args, real_tokenizer_model, write_jsonl
from test_stop_tokens import QUESTION

pytestmark = [pytest.mark.gpu, needs_fixture]
ROOT = Path(__file__).resolve().parent.parent
HEADERS_EOT = [128006, 128007, 128009]  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>


def base_with_untrained_rows(out: Path) -> str:
    """The base layout (no chat template) with its chat control-token rows as in the real base model: zero input
    rows, output rows one repeated vector."""
    from safetensors.torch import load_file, save_file

    path = real_tokenizer_model("base-meta", out)
    w = load_file(str(Path(path) / "model.safetensors"))
    w["model.embed_tokens.weight"][HEADERS_EOT] = 0
    w["lm_head.weight"][HEADERS_EOT] = w["lm_head.weight"][5].clone()
    save_file(w, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_rows_set_during_unsloth_training_come_back_with_the_adapter_through_unsloth(tmp_path):
    """Chat data on a base model through Unsloth: the untrained rows are found, set by Unsloth's own fix and trained
    as trainable tokens; infer.py's loader (Unsloth again, base rows zero on disk) gets them back from the adapter
    and answers."""
    from sftkit.generate import open_generator
    from train_unsloth import train

    model = base_with_untrained_rows(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"답변 {i}"}]}
            for i in range(16)]
    out = train(**quick_args(tmp_path, model_name=model, dataset=write_jsonl(tmp_path / "d.jsonl", rows),
                             backend="unsloth", max_steps=6, max_seq_length=256, save_steps=0))
    rec = json.loads((Path(out) / "run.json").read_text())
    assert rec["template"] == "llama-3.1-chat" and rec["backend"]["backend"] == "unsloth"
    assert set(rec["tokens"]["special"]["untrained"]) >= {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    # set by Unsloth's own fix (its fix_untrained_tokens), with nothing left for sftkit's
    assert rec["tokens"]["special"]["set_by_backend"] == rec["tokens"]["special"]["untrained"]
    assert rec["tokens"]["special"]["set_by_sftkit"] == []
    from safetensors.torch import load_file

    carried = {k.split(".token_adapter")[0].rsplit(".", 1)[-1]: v.float() for k, v in
               load_file(str(Path(out) / "adapter_model.safetensors")).items() if "trainable_tokens_delta" in k}
    assert set(carried) == {"embed_tokens", "lm_head"} and carried["embed_tokens"].abs().sum(dim=1).gt(0).all()
    g = open_generator(out, max_new_tokens=8)
    assert g.choice.backend == "unsloth"
    got = g.model.get_input_embeddings()(torch.tensor([HEADERS_EOT], device=g.device))[0].float().cpu()
    # the adapter's rows, not the zero rows of the base on disk (16-bit on the GPU: close, not equal)
    torch.testing.assert_close(got, carried["embed_tokens"], rtol=1e-2, atol=1e-3)
    answer = g.answer("질문 3")
    print(answer)
    assert answer["tokens"] >= 1


def test_cuda_graphs_and_compare_base_stop_at_an_id_only_the_generation_config_lists(tmp_path):
    """A model trained to answer and then emit <|eom_id|> (128008, not the tokenizer's EOS): infer.py stops
    there with --cuda_graphs (a batch file; compiled decoding where the GPU is 8.0+) and with --compare_base (through
    Unsloth)."""
    # Trained in a process of its own: Unsloth, imported by other GPU tests, has patched transformers' Llama in this
    # one with kernels that take CUDA tensors only (the first run here failed so, in the helper, not in infer.py).
    made = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                           "from test_stop_tokens import run_folder_on, trained_to_stop_with; "
                           "print(run_folder_on(trained_to_stop_with(128008, sys.argv[1]), Path(sys.argv[2])))",
                           str(tmp_path / "m"), str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=Path(__file__).parent, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert made.returncode == 0, made.stderr[-3000:]
    run = made.stdout.strip().splitlines()[-1]
    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": QUESTION}] * 3)
    dst = tmp_path / "a.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", run, "--input_file", str(src),
                           "--output_file", str(dst), "--batch_size", "2", "--max_new_tokens", "20", "--cuda_graphs"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from sftkit.generate import graphs_off_because

    off = graphs_off_because(torch.cuda.get_device_capability())  # a T4 decodes eagerly, and says so
    assert (f"--cuda_graphs is off: {off}" if off else "decoding through CUDA graphs") in done.stderr
    answers = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [(a["answer"], a["stopped"]) for a in answers] == [("네", "eos")] * 3, answers
    cmp = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", run, "--instruction", QUESTION,
                          "--max_new_tokens", "20", "--compare_base"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    print(cmp.stdout[-800:])
    assert "backend=unsloth" in cmp.stderr  # auto on a GPU: Unsloth's fast generation
    # both answers (adapter off, then on, each under its === header) are exactly the trained word: nothing past
    # the stop id
    answers = [line.strip() for line in cmp.stdout.splitlines() if line.strip() and not line.startswith("===")]
    assert answers[-2:] == ["네", "네"], cmp.stdout[-800:]
