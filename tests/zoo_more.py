"""More model families from real libraries, tiny random configs (hidden 32, 2 layers, 4 heads, no downloads).

Each case names the classes that hold one attention core each, so a test can count what the model has
and compare it with the sites discovery found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FamilyCase:
    name: str
    model: torch.nn.Module
    kwargs: dict
    fresh: dict  # same shapes, other values/padding: the input the example did not cover
    attention_classes: tuple
    causal: list = field(default_factory=list)  # expected Site.causal per found site, in report order

    def attention_modules(self) -> int:
        return sum(type(m).__name__ in self.attention_classes for m in self.model.modules())


def _ids(b=2, s=7, pad_row=-1, pad=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[pad_row, s - pad:] = 0
    return ids, mask


def _text(**extra):
    ids, mask = _ids()
    fids, fmask = _ids(pad_row=0, pad=4, seed=5)
    return {"input_ids": ids, "attention_mask": mask, **extra}, {"input_ids": fids, "attention_mask": fmask}


def _pixels(seed):
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def family(kind: str, impl: str = "eager") -> FamilyCase:
    import transformers as tf

    torch.manual_seed(0)
    text = dict(_TINY, vocab_size=100, max_position_embeddings=64)
    if kind == "roberta":
        m = tf.RobertaModel(tf.RobertaConfig(**text, pad_token_id=1, attn_implementation=impl))
        kw, fresh = _text()
        return FamilyCase(f"roberta-{impl}", m.eval(), kw, fresh, ("RobertaSelfAttention",), [False] * 2)
    if kind == "distilbert":
        cfg = tf.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100,
                                  max_position_embeddings=64, attn_implementation=impl)
        kw, fresh = _text()
        return FamilyCase(f"distilbert-{impl}", tf.DistilBertModel(cfg).eval(), kw, fresh,
                          ("DistilBertSelfAttention",), [False] * 2)
    if kind == "deberta-v2":
        cfg = tf.DebertaV2Config(**text, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
                                 attn_implementation=impl)
        kw, fresh = _text()
        return FamilyCase(f"deberta-v2-{impl}", tf.DebertaV2Model(cfg).eval(), kw, fresh,
                          ("DisentangledSelfAttention",), [])
    if kind in ("t5", "bart"):
        dec, _ = _ids(s=5, pad=0, seed=4)
        fdec, _ = _ids(s=5, pad=0, seed=6)
        if kind == "t5":
            cfg = tf.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                              vocab_size=100, decoder_start_token_id=0, attn_implementation=impl)
            m, classes = tf.T5Model(cfg), ("T5Attention",)
            # SDPA T5 folds the causal mask into the float position bias: no causal structure is left to see.
            causal = [False, False, impl == "eager", False, impl == "eager", False]
        else:
            cfg = tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                max_position_embeddings=64, attn_implementation=impl)
            m, classes = tf.BartModel(cfg), ("BartAttention",)
            causal = [False, False, True, False, True, False]
        kw, fresh = _text(decoder_input_ids=dec)
        fresh["decoder_input_ids"] = fdec
        return FamilyCase(f"{kind}-{impl}", m.eval(), kw, fresh, classes, causal)
    if kind in ("clip", "siglip"):
        vision = dict(_TINY, image_size=16, patch_size=4)
        kw, fresh = _text(pixel_values=_pixels(2))
        fresh["pixel_values"] = _pixels(7)
        if kind == "clip":
            cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, attn_implementation=impl)
            return FamilyCase(f"clip-{impl}", tf.CLIPModel(cfg).eval(), kw, fresh, ("CLIPAttention",),
                              [False, False, True, True])
        cfg = tf.SiglipConfig(text_config=text, vision_config=vision, attn_implementation=impl)
        # 2 text + 2 vision layers, and the vision pooling head's nn.MultiheadAttention (one learned query).
        return FamilyCase(f"siglip-{impl}", tf.SiglipModel(cfg).eval(), kw, fresh,
                          ("SiglipAttention", "MultiheadAttention"), [False] * 5)
    if kind == "swin":
        cfg = tf.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2], num_heads=[4], window_size=4,
                            attn_implementation=impl)
        # depth 2: the second block attends within shifted windows (a rolled input and a float region mask).
        m = tf.SwinModel(cfg, add_pooling_layer=False)
        return FamilyCase(f"swin-{impl}", m.eval(), {"pixel_values": _pixels(2)}, {"pixel_values": _pixels(7)},
                          ("SwinAttention",), [False] * 2)
    if kind == "whisper-encoder":
        cfg = tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                               pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                               num_mel_bins=8, max_source_positions=8, max_target_positions=16,
                               attn_implementation=impl)
        m = tf.WhisperModel(cfg).get_encoder()
        g = torch.Generator().manual_seed(2)
        feats, fresh = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
        return FamilyCase(f"whisper-encoder-{impl}", m.eval(), {"input_features": feats}, {"input_features": fresh},
                          ("WhisperAttention",), [False] * 2)
    raise KeyError(kind)


class DiffusersAttentionStack(torch.nn.Module):
    """Two diffusers Attention blocks (self- or cross-attention) with a chosen processor."""

    def __init__(self, processor: str, cross: bool):
        super().__init__()
        from diffusers.models import attention_processor as ap

        self.attn = torch.nn.ModuleList(
            ap.Attention(32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8) for _ in range(2)
        )
        for a in self.attn:
            a.set_processor(getattr(ap, processor)())
        self.cross = cross

    def forward(self, x, context):
        for a in self.attn:
            x = x + a(x, encoder_hidden_states=context if self.cross else None)
        return x
