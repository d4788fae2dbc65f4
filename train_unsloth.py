"""Fine-tune a Llama-class model with LoRA on one modest GPU (Unsloth), or on a CPU (transformers + peft).

    python train_unsloth.py --dataset jojo0217/korean_safe_conversation           # Colab / Kaggle T4
    python train_unsloth.py --model_name examples/tiny-llama \\
        --dataset examples/data/korean_safe_sample.jsonl --max_steps 30              # offline demo, CPU ok
    python train_unsloth.py --help                                                   # every argument

Defaults follow the Unsloth Llama 3.1 (8B) Alpaca notebook. The story: arguments -> backend and dtype ->
model + LoRA -> data -> SFTTrainer -> train -> adapter + run.json + metrics.jsonl -> memory/time report.
"""

import logging

from sftkit import checks, data, lengths, memory, special_tokens, trainer
from sftkit.backend import choose, row_fixer
from sftkit.cli import run_cli
from sftkit.errors import Stopped
from sftkit.exports import check_export_args, export
from sftkit.interrupt import interrupt_callback
from sftkit.recorded import resumable
from sftkit.runrecord import starting_record

log = logging.getLogger("sftkit")


@resumable  # --resume: arguments not given take the values recorded in the run being resumed
def train(
    model_name: str = "unsloth/Meta-Llama-3.1-8B",
    dataset: str = "jojo0217/korean_safe_conversation",
    dataset_split: str = "train",
    data_format: str = "auto",
    columns: str = "",
    max_samples: int = 0,
    val_size: float = 0.0,
    prompt: str = "auto",
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
    train_embeddings: bool = False,
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
    sample_prompts: str = "",
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
      prompt: auto (fits the data: alpaca_ko, the model's own chat template, llama-3.1-chat) | own | name | file.
      train_on_inputs: also train on the prompt tokens (the notebook's way); default trains on answers only.
      max_seq_length: longest sequence in tokens; past the model's window RoPE is scaled to reach it.
      dtype: auto (bf16 where the GPU has it natively, else fp16; fp32 on CPU) | bf16 | fp16 | fp32.
      load_in_4bit: load the base model in 4-bit NF4 (QLoRA); needs a CUDA GPU.
      backend: auto (Unsloth on a CUDA GPU, else transformers + peft) | unsloth | hf.
      r: LoRA rank.
      lora_alpha: LoRA scaling numerator (scale = lora_alpha / r).
      lora_dropout: dropout on the LoRA input (0 lets Unsloth use its fastest kernels).
      target_modules: comma-separated module names that get LoRA adapters (embed_tokens, lm_head: --train_embeddings).
      use_gradient_checkpointing: recompute activations to save memory (Unsloth's offloaded variant on its path).
      train_embeddings: also train embed_tokens and lm_head in full (new tokens; ~9.8 GB more for 8B: not on a T4).
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
      sample_prompts: answer these prompts at each save into samples.jsonl: a file (JSONL or lines); "" built-in; none.
      output_dir: run folder; default outputs/<model>-<dataset>.
      resume: continue from the newest checkpoint in output_dir.
      overwrite: replace a finished run in output_dir.
      save_merged: also write a merged model: 16bit | 4bit (into <output_dir>/merged-<mode>).
      save_gguf: also export GGUF via llama.cpp, e.g. q4_k_m or f16,q8_0 (<output_dir>/gguf, with a Modelfile).
      push_to_hub: upload the adapter (or the merged model) to this Hub repo; token from HF_TOKEN.
    """
    a = trainer.check_args(locals())
    rank, world_size = trainer.world()

    # 1. Backend and dtype, before transformers/trl/peft are imported (Unsloth patches them on import).
    choice = choose(backend, dtype, cudnn_attention)
    checks.known_names(optim, lr_scheduler_type, report_to)
    check_export_args(save_merged, save_gguf, push_to_hub, choice)

    # 2. The run folder: locked, and checked against --overwrite / --resume. Nothing is moved or deleted yet.
    folder, ckpt = trainer.claim_folder(a["output_dir"], overwrite, resume, max_steps, main_rank=rank == 0)
    try:
        # 3. Data, read, checked and rendered once with the template chosen for them, before the (slow) model load.
        template, rows, info = trainer.read_data(a, resuming=ckpt is not None)
        trainer.check_same_data(folder, ckpt, info)

        # 4. Model and tokenizer; then the length policy, EOS on every answer and the eval split.
        model, tokenizer, notes = trainer.model_and_tokenizer(a, choice, template)
        rows, fitted = lengths.fit_lengths(rows, tokenizer, max_seq_length, train_on_inputs)  # too long: said, counted
        info.update(fitted, rows_used=len(rows))
        train_rows, eval_rows = data.finalize(rows, tokenizer.eos_token, val_size, seed)

        # 5. Plan the micro-batches (--fast), add LoRA, build TRL's SFTTrainer.
        plan = trainer.plan_batches(a, choice, trainer.longest_row(a, choice, fitted), world_size)
        extra, token_info = special_tokens.prepare(model, tokenizer, template, train_rows, row_fixer(choice),
                                                   train_embeddings=a["train_embeddings"])
        model = trainer.attach_lora(model, a, choice, plan, extra)
        meter = memory.Meter().start()
        trainer.log_data(info, train_rows, eval_rows, template, plan, world_size)
        config = trainer.sft_config(a, choice, plan, eval_rows is not None, world_size, info["format"] == "chat",
                                    head_wrapped=bool(extra))
        stopper = interrupt_callback()  # Ctrl-C / SIGTERM: checkpoint after the current step, then stop
        sft = trainer.build_trainer(model, tokenizer, train_rows, eval_rows, config, a["output_dir"], stopper, choice)
        sampler = trainer.sample_callback(a, choice, template, tokenizer)
        if sampler:
            sampler.add_to(sft)

        # 6. Only now does a fresh run move a previous one aside (deleted when this one finishes).
        record = starting_record(a, choice, template, info, notes, plan.fast, world_size, ckpt, tokenizer)
        record.tokens["special"] = token_info
        if folder:
            folder.begin(record, fresh=ckpt is None)
    except BaseException:
        if folder:
            folder.unlock()
        raise

    # 7. Train. An interrupt saves a checkpoint (interrupt.py); out of memory says what to change.
    result = trainer.fit(sft, folder, record, ckpt, stopper, a, plan)

    # 8. Save the adapter and the record, print the report, then the exports (the adapter is safe by then).
    stopped = trainer.finish(sft, folder, record, result, meter)
    if folder and not stopped and (save_merged or save_gguf or push_to_hub):
        export(model, tokenizer, folder, record, choice, save_merged, save_gguf, push_to_hub)
    trainer.end_ranks()
    if stopped:  # saved and resumable, but not done: the command line exits 130 / 143
        raise Stopped(f"{stopper.signalled} at step {sft.state.global_step}; the checkpoint is saved. Continue with "
                      f"--resume --output_dir {a['output_dir']}", 143 if stopper.signalled == "SIGTERM" else 130)
    if folder:
        log.info("run folder: %s", a["output_dir"])
    return a["output_dir"]


if __name__ == "__main__":
    run_cli(train)
