"""llama.cpp's steps, each run by sftkit.gguf in a child process of its own (a crash in llama.cpp, such as a build
for another CPU, then ends only the child):

    python -m sftkit.llamacpp_child _convert CONVERTER_DIR PRE_TOKENIZER MERGED_DIR --outfile F --outtype f16
    python -m sftkit.llamacpp_child _quantize SRC DST TYPE
    python -m sftkit.llamacpp_child _generate < request.json
"""

import json
import os
import sys
from pathlib import Path

from .gguf import quant_types


def _run_converter(converter: str, pre: str, argv: list):
    import runpy

    sys.path[:0] = [str(Path(converter) / "gguf-py"), converter]
    from conversion import base  # the converter's own package, found through the path above

    original = base.TextModel.get_vocab_base_pre

    def known_or_named(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # the hash is not in the converter's table
            if not pre:
                sys.exit("llama.cpp's converter does not know this tokenizer's pre-tokenizer and sftkit cannot name "
                         "it from tokenizer.json: set LLAMA_CPP_DIR to a newer llama.cpp checkout that knows it")
            return pre

    base.TextModel.get_vocab_base_pre = known_or_named
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    runpy.run_path(str(Path(converter) / "convert_hf_to_gguf.py"), run_name="__main__")


def _run_quantize(src: str, dst: str, quant: str):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        sys.exit(f"llama_model_quantize returned an error for {quant}")


def _run_generate(request: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=request["path"], n_ctx=request["n_ctx"], logits_all=True, verbose=False, seed=0,
                n_gpu_layers=request["n_gpu_layers"], n_threads=os.cpu_count() or 1,
                vocab_only=not request["max_new"])
    prompt = llm.tokenize(request["text"].encode("utf-8"), add_bos=request["add_bos"], special=True)
    ids = []
    if request["max_new"]:
        llm.eval(prompt)
    for _ in range(request["max_new"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # greedy, as infer.py decodes by default
        if token in request["stops"]:
            break
        ids.append(token)
        llm.eval([token])
    return {"prompt": prompt, "ids": ids}


def main(argv: list):
    cmd = argv[0] if argv else ""
    if cmd == "_convert":
        _run_converter(argv[1], argv[2], argv[3:])
    elif cmd == "_quantize":
        _run_quantize(*argv[1:4])
    elif cmd == "_generate":
        print(json.dumps(_run_generate(json.loads(sys.stdin.read()))))
    else:
        sys.exit("usage: python -m sftkit.llamacpp_child _convert|_quantize|_generate ...")


if __name__ == "__main__":
    main(sys.argv[1:])
