"""Builds examples/tiny-llama: a randomly initialised Llama-3.1-shaped model small enough for CPU tests.

It is a real `LlamaForCausalLM` with a Llama-3.1-style config (llama3 RoPE scaling, grouped-query attention,
untied embeddings) and its own byte-level BPE tokenizer, trained on the Korean sample data, carrying the
Llama 3 special tokens. The pad token is `<|finetune_right_pad_id|>`, distinct from EOS, as in Llama 3.1, so
padding is never confused with the end of an answer. Same bytes on every run (fixed seed, fixed corpus).

    python examples/make_tiny_model.py            # rewrites examples/tiny-llama
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
OUT = HERE / "tiny-llama"
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|finetune_right_pad_id|>"]


def corpus():
    """The sample rows plus the headings of the bundled templates, so prompts tokenize compactly."""
    for line in (HERE / "data" / "korean_safe_sample.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        yield " ".join(row.values())
    for path in sorted((HERE.parent / "prompts").glob("*")):
        yield path.read_text(encoding="utf-8")


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus()), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    # Llama 3 prepends BOS and never appends EOS on its own: the templates add EOS to the training text.
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=1024)


def main():
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float32",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # Llama 3.1's own scaling, shrunk to the tiny window: native 128, served to 1024.
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    )
    torch.manual_seed(3407)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {OUT} ({n:,} parameters, vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
