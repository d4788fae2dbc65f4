"""Peak memory by sequence length, in one process: load once, train a few steps at each length, stop at OOM.

Used by bench_train.py for the T4 check (under a memory cap: the longest sequence that trains) and to
calibrate `memory_report.py estimate` (no cap: measured peak reserved memory per length and shape).

    python benchmarks/seq_search.py --model_dir /tmp/sftkit-bench/llama-3.1-8b --seq_lens 512,2048
"""

import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

GB = 2 ** 30


def main(model_dir: str, seq_lens: str = "512,2048", memory_cap_gb: float = 0.0, batch: int = 2, steps: int = 3,
         r: int = 16, backend: str = "auto", dtype: str = "auto", out: str = ""):
    """Train `steps` steps of `batch` rows of exactly each length; record peak reserved/allocated memory.

    Args:
      model_dir: model folder (see shapes.make_model).
      seq_lens: comma-separated lengths, tried in this order; the search stops at the first OOM.
      memory_cap_gb: cap this process's GPU memory (0 = the whole GPU).
      batch: rows per step (the notebook's micro-batch is 2).
      steps: optimizer steps per length.
      r: LoRA rank (alpha = r, 7 target modules, as the notebook).
      backend: auto | unsloth | hf.
      dtype: auto | bf16 | fp16 (a T4 has no native bf16 and trains in fp16).
      out: JSON path for the results.
    """
    from sftkit import estimate
    from sftkit.backend import add_lora, choose, load_model  # unsloth (if chosen) is imported inside, first

    import torch

    if memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory / GB
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_cap_gb / total))
    choice = choose(backend, dtype)
    from sftkit.cli import names as listed

    lens = [int(x) for x in listed(seq_lens)]
    model, tok, _ = load_model(model_dir, max(lens), choice, load_in_4bit=True)
    model = add_lora(model, choice, r, r, 0.0, list(estimate.MODULES), True, 3407, True)
    weights_gb = torch.cuda.memory_allocated() / GB
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from shapes import make_data
    from sftkit import data, prompts

    results = []
    for length in lens:
        path = make_data(Path("/tmp/sftkit-bench") / f"fixed-{length}.jsonl", n=batch * steps, fixed=length)
        raw = Dataset.from_list([json.loads(x) for x in path.read_text().splitlines()])
        rows = data.add_eos(data.read_rows(raw, prompts.load("alpaca_ko"))[0], tok.eos_token)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = SFTConfig(output_dir="/tmp/sftkit-bench/seq", per_device_train_batch_size=batch,
                        gradient_accumulation_steps=1, max_steps=steps, max_length=length, learning_rate=2e-4,
                        optim="adamw_8bit", bf16=choice.dtype == "bf16", fp16=choice.dtype == "fp16",
                        logging_steps=1, report_to="none", save_strategy="no", gradient_checkpointing=False,
                        dataset_num_proc=None, include_num_input_tokens_seen="non_padding")
        trainer = None
        try:
            trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows, args=cfg)
            t0 = time.time()
            trainer.train()
            tokens = trainer.state.num_input_tokens_seen  # Unsloth's trainer logs no num_tokens
            results.append({"seq_len": length, "ok": True, "tokens_per_row": round(tokens / (batch * steps)),
                            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GB, 3),
                            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GB, 3),
                            "s_per_step": round((time.time() - t0) / steps, 3)})
        except torch.OutOfMemoryError as err:
            results.append({"seq_len": length, "ok": False, "error": str(err)[:300]})
        finally:
            del trainer
        print(json.dumps(results[-1]), flush=True)
        if not results[-1]["ok"]:
            break
    report = {"model_dir": str(model_dir), "backend": choice.backend, "dtype": choice.dtype, "batch": batch,
              "r": r, "memory_cap_gb": memory_cap_gb, "weights_and_lora_gb": round(weights_gb, 3),
              "longest_ok": max((x["seq_len"] for x in results if x["ok"]), default=None), "results": results}
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
