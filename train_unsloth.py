"""Fine-tune a Llama-class model with LoRA on one modest GPU (Unsloth), or on a CPU (transformers + peft).

    python train_unsloth.py --dataset jojo0217/korean_safe_conversation           # Colab / Kaggle T4
    python train_unsloth.py --model_name examples/tiny-llama \\
        --dataset examples/data/korean_safe_sample.jsonl --max_steps 30              # offline demo, CPU ok
    python train_unsloth.py --help                                                   # every argument

Defaults follow the Unsloth Llama 3.1 (8B) Alpaca notebook. The story: arguments -> backend and dtype ->
model + LoRA -> data -> SFTTrainer -> train -> adapter + run.json + metrics.jsonl -> memory/time report.
"""

import logging
import os
import time
from pathlib import Path

from sftkit import batching, checks, cli, data, memory, prompts, run
from sftkit.backend import add_lora, choose, load_model
from sftkit.cli import run_cli
from sftkit.errors import UserError
from sftkit.interrupt import interrupt_callback
from sftkit.saving import check_export_args, export

log = logging.getLogger("sftkit")


@run.resumable  # --resume: arguments not given take the values recorded in the run being resumed
def train(
    model_name: str = "unsloth/Meta-Llama-3.1-8B",
    dataset: str = "jojo0217/korean_safe_conversation",
    dataset_split: str = "train",
    data_format: str = "auto",
    columns: str = "",
    max_samples: int = 0,
    val_size: float = 0.0,
    prompt: str = "alpaca_ko",
    train_on_inputs: bool = False,
    max_seq_length: int = 2048,
    dtype: str = "auto",
    load_in_4bit: bool = True,
    backend: str = "auto",
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    use_gradient_checkpointing: bool = True,
    per_device_train_batch_size: int = 2,
    gradient_accumulation_steps: int = 4,
    warmup_steps: int = 5,
    max_steps: int = 60,
    num_train_epochs: float = 1.0,
    learning_rate: float = 2e-4,
    optim: str = "adamw_8bit",
    weight_decay: float = 0.01,
    lr_scheduler_type: str = "linear",
    seed: int = 3407,
    packing: bool = False,
    fast: bool = False,
    cudnn_attention: bool = False,
    logging_steps: int = 1,
    save_steps: int = 20,
    report_to: str = "none",
    output_dir: str = "",
    resume: bool = False,
    overwrite: bool = False,
    save_merged: str = "",
    save_gguf: str = "",
    push_to_hub: str = "",
):
    """Train a LoRA adapter and write a self-describing run folder. Returns the folder's path.

    Args:
      model_name: Hub id or local folder of the base model (e.g. examples/tiny-llama for the offline demo).
      dataset: Hub data set id, or a local .jsonl/.json/.csv/.parquet file or folder of them.
      dataset_split: split to train on when loading from the Hub.
      data_format: auto (from the columns) | alpaca (instruction/input/output) | chat (messages) | text.
      columns: map template fields onto your columns, e.g. 'instruction=question,output=answer'.
      max_samples: use only the first N rows (0 = all).
      val_size: hold out rows for evaluation: a fraction (0.05) or a count (200); 0 = none.
      prompt: template name from prompts/ (alpaca_ko, alpaca, llama-3.1-chat, chatml) or a file path.
      train_on_inputs: also train on the prompt tokens (the notebook's way); default trains on answers only.
      max_seq_length: longest sequence in tokens; past the model's window RoPE is scaled to reach it.
      dtype: auto (bf16 where the GPU has it natively, else fp16; fp32 on CPU) | bf16 | fp16 | fp32.
      load_in_4bit: load the base model in 4-bit NF4 (QLoRA); needs a CUDA GPU.
      backend: auto (Unsloth on a CUDA GPU, else transformers + peft) | unsloth | hf.
      r: LoRA rank.
      lora_alpha: LoRA scaling numerator (scale = lora_alpha / r).
      lora_dropout: dropout on the LoRA input (0 lets Unsloth use its fastest kernels).
      target_modules: comma-separated module names that get LoRA adapters.
      use_gradient_checkpointing: recompute activations to save memory (Unsloth's offloaded variant on its path).
      per_device_train_batch_size: rows per micro-batch on each GPU.
      gradient_accumulation_steps: micro-batches per optimizer step.
      warmup_steps: linear learning-rate warm-up steps.
      max_steps: optimizer steps to run; -1 = run num_train_epochs instead.
      num_train_epochs: passes over the data when max_steps is -1.
      learning_rate: peak learning rate.
      optim: optimizer name understood by transformers (adamw_8bit, adamw_torch, ...).
      weight_decay: decoupled weight decay.
      lr_scheduler_type: learning-rate schedule (linear, cosine, constant, ...).
      seed: random seed for LoRA init, data order and dropout.
      packing: pack several short rows into each sequence (fewer pad tokens, faster).
      fast: same effective batch in the largest micro-batch the GPU holds, checkpointing off if it fits.
      cudnn_attention: let PyTorch use cuDNN attention (it re-plans per new row length: ~2x slower steps on an H100).
      logging_steps: log loss, memory and tokens every N optimizer steps (to metrics.jsonl as well).
      save_steps: save a resumable checkpoint every N steps (0 = none: the adapter is saved, no resuming).
      report_to: none | tensorboard | wandb | another transformers integration | several, comma-separated | all.
      output_dir: run folder; default outputs/<model>-<dataset>.
      resume: continue from the newest checkpoint in output_dir.
      overwrite: replace a finished run in output_dir.
      save_merged: also write a merged model: 16bit | 4bit (into <output_dir>/merged-<mode>).
      save_gguf: also export GGUF with Unsloth, e.g. q4_k_m (into <output_dir>/gguf); needs llama.cpp.
      push_to_hub: upload the adapter (or the merged model) to this Hub repo; token from HF_TOKEN.
    """
    args = dict(locals())
    output_dir = args["output_dir"] = output_dir or run.default_name(model_name, dataset)
    modules = args["target_modules"] = cli.names(target_modules)  # text from the command line, or a list
    if not modules:
        raise UserError("--target_modules names no layer: pass a comma-separated list, e.g. q_proj,v_proj.")
    checks.numbers(args)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    main_rank = rank == 0

    # 1. Backend and dtype, before transformers/trl/peft are imported (Unsloth patches them on import).
    choice = choose(backend, dtype, cudnn_attention)
    checks.names(optim, lr_scheduler_type)
    template = prompts.load(prompt)
    check_export_args(save_merged, save_gguf, push_to_hub, choice)

    # 2. The run folder: refuse to clobber a finished run; find the checkpoint to resume from. Nothing is
    # deleted yet: --overwrite takes effect only once data and model have loaded.
    if main_rank:
        ckpt = run.prepare(output_dir, overwrite=overwrite, resume=resume, max_steps=max_steps)
    else:  # rank 0 owns the folder; the others only need the checkpoint to resume
        ckpt = (run.checkpoints(Path(output_dir)) or [None])[-1] if resume else None

    # 3. Data, read and checked before the (slow) model load so bad input fails fast.
    raw = data.load_dataset_any(dataset, dataset_split)
    checked, _ = data.prepare(raw, template, "", data_format, columns, max_samples, train_on_inputs, quiet=True)
    data.split_eval(checked, val_size, seed)  # --val_size too large for the data is also known now

    # 4. Model, tokenizer and LoRA.
    try:
        model, tokenizer, notes = load_model(model_name, max_seq_length, choice, load_in_4bit)
    except RuntimeError as err:  # torch.OutOfMemoryError is one; nothing has been written yet
        if "out of memory" not in str(err).lower():
            raise
        raise UserError(f"out of GPU memory while loading {model_name} ({err}). Load it in 4-bit (the default; "
                        "drop --load_in_4bit False), pick a smaller model, or free the GPU (`python memory_report.py` "
                        "shows what is in use).") from err
    if template.kind == "chat":
        tokenizer.chat_template = template.text
    rows, data_info = data.prepare(raw, template, tokenizer.eos_token, data_format, columns, max_samples,
                                   train_on_inputs)
    train_rows, eval_rows = data.split_eval(rows, val_size, seed)
    fast_plan = None
    if fast:  # same rows per optimizer step, fewer and larger micro-batches, checkpointing off if it fits
        # Packed sequences fill max_seq_length; unpacked rows are only as long as the data's longest.
        on_gpu = choice.device.startswith("cuda")
        longest = max_seq_length if packing or not on_gpu else data.longest_tokens(train_rows, tokenizer,
                                                                                  max_seq_length)
        fast_plan = batching.plan(model_name, per_device_train_batch_size, gradient_accumulation_steps, longest, r,
                                  modules, optim, use_gradient_checkpointing, choice, packed=packing, world=world)
        fast_plan.update(requested=[per_device_train_batch_size, gradient_accumulation_steps], longest_row=longest)
        log.info("fast mode: micro-batch %d x accumulation %d (was %d x %d)%s: %s",
                 fast_plan["per_device_train_batch_size"], fast_plan["gradient_accumulation_steps"],
                 per_device_train_batch_size, gradient_accumulation_steps,
                 f", gradient checkpointing {'on' if fast_plan['gradient_checkpointing'] else 'off'}" if on_gpu else "",
                 fast_plan["reason"])
        # Only the local values change: run.json's args keep what the user asked for (so --resume re-plans
        # from the same request), and the plan is recorded under "fast".
        per_device_train_batch_size = fast_plan["per_device_train_batch_size"]
        gradient_accumulation_steps = fast_plan["gradient_accumulation_steps"]
        use_gradient_checkpointing = fast_plan["gradient_checkpointing"]
    model = add_lora(model, choice, r, lora_alpha, lora_dropout, modules, use_gradient_checkpointing, seed,
                     load_in_4bit)
    meter = memory.Meter().start()
    log.info("data: %s format, %d rows used (%d dropped), %s eval rows; template %s; world size %d, effective "
             "batch %d (%d per device x %d accumulation x %d)", data_info["format"], len(train_rows),
             data_info["rows_dropped"], len(eval_rows) if eval_rows is not None else 0, template.name, world,
             per_device_train_batch_size * gradient_accumulation_steps * world, per_device_train_batch_size,
             gradient_accumulation_steps, world)

    # 5. Trainer: TRL's SFTTrainer does tokenizing, masking, logging and checkpoints.
    from trl import SFTConfig, SFTTrainer

    chat = data_info["format"] == "chat"
    config = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, warmup_steps=warmup_steps, max_steps=max_steps,
        num_train_epochs=num_train_epochs, learning_rate=learning_rate, optim=optim, weight_decay=weight_decay,
        lr_scheduler_type=lr_scheduler_type, seed=seed, logging_steps=logging_steps,
        bf16=choice.dtype == "bf16", fp16=choice.dtype == "fp16", max_length=max_seq_length, packing=packing,
        completion_only_loss=not train_on_inputs, assistant_only_loss=chat and not train_on_inputs,
        # Unsloth does its own (offloaded) checkpointing, set up in get_peft_model; the hf path on a GPU uses HF's.
        gradient_checkpointing=False if choice.backend == "unsloth" or not choice.device.startswith("cuda")
        else use_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=2,
        eval_strategy="steps" if eval_rows is not None else "no",
        eval_steps=max(logging_steps, save_steps or 10) if eval_rows is not None else None,
        report_to=checks.report_to(report_to), ddp_find_unused_parameters=False, dataset_num_proc=None,
        include_num_input_tokens_seen="non_padding",  # the same count on both backends (Unsloth logs no num_tokens)
        # On a CPU, say so: accelerate then runs torchrun ranks as gloo DDP instead of independent copies.
        use_cpu=not choice.device.startswith("cuda"),
        ddp_backend="gloo" if world > 1 and not choice.device.startswith("cuda") else None,
    )
    if world == 1 and config.n_gpu > 1:
        # A plain `python` run with several GPUs visible would fall into nn.DataParallel; keep to one GPU.
        visible, config._n_gpu = config.n_gpu, 1
        log.info("%d GPUs visible, using one. For all of them: torchrun --nproc_per_node %d train_unsloth.py ...",
                 visible, visible)
    stopper = interrupt_callback()  # Ctrl-C / SIGTERM: checkpoint after the current step, then stop
    try:  # TRL tokenizes here and checks the rows against the template (a chat template's generation tags)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_rows,
                             eval_dataset=eval_rows, args=config,
                             callbacks=[memory.metrics_callback(Path(output_dir) / "metrics.jsonl"),
                                        stopper])
    except ValueError as err:
        tags = (" For a chat template without {% generation %} tags, pass --train_on_inputs or add the tags "
                "around the assistant turns." if "generation" in str(err) else "")
        raise UserError(f"the trainer refused the data or the template: {err} Nothing in {output_dir} was "
                        f"changed.{tags}") from err
    # Only now does --overwrite move the old run aside (everything above has loaded); it is deleted when this run
    # finishes, or put back if this one fails before its first checkpoint.
    replaced = run.set_aside(output_dir) if main_rank and ckpt is None else None
    record = {"status": "running", "args": args, "backend": choice.as_dict(),
              # infer.py reloads the base from here, whatever folder it is run from
              "model_path": str(Path(model_name).resolve()) if Path(model_name).is_dir() else model_name,
              "template": template.name, "template_kind": template.kind, "template_text": template.text,
              "data": data_info, "notes": notes, "fast": fast_plan, "versions": run.library_versions(),
              "world_size": world, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "resumed_from": str(ckpt) if ckpt else None}
    if main_rank:
        run.write_record(output_dir, record)

    # 6. Train. An interrupt saves a checkpoint (interrupt.py); out of memory says what to change.
    try:
        result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except BaseException as err:  # KeyboardInterrupt too (a second Ctrl-C): the record must not say "running"
        stopper.restore()
        settled = ""
        if main_rank:
            run.write_record(output_dir, {**record, "status": "aborted" if isinstance(err, KeyboardInterrupt)
                                          else "failed", "error": f"{type(err).__name__}: {err}"})
            settled = run.settle(output_dir, replaced, finished=False)
        if "out of memory" in str(err).lower():
            advice = oom_advice(output_dir, settled, fast, per_device_train_batch_size, use_gradient_checkpointing)
            raise UserError(f"out of GPU memory ({err}). {advice}") from err
        raise
    stopped = trainer.control.should_training_stop and trainer.state.global_step < trainer.state.max_steps

    # 7. Save: adapter + tokenizer, then the record with metrics, time and memory.
    trainer.save_model(output_dir)
    # Non-padding tokens of this session, summed over ranks (a resumed run counts from its checkpoint).
    tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    figures = meter.finish(result.metrics.get("train_runtime"), tokens)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    record.update(status="interrupted" if stopped else "finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                  metrics={**result.metrics, "global_step": trainer.state.global_step,
                           "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history)
                                               if "loss" in h), None),
                           "eval_loss": evals[-1] if evals else None},
                  memory=figures)
    if main_rank:
        run.write_record(output_dir, record)
        run.settle(output_dir, replaced, finished=record["status"] == "finished")
        print(memory.format_report(figures))
        if stopped:
            log.info("stopped at step %d; continue with --resume --output_dir %s", trainer.state.global_step,
                     output_dir)
        elif save_merged or save_gguf or push_to_hub:
            export(model, tokenizer, record, choice, save_merged, save_gguf, push_to_hub)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a clean exit for every rank (gloo aborts otherwise)
        dist.barrier()
        dist.destroy_process_group()
    return output_dir


def oom_advice(output_dir: str, settled: str, fast: bool, micro: int, checkpointing: bool) -> str:
    """What to run after running out of memory: resume from this run's checkpoints if it has any, else start it
    again; with a smaller micro-batch (same effective batch) or without --fast."""
    smaller = (f"without --fast (it picked micro-batch {micro} with gradient checkpointing "
               f"{'on' if checkpointing else 'off'})" if fast else "with a lower --per_device_train_batch_size and "
               "a --gradient_accumulation_steps as much higher (same effective batch)")
    if settled == "restored":
        how = f"The previous run in {output_dir} is back, unchanged; try again with --overwrite {smaller}"
    elif run.checkpoints(Path(output_dir)):
        how = f"Its checkpoints in {output_dir} are kept: continue with --resume {smaller}"
    else:
        how = f"No checkpoint was saved yet: start again with --overwrite {smaller}"
    return (f"{how}. A lower --max_seq_length also fits, in a new run (--overwrite); `python memory_report.py "
            "estimate` predicts what fits.")


if __name__ == "__main__":
    run_cli(train)
