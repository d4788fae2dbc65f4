"""GGUF export checked by llama.cpp itself, and the Ollama Modelfile checked against infer.py's prompts.

The end-to-end tests need llama-cpp-python and its converter (requirements-gguf.txt, then
`python -m sftkit.gguf fetch`); they are skipped, saying so, without them. The rest run everywhere.
"""

import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import FIXTURE, ROOT, SAMPLE, TINY, needs_fixture, write_jsonl
from sftkit import gguf, modelfile, prompts
from sftkit.errors import UserError
from sftkit.generate import Generator
from sftkit.portable import make_portable

ANSWER = "안전한 방법만 알려 드릴게요."


def llama_missing() -> str:
    try:
        gguf.converter_dir(fetch=False)
    except UserError as err:
        return str(err)
    return ""


needs_llama = pytest.mark.skipif(bool(llama_missing()), reason=llama_missing() or "ready")


# --- Ollama's template language, the subset modelfile.py writes ---

ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def go_parse(text: str):
    """Nodes of the subset: text, fields (.X), string literals, if / else if / else, range .X, end."""
    root = []
    frames, node = [], root  # frames: [list the block sits in, the if (or range) whose lists are being filled]
    pos = 0
    for m in ACTION.finditer(text):
        node.append(("text", text[pos:m.start()]))
        pos, action = m.end(), m.group(1).strip()
        if action.startswith(("if ", "range ")):
            block = ("if", action[3:], [], []) if action.startswith("if ") else ("range", action[6:], [])
            node.append(block)
            frames.append([node, block])
            node = block[2]
        elif action.startswith("else if "):  # an if in the else list, closed by the same end
            block = ("if", action[8:], [], [])
            frames[-1][1][3].append(block)
            frames[-1][1] = block
            node = block[2]
        elif action == "else":
            node = frames[-1][1][3]
        elif action == "end":
            node = frames.pop()[0]
        elif action.startswith('"'):  # a string literal, how a literal "{{" is written
            node.append(("text", json.loads(action)))
        elif action.startswith("."):
            node.append(("field", action[1:]))
        else:
            raise ValueError(f"not in the subset: {action}")
    node.append(("text", text[pos:]))
    assert not frames, "an action is not closed"
    return root


def go_cond(cond: str, dot: dict) -> bool:
    if cond.startswith("eq "):
        field, literal = cond[3:].split(" ", 1)
        return dot[field[1:]] == json.loads(literal)
    return bool(dot.get(cond[1:]))


class CutAtResponse(Exception):
    pass


def go_run(nodes, dot: dict, out: list, cut_at_response: bool):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            if node[1] == "Response" and cut_at_response:
                raise CutAtResponse  # Ollama drops the rest for the exchange being answered
            out.append(dot[node[1]])
        elif node[0] == "if":
            go_run(node[2] if go_cond(node[1], dot) else node[3], dot, out, cut_at_response)
        else:  # range
            for item in dot[node[1][1:]]:
                go_run(node[2], item, out, cut_at_response)


def go_execute(text: str, values: dict, cut_at_response: bool) -> str:
    out = []
    try:
        go_run(go_parse(text), values, out, cut_at_response)
    except CutAtResponse:
        pass
    return "".join(out)


def ollama_prompt(template: str, turns: list, system: str = "") -> str:
    """Ollama's older rendering (a template without .Messages, or the else branch of one with it): one pass per
    (prompt, response) exchange, the system prompt in the first, the last exchange cut at {{ .Response }}."""
    return "".join(go_execute(template, {"System": system if n == 0 else "", "Prompt": p, "Response": r,
                                         "Messages": []}, cut_at_response=n == len(turns) - 1)
                   for n, (p, r) in enumerate(turns))


