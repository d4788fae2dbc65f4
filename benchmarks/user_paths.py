"""Bad input tried as a new user would, through the three scripts on a CPU: each case is classified by what came
back (a clean one-line error with exit 2, a traceback, success) and compared with what it should be. Prints a
table per class and writes JSON.

    python benchmarks/user_paths.py [--out benchmarks/results/user-paths.json]
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY, SAMPLE = str(ROOT / "examples" / "tiny-llama"), str(ROOT / "examples" / "data" / "korean_safe_sample.jsonl")
QUICK = ["--model_name", TINY, "--max_steps", "2", "--save_steps", "0", "--sample_prompts", "none"]


def cases(tmp: Path, run: str):
    """(class, name, script, args, expected): expected is "error" (exit 2, one line, no traceback), "ok" or an exit
    code."""
    def data(name, text, mode="w"):
        path = tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
        return str(path)

    rows = lambda *r: "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in r)  # noqa: E731
    ok_rows = [{"instruction": f"질문 {i}", "input": "", "output": f"답 {i}"} for i in range(8)]
    yield from [
        ("unknown flags", "train --max_step", "train_unsloth.py", [*QUICK, "--dataset", SAMPLE, "--max_step", "2"], "error"),
        ("unknown flags", "infer --max_new_token", "infer.py", ["--adapter", run, "--instruction", "x", "--max_new_token", "4"], "error"),
        ("unknown flags", "estimate --seq_len", "memory_report.py", ["estimate", "--seq_len", "65536"], "error"),
        ("unknown flags", "stray value", "train_unsloth.py", [*QUICK, "--dataset", SAMPLE, "60"], "error"),
        ("unknown flags", "unknown command", "memory_report.py", ["shwo", run], "error"),
        ("data values", "list answer", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o1"), "--dataset", data("list.jsonl", rows(*ok_rows, {"instruction": "q", "output": ["a", "x"]}))], "error"),
        ("data values", "answer 0 (a number)", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o2"), "--dataset", data("zero.jsonl", rows(*ok_rows, {"instruction": "q", "output": 0}))], "error"),
        ("data values", "answer \"0\" (text) trains", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o3"), "--dataset", data("zerotext.jsonl", rows(*ok_rows, {"instruction": "q", "output": "0"}))], "ok"),
        ("data values", "json dict of columns", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o4"), "--dataset", data("cols.json", json.dumps({"instruction": ["a", "b"], "output": ["c", "d"]}))], "error"),
        ("data values", "duplicate CSV header", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o5"), "--dataset", data("dup.csv", "instruction,output,output\na,b,c\n")], "error"),
        ("data values", "cp949 bytes", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o6"), "--dataset", data("cp949.jsonl", rows(*ok_rows).encode("utf-8") + '{"instruction": "안녕", "output": "네"}\n'.encode("cp949"))], "error"),
        ("data values", "role bot/human trains", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o7"), "--dataset", data("roles.jsonl", rows(*[{"messages": [{"role": "human", "content": f"q{i}"}, {"role": "bot", "content": f"a{i}"}]} for i in range(8)]))], "ok"),
        ("length", "every row too long", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o8"), "--dataset", SAMPLE, "--max_seq_length", "8"], "error"),
        ("length", "some rows too long, counted", "train_unsloth.py", [*QUICK, "--output_dir", str(tmp / "o9"), "--dataset", SAMPLE, "--max_seq_length", "200", "--max_samples", "40"], "ok"),
        ("one-line errors", "output_dir is a file", "train_unsloth.py", [*QUICK, "--dataset", SAMPLE, "--output_dir", data("afile", "x")], "error"),
        ("one-line errors", "output_file is a folder", "infer.py", ["--adapter", run, "--input_file", data("q.jsonl", rows({"instruction": "x"})), "--output_file", str(tmp)], "error"),
        ("one-line errors", "output_file in a missing folder", "infer.py", ["--adapter", run, "--input_file", str(tmp / "q.jsonl"), "--output_file", str(tmp / "no" / "a.jsonl")], "error"),
        ("one-line errors", "adapter folder without weights", "infer.py", ["--adapter", str(tmp), "--instruction", "x"], "error"),
        ("one-line errors", "missing run folder", "memory_report.py", ["show", str(tmp / "nope")], "error"),
        ("resume honesty", "damaged run.json", "train_unsloth.py", ["--output_dir", DAMAGED, "--resume"], "error"),
        ("advice", "report_to typo", "train_unsloth.py", [*QUICK, "--dataset", SAMPLE, "--output_dir", str(tmp / "o10"), "--report_to", "tensorbord"], "error"),
        ("advice", "fp16 asked on a CPU", "train_unsloth.py", [*QUICK, "--dataset", SAMPLE, "--output_dir", str(tmp / "o11"), "--dtype", "fp16"], "error"),
        ("batch provenance", "rerun with other settings", "infer.py", ["--adapter", run, "--input_file", str(tmp / "q.jsonl"), "--output_file", ANSWERS, "--max_new_tokens", "5"], "error"),
    ]


DAMAGED = ANSWERS = ""


def main(out: str = ""):
    global DAMAGED, ANSWERS
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        run = str(tmp / "run")
        subprocess.run([sys.executable, str(ROOT / "train_unsloth.py"), *QUICK, "--dataset", SAMPLE, "--output_dir", run],
                       capture_output=True, env=env, check=True)
        DAMAGED = str(tmp / "damaged")
        subprocess.run(["cp", "-r", run, DAMAGED], check=True)
        (Path(DAMAGED) / "run.json").write_text('{"status": "fini', encoding="utf-8")
        ANSWERS = str(tmp / "answers.jsonl")
        (tmp / "q.jsonl").write_text('{"instruction": "x"}\n', encoding="utf-8")
        subprocess.run([sys.executable, str(ROOT / "infer.py"), "--adapter", run, "--input_file", str(tmp / "q.jsonl"),
                        "--output_file", ANSWERS, "--max_new_tokens", "4"], capture_output=True, env=env, check=True)
        results = []
        for cls, name, script, args, expected in cases(tmp, run):
            done = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                                  timeout=600)
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
            got = ("traceback" if "Traceback" in done.stderr else "ok" if done.returncode == 0
                   else "error" if done.returncode == 2 and errors else f"exit {done.returncode}")
            results.append({"class": cls, "case": name, "expected": expected, "got": got,
                            "message": (errors or done.stderr.strip().splitlines()[-1:] or [""])[0][:300]})
            print(f"{'PASS' if got == expected else 'FAIL'}  {cls:18} {name:34} {got:9} {results[-1]['message'][:110]}",
                  flush=True)
    by = {}
    for r in results:
        by.setdefault(r["class"], []).append(r["got"] == r["expected"])
    print("\n| class | cases | as expected |\n|---|---|---|")
    for cls, marks in by.items():
        print(f"| {cls} | {len(marks)} | {sum(marks)} |")
    path = Path(out or ROOT / "benchmarks" / "results" / "user-paths.json")
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
