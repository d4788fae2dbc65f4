"""GGUF export with llama.cpp, offline: its own converter and quantizer, then its own runtime as the check.

The converter (convert_hf_to_gguf.py with its gguf-py) ships inside the llama-cpp-python source distribution;
quantizing and loading use the installed llama-cpp-python. Nothing of llama.cpp lives in this repository. Each
llama.cpp step runs in a child process: a crash there (a build for another CPU can segfault) becomes an error
message instead of ending the training process, and llama.cpp's chatter stays out of the log.

    python -m sftkit.gguf fetch     # unpack the converter for the installed llama-cpp-python (needs PyPI once)
"""

import difflib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger("sftkit")
VERSION = "0.3.36"  # the llama-cpp-python that requirements-gguf.txt pins and the tests ran with
# The default build tunes for the building CPU (GGML_NATIVE); on the 2-core CI box that build segfaulted on
# q8_0 and q4_k_m files, the portable one did not. LLAVA_BUILD=OFF skips the multimodal library (unused here):
# 140 compile steps instead of 193.
INSTALL = f'CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" pip install llama-cpp-python=={VERSION}'
FETCH = "python -m sftkit.gguf fetch"
CONVERTED = ("f16", "bf16", "f32")  # written by the converter itself; the rest by llama.cpp's quantizer
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}  # Unsloth's names
# Types llama.cpp's quantizer writes without an importance matrix, for dense models (no MoE or ternary types).
QUANTIZED = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
             "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_nl", "iq4_xs")
REPO_ROOT = Path(__file__).resolve().parent.parent
TIE_GAP = 0.05  # logits; a top-2 gap this small in transformers may flip with f16 rounding


def quant_types() -> dict:
    """{name: llama_ftype} of what --save_gguf accepts; the quantizer's numbers from llama_cpp where installed."""
    try:
        import llama_cpp
    except ImportError:  # the names still check a typo; check_tools() then asks for the install
        return dict.fromkeys(CONVERTED + QUANTIZED)
    attrs = {n: "LLAMA_FTYPE_ALL_F32" if n == "f32" else f"LLAMA_FTYPE_MOSTLY_{n.upper()}"
             for n in CONVERTED + QUANTIZED}
    return {n: getattr(llama_cpp, a) for n, a in attrs.items() if hasattr(llama_cpp, a)}


def parse_quants(text) -> list[str]:
    """The --save_gguf value ("q4_k_m", "f16,q8_0", or Fire's tuple for `--save_gguf f16,q8_0`) as a list of
    type names, in order, without repeats. Unknown names are refused with the closest ones."""
    if not text:
        return []
    items = text if isinstance(text, (list, tuple)) else re.split(r"[,\s]+", str(text))
    known, out = quant_types(), []
    for item in [str(i).strip() for i in items if str(i).strip()]:
        name = ALIASES.get(item.lower().replace("-", "_"), item.lower().replace("-", "_"))
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise UserError(f"--save_gguf {item!r} is not a type llama.cpp writes here; {hint}choose from "
                            f"{', '.join(known)} (several: --save_gguf f16,q4_k_m).")
        if name not in out:
            out.append(name)
    return out


def cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sftkit" / f"llama.cpp-{version}"


def _is_converter(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf").is_dir()


def installed_version() -> str:
    try:
        import llama_cpp
    except ImportError as err:
        raise UserError(f"GGUF export needs llama-cpp-python (llama.cpp's quantizer and runtime), which is not "
                        f"installed ({err}). Install it with: {INSTALL} (or pip install -r requirements-gguf.txt "
                        f"with the same CMAKE_ARGS), then {FETCH}.") from err
    return llama_cpp.__version__


def converter_dir(fetch: bool = True) -> Path:
    """llama.cpp's converter: $LLAMA_CPP_DIR (a llama.cpp checkout), else the copy unpacked from the
    llama-cpp-python sdist of the installed version (fetched from PyPI when missing and fetch is True)."""
    if os.environ.get("LLAMA_CPP_DIR"):
        folder = Path(os.environ["LLAMA_CPP_DIR"]).expanduser()
        if not _is_converter(folder):
            raise UserError(f"LLAMA_CPP_DIR={folder} holds no convert_hf_to_gguf.py with gguf-py/: point it at a "
                            f"llama.cpp checkout, or unset it and run {FETCH}.")
        return folder
    version = installed_version()
    folder = cache_dir(version)
    if _is_converter(folder):
        return folder
    if not fetch:
        raise UserError(f"llama.cpp's converter for llama-cpp-python {version} is not in {folder}. Run {FETCH} "
                        "(downloads its source from PyPI once), or set LLAMA_CPP_DIR to a llama.cpp checkout.")
    return fetch_converter(version)


def fetch_converter(version: str = "", sdist: str = "") -> Path:
    """Unpacks convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist (downloaded with
    pip unless `sdist` names the file) into the cache. The same version as the runtime: a newer converter may
    write metadata an older llama.cpp cannot read."""
    named = re.search(r"llama_cpp_python-(.+)\.tar\.gz$", Path(sdist).name) if sdist else None
    version = version or (named.group(1) if named else installed_version())
    folder = cache_dir(version)
    with tempfile.TemporaryDirectory() as tmp:
        if not sdist:
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", tmp,
                   f"llama-cpp-python=={version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode or not found:
                raise UserError(f"could not download the llama-cpp-python {version} source to get llama.cpp's "
                                f"converter ({_tail(done.stderr or done.stdout, 1)}). With network access run {FETCH}, "
                                "or set LLAMA_CPP_DIR to a llama.cpp checkout of the same version.")
            sdist = str(found[0])
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".fetch-"))
        with tarfile.open(sdist) as tar:
            wanted = [m for m in tar.getmembers() if _wanted(m.name)]
            if not any(m.name.endswith("/convert_hf_to_gguf.py") for m in wanted):
                raise UserError(f"{sdist} carries no vendor/llama.cpp/convert_hf_to_gguf.py; use the llama-cpp-python "
                                "source distribution (.tar.gz) or set LLAMA_CPP_DIR.")
            for m in wanted:  # strip "llama_cpp_python-X/vendor/llama.cpp/" so the folder is a converter root
                m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            tar.extractall(staging, members=wanted, **safe)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)  # whole or not at all: a half-unpacked cache would fail later, obscurely
    log.info("llama.cpp converter for llama-cpp-python %s unpacked to %s", version, folder)
    return folder


