"""Tiny models with random weights: the attention forms real models write."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    attention_blocks: int = 2
    causal: bool = False
    kv_heads: int | None = None


def _ids(b=2, s=7, vocab=100, pad_last=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad_last:
        mask[-1, s - pad_last:] = 0
    return ids, mask


def hf_model(kind: str, impl: str) -> ZooModel:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                            bos_token_id=0, eos_token_id=0, attn_implementation=impl)
        m, causal, kv = tf.GPT2Model(cfg), True, 4
    elif kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
                             attn_implementation=impl)
        m, causal, kv = tf.LlamaModel(cfg), True, 2
    elif kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=64, attn_implementation=impl)
        m, causal, kv = tf.BertModel(cfg), False, 4
    elif kind == "vit":
        cfg = tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4, num_channels=3, attn_implementation=impl)
        m = tf.ViTModel(cfg, add_pooling_layer=False)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        return ZooModel(f"vit-{impl}", m.eval(), (), {"pixel_values": x}, 2, False, 4)
    else:
        raise KeyError(kind)
    ids, mask = _ids()
    return ZooModel(f"{kind}-{impl}", m.eval(), (), {"input_ids": ids, "attention_mask": mask}, 2, causal, kv)


class _EncoderStack(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True) for _ in range(2)
        )
        self.causal = causal

    def forward(self, x):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=self.causal)
        return x


class _MHA(torch.nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.attn = torch.nn.ModuleList(torch.nn.MultiheadAttention(16, 4, batch_first=True) for _ in range(2))
        self.need_weights = need_weights

    def forward(self, x, key_padding_mask):
        for a in self.attn:
            x = x + a(x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)[0]
        return x


def torch_model(kind: str) -> ZooModel:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    if kind == "encoder":
        return ZooModel("TransformerEncoderLayer", _EncoderStack(False).eval(), (x,))
    if kind == "encoder-causal":
        return ZooModel("TransformerEncoderLayer-causal", _EncoderStack(True).eval(), (x,), causal=True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    if kind == "mha":
        return ZooModel("MultiheadAttention", _MHA(False).eval(), (x, pad))
    if kind == "mha-weights":
        return ZooModel("MultiheadAttention-need_weights", _MHA(True).eval(), (x, pad))
    raise KeyError(kind)


HF_CASES = [(k, i) for k in ("gpt2", "llama", "bert", "vit") for i in ("eager", "sdpa")]
TORCH_CASES = ["encoder", "encoder-causal", "mha", "mha-weights"]


@torch.library.custom_op("attnforge_zoo::rotate_half", mutates_args=())
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's rotate_half as a custom kernel that ONNX has no translation for (tests of mixed plans)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@rotate_half.register_fake
def _(x):
    return torch.empty_like(x)
