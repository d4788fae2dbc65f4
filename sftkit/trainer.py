"""The training steps train_unsloth.py tells its story with. Each step that holds policy (which SFTConfig, how fast
mode changes the batch, what the record says, what to do after running out of memory) is a function a test can
call without training."""

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import checks, data, fastplan, memory, prompts, samples
from .backend import add_lora, load_model, trainable_in_fp32
from .cli import names, without_warning
from .errors import Stopped, UserError
from .advice import aborted_advice, oom_advice
from .metricslog import metrics_callback, run_mean_loss, session_rates
from .runfolder import RunFolder
from .runrecord import RECORD, RunRecord, default_name

log = logging.getLogger("sftkit")
SAMPLE_TOKENS = 64  # per sample answer: enough to see whether it stops, cheap at every save step


def world() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_args(args: dict) -> dict:
    """Arguments that need no model or data, checked before anything slow; returns them normalised (the run
    folder's default name, target modules as a list; embed_tokens / lm_head among them set train_embeddings)."""
    args = dict(args)
    args["output_dir"] = args["output_dir"] or default_name(args["model_name"], args["dataset"])
    args["target_modules"] = names(args["target_modules"])  # text from the command line, or a list
    embeddings = [m for m in args["target_modules"] if m in ("embed_tokens", "lm_head")]
    if embeddings:  # what Unsloth's notebooks write for training the embeddings: here a flag of its own
        args["target_modules"] = [m for m in args["target_modules"] if m not in embeddings]
        args["train_embeddings"] = True
        log.info("--target_modules %s: trained in full with --train_embeddings (LoRA on the others)",
                 ",".join(embeddings))
    if not args["target_modules"]:
        raise UserError("--target_modules names no layer: pass a comma-separated list, e.g. q_proj,v_proj.")
    checks.numbers(args)
    if args["sample_prompts"] not in ("", "none"):
        samples.read_prompts_file(args["sample_prompts"])  # a missing or bad file fails now, not at the first save
    return args


def claim_folder(output_dir: str, overwrite: bool, resume: bool, max_steps: int, main_rank: bool):
    """(RunFolder or None on other ranks, checkpoint to resume from or None). Rank 0 owns the folder."""
    if main_rank:
        folder = RunFolder(output_dir)
        return folder, folder.claim(overwrite=overwrite, resume=resume, max_steps=max_steps)
    ckpts = RunFolder(output_dir).checkpoints(quiet=True) if resume else []
    return None, (ckpts[-1] if ckpts else None)


def read_data(a: dict, resuming: bool):
    """(template, rows, info): the template chosen for the data (--prompt auto), rows read, validated and rendered
    once, before the model loads; the eval split is checked now too."""
    raw = data.load_dataset_any(a["dataset"], a["dataset_split"])
    template, reason = pick_template(a, data.format_of(raw, a["data_format"], a["columns"]), resuming)
    rows, info = data.read_rows(raw, template, a["data_format"], a["columns"], a["max_samples"],
                                a["train_on_inputs"])
    info["template_reason"] = reason
    data.eval_count(len(rows), a["val_size"])  # a --val_size too large for the data fails now
    return template, rows, info


def pick_template(a: dict, fmt: str, resuming: bool):
    """(template, reason). A resumed run keeps the template it recorded (a model's own template may carry a pinned
    date, and the tokenizer may have changed since); otherwise prompts.for_data() decides, reading the model's
    tokenizer (no weights) only where the choice depends on it."""
    if resuming:
        rec = RunFolder(a["output_dir"]).read()
        return (prompts.from_text(rec.template, rec.template_text, rec.template_kind, source=str(RECORD)),
                f"the template the resumed run recorded ({rec.template})")
    tokenizer = None
    if a["prompt"] in (prompts.AUTO, prompts.OWN) and (fmt == "chat" or a["prompt"] == prompts.OWN):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(a["model_name"], token=os.environ.get("HF_TOKEN") or None)
        except OSError as err:
            raise UserError(f"could not read the tokenizer of {a['model_name']!r} to choose a chat template ({err}). "
                            "Check --model_name, or name a template: --prompt llama-3.1-chat.") from err
    return prompts.for_data(a["prompt"], fmt, tokenizer, answers_only=not a["train_on_inputs"])


def check_same_data(folder, ckpt, info: dict):
    """--resume continues at a position in the rows: refused if the rows are no longer the ones the run had."""
    if folder is None or ckpt is None:
        return
    was = folder.read().data.get("fingerprint")
    if was and was != info["fingerprint"]:
        raise UserError(f"--resume: the data differ from those the run in {folder.path} started with (fingerprint "
                        f"{info['fingerprint']}, recorded {was}); resuming would continue at a row position that "
                        "no longer means the same rows. Restore the data (same file, --max_samples, --columns), or "
                        "start again with --overwrite.")