def _wanted(name: str) -> bool:
    rest = name.split("/vendor/llama.cpp/", 1)[1] if "/vendor/llama.cpp/" in name else ""
    return rest in ("convert_hf_to_gguf.py", "LICENSE") or rest.startswith(("conversion/", "gguf-py/gguf/"))


def check_tools() -> Path:
    """The converter's folder, or UserError naming the install command when llama-cpp-python or the converter is
    missing. Meant to run before training, so that a missing tool costs no run."""
    installed_version()
    return converter_dir(fetch=True)


def _tail(text: str, lines: int = 4) -> str:
    kept = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:]) or "no output"


def _child(args: list, what: str, stdin: str = "", fix: str = "") -> str:
    """Runs `python -m sftkit.llamacpp_child ARGS` in a child process; its stdout, or UserError with its tail."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not a pip `gguf` of another age
    done = subprocess.run([sys.executable, "-m", "sftkit.llamacpp_child", *args], capture_output=True, text=True, env=env,
                          input=stdin)
    if done.returncode < 0:  # a crash inside llama.cpp, e.g. a build tuned for another CPU
        raise UserError(f"{what} crashed (signal {-done.returncode}): {_tail(done.stderr)}. Reinstall llama-cpp-python "
                        f"with the portable build: {INSTALL} --force-reinstall --no-cache-dir")
    if done.returncode:
        raise UserError(f"{what} failed: {_tail(done.stderr or done.stdout, 1)}{fix}")
    return done.stdout


# llama.cpp names each BPE pre-tokenizer (its splitting regex); the converter recognises tokenizers by the hash of
# a sample text's tokens, so a tokenizer trained here (examples/tiny-llama) is unknown to it even when it splits
# exactly like a known one. Such a tokenizer is named from its tokenizer.json instead, and only when the
# converter's own table has no entry; verify_gguf then checks the split against transformers.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(model_dir: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("" when not recognised from tokenizer.json)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return ""
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level BPE split by GPT-2's own regex
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return "llama-bpe"
    return ""


def export_gguf(merged_dir: str, out_dir: str, quants, name: str = "model") -> list[str]:
    """Writes out_dir/<name>-<type>.gguf for each type (f16, q8_0, q4_k_m, ...) from a merged 16-bit model folder;
    returns the paths in the order asked. A 16-bit file is converted first and quantized from; it is kept only
    if asked for."""
    quants = parse_quants(quants)
    if not quants:
        return []
    converter, pre = check_tools(), pre_tokenizer_name(merged_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    base = next((q for q in quants if q in CONVERTED), "f16")
    paths = {q: str(Path(out_dir) / f"{name}-{q}.gguf") for q in dict.fromkeys([base, *quants])}
    # 16-bit types come from the converter, the others from llama.cpp's quantizer reading the first 16-bit file.
    for q in sorted(paths, key=lambda q: (q != base, q not in CONVERTED)):
        started = time.time()
        if q in CONVERTED:
            _child(["_convert", str(converter), pre, merged_dir, "--outfile", paths[q], "--outtype", q],
                   f"llama.cpp's converter ({merged_dir} -> {q})", fix=". It reads a merged 16-bit model folder "
                   "(config.json, *.safetensors, tokenizer files): check that one, e.g. from --save_merged 16bit")
        else:
            _child(["_quantize", paths[base], paths[q], q], f"llama.cpp's quantizer ({q})")
        if q in quants:  # the intermediate f16 is removed below: naming it as written would point at nothing
            log.info("GGUF %s written in %.0f s: %s", q, time.time() - started, paths[q])
    if base not in quants:
        os.remove(paths[base])  # an 8B model's f16 is 16 GB; only the asked-for files stay
    return [paths[q] for q in quants]


def verify_gguf(gguf_path: str, prompt_text: str, tokenizer, expected_ids: list | None, max_new_tokens: int = 32,
                gaps: list | None = None, stop_ids=None, prompt_ids: list | None = None, tie_gap: float = TIE_GAP,
                n_gpu_layers: int = 0) -> dict:
    """Loads the GGUF with llama.cpp's runtime and checks that (a) the prompt tokenizes to transformers' ids
    (`prompt_ids`, e.g. infer.py's, else `tokenizer(prompt_text)`) and (b) greedy decoding gives `expected_ids`
    (transformers' greedy tokens; compared up to the first stop token). `gaps`: transformers' top-1 minus top-2
    logit at each step; a difference is accepted only where that gap is below tie_gap, and the tokens after it
    are not compared (the texts have diverged). expected_ids None: (a) only, loading just the vocabulary (cheap
    for an 8B file). Returns a summary with "ok" and, when not ok, "reason"."""
    bos = tokenizer.bos_token or ""
    has_bos = bool(bos) and prompt_text.startswith(bos)  # chat templates write BOS into the text themselves
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt_text, add_special_tokens=not has_bos)["input_ids"]
    prompt_ids, stops = list(prompt_ids), {tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
    request = {"path": str(gguf_path), "text": prompt_text, "add_bos": not has_bos, "n_gpu_layers": n_gpu_layers,
               "max_new": 0 if expected_ids is None else max_new_tokens, "stops": [s for s in stops if s is not None],
               "n_ctx": len(prompt_ids) + max_new_tokens + 8}
    started = time.time()
    got = json.loads(_child(["_generate"], f"loading {Path(gguf_path).name} with llama.cpp", json.dumps(request)))
    expected = _cut(list(expected_ids or []), stops)
    result = {"file": str(gguf_path), "ok": False, "prompt_tokens": len(prompt_ids), "prompt_match": False,
              "expected": expected, "generated": got["ids"], "near_tie_at": None}
    if got["prompt"] != prompt_ids:
        i = next((i for i, (a, b) in enumerate(zip(got["prompt"], prompt_ids)) if a != b),
                 min(len(got["prompt"]), len(prompt_ids)))
        result["reason"] = (f"the prompt tokenizes differently in llama.cpp: first difference at token {i} "
                            f"(llama.cpp {got['prompt'][i:i + 3]}, transformers {prompt_ids[i:i + 3]})")
    result["prompt_match"] = "reason" not in result
    for i in range(max(len(got["ids"]), len(expected)) if result["prompt_match"] else 0):
        a, b = (ids[i] if i < len(ids) else None for ids in (got["ids"], expected))
        gap = gaps[i] if gaps is not None and i < len(gaps) else None
        if a != b and gap is not None and gap < tie_gap:
            result["near_tie_at"] = i  # a near-tie in transformers: either token is its greedy choice
            break
        if a != b:
            result["reason"] = f"greedy tokens differ at step {i}: llama.cpp {a}, transformers {b}" + (
                f" (transformers' top-2 gap {gap:.3f})" if gap is not None else "")
            break
    result.update(ok="reason" not in result, seconds=round(time.time() - started, 1))
    return result


def _cut(ids: list, stops: set) -> list:
    return ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]


USAGE = ("usage: python -m sftkit.gguf fetch [--sdist llama_cpp_python-VERSION.tar.gz]\n"
         "  unpacks llama.cpp's GGUF converter (the version of the installed llama-cpp-python) into the cache")


def child_main(argv: list):
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--sdist=") else [a])]
    extra = [a for i, a in enumerate(argv[1:], 1) if a != "--sdist" and argv[i - 1] != "--sdist"]
    if not argv or argv[0] != "fetch" or extra:
        sys.exit(f"{'unknown ' + repr(' '.join(argv)) + chr(10) if argv else ''}{USAGE}")
    if "--sdist" not in argv:  # kept when already unpacked
        print(converter_dir())
        return
    at = argv.index("--sdist") + 1
    sdist = argv[at] if at < len(argv) else ""
    if not Path(sdist).is_file():
        raise UserError(f"--sdist needs the llama-cpp-python source file, e.g. --sdist llama_cpp_python-0.3.16.tar.gz "
                        f"({'no value given' if not sdist else repr(sdist) + ' is not a file'}).")
    try:
        print(fetch_converter(sdist=sdist))
    except tarfile.TarError as err:
        raise UserError(f"{sdist} is not a .tar.gz source distribution ({str(err).splitlines()[0]}): download "
                        "it with pip download --no-binary :all: --no-deps llama-cpp-python==VERSION.") from err


if __name__ == "__main__":
    try:
        child_main(sys.argv[1:])
    except UserError as err:
        sys.exit(str(err))
