"""Write a random-init student of a known architecture's shape, with a given tokenizer, for
throughput benchmarks (no pretrained weights needed, nothing downloaded).

    python benchmarks/make_shaped_student.py --shape qwen2-0.5b --tokenizer ~/.cache/cwt-ray/tiny-llama --out /tmp/qwen05

The vocabulary is the tokenizer's (SmolLM2's 49,152 here, not Qwen2's 151,936), so the embedding
is smaller than the real model's; the parameter count is printed and the MFU estimate uses it.
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    # Qwen2-0.5B: 24 layers, hidden 896, MLP 4864, 14 query heads, 2 KV heads, tied embeddings.
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, tie_word_embeddings=True),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[args.shape])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.shape}-shaped student, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {args.out}")


if __name__ == "__main__":
    main()