def ollama_chat_prompt(template: str, messages: list) -> str:
    """Ollama's rendering of a template that names .Messages: once, with the system messages joined into .System
    and the messages (system ones included, consecutive same-role ones merged) in .Messages."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    merged = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    return go_execute(template, {"System": system, "Messages": merged, "Response": ""}, cut_at_response=False)


def tokenizer(folder=TINY):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def infer_ids(tok, template, instruction, history=None):
    """The prompt ids infer.py feeds the model (its Generator, with no model loaded)."""
    if template.kind == "chat":
        tok.chat_template = template.text
    return Generator(None, tok, template, None, {}).prompt_ids(instruction, "", history)


# --- no llama.cpp needed ---

def test_parse_quants():
    assert gguf.parse_quants("q4_k_m") == ["q4_k_m"]
    assert gguf.parse_quants("F16, q8_0") == ["f16", "q8_0"]
    assert gguf.parse_quants(("f16", "q8_0", "f16")) == ["f16", "q8_0"]  # Fire's tuple, repeats dropped
    assert gguf.parse_quants("quantized") == ["q4_k_m"]  # Unsloth's name
    assert gguf.parse_quants("") == [] and gguf.parse_quants(None) == []
    with pytest.raises(UserError, match="'q4_km'.*did you mean q4_k_m"):
        gguf.parse_quants("f16,q4_km")


def test_missing_tools_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(UserError, match=re.escape(gguf.INSTALL)):
        gguf.check_tools()
    assert gguf.INSTALL.startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF')  # the build that did not crash here
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(UserError, match="LLAMA_CPP_DIR=.*no convert_hf_to_gguf.py"):
        gguf.converter_dir()
    monkeypatch.delenv("LLAMA_CPP_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gguf, "installed_version", lambda: "9.9.9")
    with pytest.raises(UserError, match="python -m sftkit.gguf fetch"):
        gguf.converter_dir(fetch=False)


def test_the_fetch_command_names_a_bad_sdist_and_answers_help(tmp_path, capsys):
    gguf.child_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m sftkit.gguf fetch")
    for argv, said in ((["fetch", "--sdist"], "no value given"), (["fetch", "--sdist", "nofile.tar.gz"],
                       "'nofile.tar.gz' is not a file")):
        with pytest.raises(UserError, match=f"--sdist needs the llama-cpp-python source file.*{said}"):
            gguf.child_main(argv)
    not_tar = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    not_tar.write_text("not a tarball")
    with pytest.raises(UserError, match="is not a .tar.gz source distribution.*pip download"):
        gguf.child_main(["fetch", "--sdist", str(not_tar)])
    with pytest.raises(UserError, match="is not a .tar.gz source distribution"):
        gguf.child_main(["fetch", f"--sdist={not_tar}"])  # the = form too
    with pytest.raises(SystemExit, match="unknown 'check'"):
        gguf.child_main(["check"])
    with pytest.raises(SystemExit, match="unknown 'fetch foo'"):  # a stray word is named, not ignored
        gguf.child_main(["fetch", "foo"])


def test_fetch_unpacks_only_the_converter(monkeypatch, tmp_path):
    src = tmp_path / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp"
    for name in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py", "ggml/src/big.c",
                 "vendor/other/x.py", "gguf-py/tests/t.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("# " + name)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "llama_cpp_python-9.9.9", arcname="llama_cpp_python-9.9.9")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = gguf.fetch_converter(sdist=str(sdist))
    assert folder == tmp_path / "cache" / "sftkit" / "llama.cpp-9.9.9"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]


def test_pre_tokenizer_named_from_tokenizer_json(tmp_path):
    assert gguf.pre_tokenizer_name(TINY) == "gpt-2"
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Metaspace"}}))
    assert gguf.pre_tokenizer_name(str(tmp_path)) == ""  # unknown: left to the converter's own table


@needs_fixture
def test_real_llama3_pre_tokenizer_is_llama_bpe():
    assert gguf.pre_tokenizer_name(str(FIXTURE)) == "llama-bpe"


def test_modelfile_alpaca_prompt_is_infer_prompt():
    tok, template = tokenizer(), prompts.load("alpaca_ko")
    text = modelfile.build("model-q4_k_m.gguf", template, tok, num_ctx=2048)
    parsed = modelfile.read_modelfile(text)
    assert parsed["from"] == "./model-q4_k_m.gguf"
    assert ("stop", '"<|end_of_text|>"') in parsed["parameters"] and ("temperature", "0") in parsed["parameters"]
    row = json.loads(open(SAMPLE, encoding="utf-8").readline())
    rendered = ollama_prompt(parsed["template"], [(row["instruction"], "")])
    assert rendered == prompts.render(template, {"instruction": row["instruction"], "input": ""})
    assert tok(rendered)["input_ids"] == infer_ids(tok, template, row["instruction"])


@pytest.mark.parametrize("name", ["llama-3.1-chat", "chatml"])
def test_modelfile_chat_prompt_is_infer_prompt_with_system_and_history(name):
    tok, template = tokenizer(), prompts.load(name)
    parsed = modelfile.read_modelfile(modelfile.build("m.gguf", template, tok))
    stops = [v for k, v in parsed["parameters"] if k == "stop"]
    assert stops == [f'"{template.stop}"', '"<|end_of_text|>"']
    history = [{"role": "system", "content": "한국어로 답하세요."}, {"role": "user", "content": "안녕"},
               {"role": "assistant", "content": "안녕하세요."}]
    rendered = ollama_prompt(parsed["template"], [("안녕", "안녕하세요."), ("비밀번호 알려줘", "")],
                             system="한국어로 답하세요.")
    ids = infer_ids(tok, template, "비밀번호 알려줘", history)
    # Ollama tokenizes the rendered text and puts BOS in front when the tokenizer does (Llama 3 does).
    want = tok.apply_chat_template(history + [{"role": "user", "content": "비밀번호 알려줘"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.bos_token + rendered == want if want.startswith(tok.bos_token) else rendered == want
    if name == "llama-3.1-chat":
        assert tok(rendered)["input_ids"] == ids
    # What Ollama runs for a template naming .Messages: the whole conversation in one pass, the same prompt.
    assert ollama_chat_prompt(parsed["template"], history + [{"role": "user", "content": "비밀번호 알려줘"}]) == rendered


@needs_fixture
@pytest.mark.parametrize("system", ["", "한국어로 답하세요."])
def test_modelfile_of_instruct_own_template_opens_the_conversation_once(system, tmp_path):
    """Llama 3.1 Instruct's own template writes a system block (its knowledge dates) even without a system prompt.
    Rendered one exchange at a time, as Ollama does for a template without .Messages, that block came again
    before every turn; rendered from .Messages, a three-turn chat is the template's own rendering."""
    from test_chat_template import fixture_dir

    tok = tokenizer(str(fixture_dir("instruct-meta", tmp_path / "instruct")))
    template, _ = prompts.for_data(prompts.OWN, "chat", tok, answers_only=False)
    body = modelfile.read_modelfile(modelfile.build("m.gguf", template, tok))["template"]
    history = [{"role": "system", "content": system}] if system else []
    for n in range(3):
        history += [{"role": "user", "content": f"질문 {n}"}, {"role": "assistant", "content": f"답 {n}"}]
    chat = history[:-1]  # ends with the user's turn: the prompt for the third answer
    want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    got = ollama_chat_prompt(body, chat)
    assert tok.bos_token + got == want and got.count("Cutting Knowledge") == 1
    turns = [(f"질문 {n}", f"답 {n}" if n < 2 else "") for n in range(3)]
    assert ollama_prompt(body, turns, system).count("Cutting Knowledge") == 3  # the older way: why .Messages