def model_and_tokenizer(a: dict, choice, template):
    """Model and tokenizer, with the template on the tokenizer; out of memory while loading says what to change."""
    try:
        model, tokenizer, notes = load_model(a["model_name"], a["max_seq_length"], choice, a["load_in_4bit"])
    except RuntimeError as err:  # torch.OutOfMemoryError is one; nothing has been written yet
        if "out of memory" not in str(err).lower():
            raise
        raise UserError(f"out of GPU memory while loading {a['model_name']} ({err}). Load it in 4-bit (the default; "
                        "drop --load_in_4bit False), pick a smaller model, or free the GPU (`python memory_report.py` "
                        "shows what is in use).") from err
    prompts.attach(tokenizer, template)
    return model, tokenizer, notes


@dataclass
class Plan:
    """How each optimizer step's rows are split into micro-batches, and whether activations are recomputed."""
    per_device: int
    accum: int
    checkpointing: bool
    fast: dict | None = None  # fast mode's record (what it chose and why); None without --fast


def plan_batches(a: dict, choice, longest: int, world_size: int, planner=fastplan.plan) -> Plan:
    """The user's split, or with --fast the same effective batch in the largest micro-batch that fits. Only these
    local values change: run.json's args keep what was asked (so --resume re-plans from the same request)."""
    asked = Plan(a["per_device_train_batch_size"], a["gradient_accumulation_steps"], a["use_gradient_checkpointing"])
    if not a["fast"]:
        return asked
    fast = planner(a["model_name"], asked.per_device, asked.accum, longest, a["r"], a["target_modules"], a["optim"],
                   asked.checkpointing, choice, packed=a["packing"], world=world_size,
                   train_embeddings=a["train_embeddings"])
    fast.update(requested=[asked.per_device, asked.accum], longest_row=longest)
    log.info("fast mode: micro-batch %d x accumulation %d (was %d x %d)%s: %s", fast["per_device_train_batch_size"],
             fast["gradient_accumulation_steps"], asked.per_device, asked.accum,
             f", gradient checkpointing {'on' if fast['gradient_checkpointing'] else 'off'}" if choice.cuda else "",
             fast["reason"])
    return Plan(fast["per_device_train_batch_size"], fast["gradient_accumulation_steps"],
                fast["gradient_checkpointing"], fast)


def longest_row(a: dict, choice, fitted: dict) -> int:
    """What fast mode sizes micro-batches for: packed sequences fill max_seq_length; unpacked rows are only as long
    as the data's longest, counted by lengths.fit_lengths (a CPU plans no memory, so it needs no count)."""
    if not a["fast"] or a["packing"] or not choice.cuda:
        return a["max_seq_length"]
    return fitted["longest_tokens"]


def sft_config(a: dict, choice, plan: Plan, has_eval: bool, world_size: int, chat: bool, head_wrapped: bool = False):
    """TRL's SFTConfig for this run: the notebook's settings, the plan's split, the backend's checkpointing.
    `head_wrapped`: peft wraps the embeddings (token rows or whole matrices), lm_head among them."""
    from trl import SFTConfig

    save = a["save_steps"]
    return SFTConfig(
        output_dir=a["output_dir"], per_device_train_batch_size=plan.per_device,
        gradient_accumulation_steps=plan.accum, warmup_steps=a["warmup_steps"], max_steps=a["max_steps"],
        num_train_epochs=a["num_train_epochs"], learning_rate=a["learning_rate"], optim=a["optim"],
        weight_decay=a["weight_decay"], lr_scheduler_type=a["lr_scheduler_type"], seed=a["seed"],
        logging_steps=a["logging_steps"], bf16=choice.dtype == "bf16", fp16=choice.dtype == "fp16",
        max_length=a["max_seq_length"], packing=a["packing"], completion_only_loss=not a["train_on_inputs"],
        assistant_only_loss=chat and not a["train_on_inputs"],
        gradient_checkpointing=choice.trainer_checkpointing(plan.checkpointing),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if save else "no", save_steps=save or 500, save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=max(a["logging_steps"], save or 10) if has_eval else None,
        report_to=checks.report_to(a["report_to"]), ddp_find_unused_parameters=False, dataset_num_proc=None,
        include_num_input_tokens_seen="non_padding",  # the same count on both backends (Unsloth logs no num_tokens)
        # On a CPU, say so: accelerate then runs torchrun ranks as gloo DDP instead of independent copies.
        use_cpu=not choice.cuda, ddp_backend="gloo" if world_size > 1 and not choice.cuda else None,
        # TRL 1.14's default chunked loss multiplies by lm_head.weight itself: it fails on peft's trainable-token
        # wrapper (no .bias) and would skip the rows peft trains. The plain loss goes through the wrapper.
        loss_type="nll" if head_wrapped else None,
    )


