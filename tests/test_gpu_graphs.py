"""Compiled decoding on a CUDA GPU (--cuda_graphs): the decode step compiled into CUDA graphs gives eager
decoding's tokens, in each mode, and infer.py --cuda_graphs answers like eager. Skipped elsewhere (conftest.py)."""

import json
from pathlib import Path

import pytest

from conftest import SAMPLE, graphs_off, write_jsonl

pytestmark = pytest.mark.gpu


COMPILED_VS_EAGER = """
import json, sys, torch
from sftkit.generate import compiled_decoding, open_generator
g = open_generator(sys.argv[1], backend="hf", max_new_tokens=12)
ids = torch.tensor([g.prompt_ids("비밀번호를 안전하게 만드는 방법은?")], device=g.device)
gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=g.gen["pad_token_id"],
           output_logits=True, return_dict_in_generate=True)
with torch.inference_mode():
    eager = g.model.generate(input_ids=ids, **gen)
    mode = sys.argv[2]  # inductor | fused (inductor's kernels, no graphs) | cudagraphs (graphs of the eager kernels)
    kw = compiled_decoding(g.model, backend=mode if mode == "cudagraphs" else "inductor")  # | static (cache alone)
    if mode == "fused":
        from transformers import CompileConfig
        kw = {**kw, "compile_config": CompileConfig(mode="default")}
    kw = {**kw, "disable_compile": True} if mode == "static" else kw
    runs = [g.model.generate(input_ids=ids, **gen, **kw) for _ in range(2)]  # the second replays the graphs
e = torch.stack(eager.logits).float()  # (steps, 1, vocab)
new = eager.sequences[0, ids.shape[1]:]
first = [next((i for i, (a, b) in enumerate(zip(new, r.sequences[0, ids.shape[1]:])) if a != b), None) for r in runs]
top2 = e[:, 0].topk(2).values  # eager's margin between its best two tokens at each step: a near-tie flips easily
print(json.dumps({"compiled": hasattr(g.model.get_base_model(), "_compiled_call"),
                  "same_tokens": [torch.equal(eager.sequences, r.sequences) for r in runs],
                  "rel_diff": [((torch.stack(r.logits).float() - e).norm() / e.norm()).item() for r in runs],
                  # the first step has the same context in both: a kernel difference, not a divergence, shows here
                  "step0_rel_diff": [((r.logits[0].float() - e[0]).norm() / e[0].norm()).item() for r in runs],
                  "first_diverging_step": first,
                  "eager_margin_there": [None if i is None else (top2[i, 0] - top2[i, 1]).item() for i in first]}))
"""


@pytest.mark.parametrize("mode", ["inductor", "fused", "cudagraphs", "static"])
def test_compiled_decoding_of_a_4bit_adapter_matches_eager(unsloth_run, tmp_path, mode):
    """compiled_decoding lets transformers compile the 4-bit decode step into CUDA graphs (it refuses bitsandbytes
    on its own). In a process of its own: Unsloth, imported by the other tests, patches transformers' Llama. The
    modes take it apart (for an fp16-trained adapter inductor's tokens differed, bare and capped; the last two
    matched): inductor's fused kernels in graphs (what --cuda_graphs runs), its kernels without graphs, the eager
    kernels recorded into graphs, and the static KV cache alone."""
    import os
    import subprocess
    import sys

    script = tmp_path / "compiled.py"
    script.write_text(COMPILED_VS_EAGER)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), unsloth_run, mode], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    print(mode, res)
    assert res["compiled"] == (mode != "static")
    same = all(res["same_tokens"]) and max(res["rel_diff"]) < 0.02  # bf16 kernels fused differently: close
    off = graphs_off(unsloth_run)
    if not same and mode in ("inductor", "fused") and off:
        # Where --cuda_graphs does not compile (below 8.0; an fp16-trained adapter, whose inductor tokens differed
        # bare and capped) a mismatch of inductor's kernels is known, not the product's; reported with the
        # figures that tell a kernel difference (step 0) from a near-tie that flipped (the margin).
        pytest.xfail(f"--cuda_graphs is off here ({off}); {mode}: {res}")
    assert same, res


@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_infer_cli_cuda_graphs_batch_answers_like_eager(unsloth_run, tmp_path, merged):
    """infer.py --cuda_graphs end to end on the GPU: a file of 5 prompts in batches of 2 (the last padded), the
    same answers as eager plain-transformers decoding of the same weights (adapter, or merged into the 4-bit
    base), and the log says how it decodes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    rows = [json.loads(line) for line in Path(SAMPLE).read_text(encoding="utf-8").splitlines()[:5]]
    src = write_jsonl(tmp_path / "q.jsonl", [{"instruction": r["instruction"]} for r in rows])
    answers = {}
    merge = ["--merge_adapter"] if merged else []
    for name, extra in (("eager", ["--backend", "hf", *merge]), ("graphs", ["--cuda_graphs", *merge])):
        dst = tmp_path / f"{name}.jsonl"
        done = subprocess.run([sys.executable, str(root / "infer.py"), "--adapter", unsloth_run, "--input_file",
                               str(src), "--output_file", str(dst), "--batch_size", "2", "--max_new_tokens", "12",
                               *extra], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        answers[name] = [json.loads(line)["answer"] for line in dst.read_text(encoding="utf-8").splitlines()]
        if name == "graphs" and graphs_off(unsloth_run):  # said
            assert f"--cuda_graphs is off: {graphs_off(unsloth_run)}" in done.stderr
        elif name == "graphs":  # and transformers did not fall back to eager decoding
            assert "decoding through CUDA graphs" in done.stderr and "unable to meet the criteria" not in done.stderr
    print(answers)
    assert len(answers["graphs"]) == 5 and answers["graphs"] == answers["eager"]
