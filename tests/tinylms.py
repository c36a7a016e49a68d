"""Tiny causal language models and a tokenizer, built offline (no hub download), for the LM tests.

Every architecture gets the same small shape: hidden 32, 3 layers, 4 heads (2 key/value heads where
the family has grouped-query attention), 128 positions. Weights are transformers' random
initialization under a fixed seed; norm weights are randomized too so no layer is an identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. A residual network adds each block's output to its input. "
        "Language models predict the next token from the ones before it. Sharing layers saves parameters. "
        "Removing a layer changes the loss by an amount that the gradient can estimate to first order. ") * 4

HIDDEN, LAYERS, HEADS, KV_HEADS, POSITIONS = 32, 3, 4, 2, 128

# name -> (config class name, extra config kwargs)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64}),
    "phi3": ("Phi3Config", {}),
    "gpt2": ("GPT2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {"use_parallel_residual": True}),
    "gpt_neox_serial": ("GPTNeoXConfig", {"use_parallel_residual": False}),
    "olmo2": ("Olmo2Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                      "shared_expert_intermediate_size": 16}),
}


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on :data:`TEXT`, with a BOS token added to every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_config(arch: str, vocab_size: int, **overrides):
    import transformers

    cls_name, extra = ARCHITECTURES[arch]
    cls = getattr(transformers, cls_name)
    if arch == "gpt2":
        kwargs = dict(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch.startswith("gpt_neox"):
        kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=POSITIONS)
    else:
        kwargs = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS)
    kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the tokenizer's (<s>, </s>, <pad>)
    kwargs.update(extra)
    kwargs.update(overrides)
    return cls(**kwargs)


def make_model(arch: str = "llama", vocab_size: int = 300, seed: int = 0, **overrides):
    """A tiny causal LM of ``arch`` in eval mode, with randomized norm weights (non-trivial layers)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln" in name:  # ones or zeros at init: make every norm do something
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def save_model(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A local ``save_pretrained`` folder of a tiny model and its tokenizer."""
    tokenizer = make_tokenizer()
    model = make_model(arch, len(tokenizer), seed, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_text(path: Path, repeats: int = 1) -> Path:
    path.write_text(TEXT * repeats)
    return path