def build_trainer(model, tokenizer, train_rows, eval_rows, config, output_dir: str, stopper, choice):
    """TRL's SFTTrainer (tokenizing, masking, logging, checkpoints); its refusal of data or template is one line."""
    from trl import SFTTrainer

    if config.world_size == 1 and config.n_gpu > 1:
        # A plain `python` run with several GPUs visible would fall into nn.DataParallel; keep to one GPU.
        visible, config._n_gpu = config.n_gpu, 1
        log.info("%d GPUs visible, using one. For all of them: torchrun --nproc_per_node %d train_unsloth.py ...",
                 visible, visible)
    # The plain path keeps packed rows apart without flash attention: transformers masks attention per row from the
    # position ids when no KV cache is kept, as in training (tests/test_formats.py), so TRL's warning does not apply.
    packed_ok = (without_warning("trl.trainer.sft_trainer", "cross-contamination") if not choice.unsloth
                 else nullcontext())
    try:  # TRL tokenizes here and checks the rows against the template (a chat template's generation tags)
        with packed_ok:
            sft = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_rows,
                             eval_dataset=eval_rows, args=config,
                             callbacks=[metrics_callback(Path(output_dir) / "metrics.jsonl"), stopper])
    except ValueError as err:
        tags = (" For a chat template without {% generation %} tags, pass --train_on_inputs or add the tags "
                "around the assistant turns." if "generation" in str(err) else "")
        raise UserError(f"the trainer refused the data or the template: {err} Nothing in {output_dir} was "
                        f"changed.{tags}") from err
    trainable_in_fp32(sft.model, choice)
    return sft


def fit(trainer, folder, record: RunRecord, ckpt, stopper, a: dict, plan: Plan):
    """trainer.train(); a failure is recorded (and a replaced run put back where nothing was gained), running
    out of memory becomes advice that fits what is left."""
    try:
        return trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except BaseException as err:  # KeyboardInterrupt too (a second Ctrl-C): the record must not say "running"
        stopper.restore()
        settled = folder.fail(record, err) if folder else ""
        if "out of memory" in str(err).lower():
            advice = oom_advice(a["output_dir"], settled, a["fast"], plan.per_device, plan.checkpointing)
            raise UserError(f"out of GPU memory ({err}). {advice}") from err
        if isinstance(err, KeyboardInterrupt) and folder:  # a second Ctrl-C: say what was kept, and what next
            raise Stopped(aborted_advice(a["output_dir"], settled), 130) from err
        raise


def finish(trainer, folder, record: RunRecord, result, meter) -> bool:
    """Saves the adapter and the final record (metrics, time, memory), prints the report. Returns True when the
    run was stopped early by Ctrl-C / SIGTERM (checkpoint saved, resumable)."""
    state = trainer.state
    stopped = trainer.control.should_training_stop and state.global_step < state.max_steps
    trainer.save_model(record.args["output_dir"])
    # Non-padding tokens of this session, summed over ranks (a resumed run counts from its checkpoint).
    tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    figures = meter.finish(result.metrics.get("train_runtime"), tokens)
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    record.status = "interrupted" if stopped else "finished"
    record.finished = time.strftime("%Y-%m-%d %H:%M:%S")
    # transformers' train_loss divides this session's loss sum by all the run's steps: after --resume it reads low
    resumed = {"train_loss": run_mean_loss(state.log_history)} if record.resumed_from else {}
    record.metrics = {**result.metrics, **resumed, **session_rates(trainer, record, result.metrics),
                      "global_step": state.global_step,
                      "final_loss": next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None),
                      "eval_loss": evals[-1] if evals else None}
    record.memory = figures
    if folder:
        folder.finish(record)
        print(memory.format_report(figures))
    return stopped


def end_ranks():
    """A clean exit for every rank (gloo aborts otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def attach_lora(model, a: dict, choice, plan: Plan, extra: dict):
    return add_lora(model, choice, a["r"], a["lora_alpha"], a["lora_dropout"], a["target_modules"],
                    plan.checkpointing, a["seed"], a["load_in_4bit"], extra)


def sample_callback(a: dict, choice, template, tokenizer):
    """Answers a few prompts greedily at each save / eval step into samples.jsonl (None with --sample_prompts none),
    so a user sees early whether answers follow the template and stop."""
    if a["sample_prompts"] == "none":
        return None
    extra = template.fields - {"instruction", "input"} if template.kind == "instruction" else set()
    if extra:  # sample prompts give an instruction and input only
        log.info("no samples during training: template %s also uses %s", template.name, sorted(extra))
        return None
    modes = None
    if choice.unsloth:
        from unsloth import FastLanguageModel

        modes = (FastLanguageModel.for_inference, FastLanguageModel.for_training)
    chosen = samples.read_prompts_file(a["sample_prompts"]) if a["sample_prompts"] else []
    return samples.SampleCallback(chosen, template, tokenizer, max_new_tokens=SAMPLE_TOKENS,
                                  path=Path(a["output_dir"]) / samples.FILE, modes=modes)


def log_data(info: dict, train_rows, eval_rows, template, plan: Plan, world_size: int):
    log.info("data: %s format, %d rows used (%d dropped empty, %d too long), %d eval rows; template %s (%s); world "
             "size %d, effective batch %d (%d per device x %d accumulation x %d)", info["format"], len(train_rows),
             info["rows_dropped"], info.get("rows_dropped_too_long", 0),
             len(eval_rows) if eval_rows is not None else 0, template.name, info.get("template_reason", ""),
             world_size, plan.per_device * plan.accum * world_size, plan.per_device, plan.accum, world_size)