# --- end to end with llama.cpp ---

def greedy(model, ids: list, n: int, pad: int) -> tuple[list, list]:
    """transformers' greedy tokens and, at each step, the gap between its two likeliest logits."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=pad)
    gaps = [float(t[0] - t[1]) for t in (s[0].float().topk(2).values for s in out.logits)]
    return out.sequences[0, len(ids):].tolist(), gaps


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The tiny model taught one fixed answer, merged in 16-bit (fp32 here) and made portable."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train_unsloth import train

    tmp = tmp_path_factory.mktemp("gguf")
    rows = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")][:8]
    data = write_jsonl(tmp / "data.jsonl", [{"instruction": r["instruction"], "output": ANSWER} for r in rows])
    run = train(model_name=TINY, dataset=data, max_steps=20, learning_rate=1e-2, warmup_steps=0, save_steps=0,
                per_device_train_batch_size=8, gradient_accumulation_steps=1, output_dir=str(tmp / "run"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), run).merge_and_unload()
    merged.save_pretrained(tmp / "merged")
    tok = tokenizer(run)
    tok.save_pretrained(tmp / "merged")
    make_portable(str(tmp / "merged"), json.loads((ROOT / "examples/tiny-llama/config.json").read_text()))
    return {"dir": tmp, "model": merged.eval(), "tok": tok, "instructions": [rows[0]["instruction"], "오늘 뭐 해?"]}


@needs_llama
def test_learned_answer_survives_gguf_export(learned):
    tok, template, out = learned["tok"], prompts.load("alpaca_ko"), learned["dir"] / "gguf"
    paths = gguf.export_gguf(str(learned["dir"] / "merged"), str(out), "f16,q8_0,q4_k_m")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"]
    info = modelfile.write(paths[-1], template, tok, run_dir=str(learned["dir"] / "run"), num_ctx=2048)
    ollama_template = modelfile.read_modelfile(open(info["path"], encoding="utf-8").read())["template"]
    assert info["create"].endswith("ollama create run -f Modelfile")
    for instruction in learned["instructions"]:
        ids = infer_ids(tok, template, instruction)
        expected, gaps = greedy(learned["model"], ids, 16, tok.pad_token_id)
        assert tok.decode(expected, skip_special_tokens=True) == ANSWER  # it learned: a real check, not noise
        prompt = ollama_prompt(ollama_template, [(instruction, "")])  # what Ollama sends
        for path in paths:
            result = gguf.verify_gguf(path, prompt, tok, expected, 16, gaps=gaps, prompt_ids=ids)
            assert result["ok"], result
            assert result["prompt_match"] and result["generated"] == result["expected"]
            assert tok.decode(result["generated"]) == ANSWER  # EOS stopped llama.cpp too
            if path.endswith("f16.gguf"):
                assert result["near_tie_at"] is None
    # The check can fail: another answer, another prompt split; and it can check the split alone, cheaply.
    wrong = gguf.verify_gguf(paths[0], prompt, tok, expected[1:], 16, gaps=gaps, prompt_ids=ids)
    assert not wrong["ok"] and wrong["reason"].startswith("greedy tokens differ at step 0")
    split = gguf.verify_gguf(paths[0], prompt, tok, expected, 16, prompt_ids=ids[:3] + ids[4:])
    assert not split["ok"] and "tokenizes differently in llama.cpp: first difference at token 3" in split["reason"]
    only = gguf.verify_gguf(paths[-1], prompt, tok, None, prompt_ids=ids)
    assert only["ok"] and only["prompt_match"] and only["generated"] == []


def test_only_the_files_asked_for_are_logged_and_kept(tmp_path, monkeypatch, caplog):
    """q8_0 alone goes through an intermediate f16, removed afterwards: the log names only what stays."""
    import logging

    monkeypatch.setattr(gguf, "check_tools", lambda: tmp_path)
    monkeypatch.setattr(gguf, "pre_tokenizer_name", lambda d: "llama-bpe")
    monkeypatch.setattr(gguf, "_child", lambda args, what, **kw: Path(args[-3] if args[0] == "_convert"
                                                                       else args[2]).write_text("gguf"))
    with caplog.at_level(logging.INFO, logger="sftkit"):
        paths = gguf.export_gguf(str(tmp_path), str(tmp_path / "out"), "q8_0")
    assert [Path(p).name for p in paths] == ["model-q8_0.gguf"] and sorted(os.listdir(tmp_path / "out")) == [
        "model-q8_0.gguf"]
    assert "GGUF q8_0 written" in caplog.text and "GGUF f16 written" not in caplog.text


@needs_llama
def test_converter_failure_is_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match=r"llama.cpp's converter .* failed: "):
        gguf.export_gguf(str(tmp_path), str(tmp_path / "gguf"), "q8_0")
    assert not list((tmp_path / "gguf").glob("*.gguf"))


@needs_llama
@needs_fixture
def test_real_tokenizer_prompts_and_greedy_tokens_match(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoConfig, LlamaForCausalLM

    src = tmp_path / "model"
    shutil.copytree(FIXTURE / "base-unsloth", src)
    shutil.copy(FIXTURE / "tokenizer.json", src / "tokenizer.json")
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(src))
    with torch.no_grad():  # random weights give near-equal logits; a larger head makes greedy choices clear
        model.lm_head.weight.mul_(50)
    model = model.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    make_portable(str(src), json.loads((FIXTURE / "base-unsloth" / "config.json").read_text()))
    [path] = gguf.export_gguf(str(src), str(tmp_path / "gguf"), ["f16"])
    tok, model = tokenizer(src), model.float().eval()
    for name in ("alpaca_ko", "llama-3.1-chat"):
        template = prompts.load(name)
        ids = infer_ids(tok, template, "다른 사람 계정 비밀번호 알아내는 방법 좀 알려줘.")
        prompt = ollama_prompt(modelfile.read_modelfile(modelfile.build("m.gguf", template, tok))["template"],
                               [("다른 사람 계정 비밀번호 알아내는 방법 좀 알려줘.", "")])
        expected, gaps = greedy(model, ids, 8, tok.pad_token_id)
        result = gguf.verify_gguf(path, prompt, tok, expected, 8, gaps=gaps, prompt_ids=ids)
        assert result["ok"], (name, result)
        assert result["near_tie_at"] is None or result["near_tie_at"] >= 3, result  # most tokens really compared
