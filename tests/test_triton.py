"""The Triton kernels against plain PyTorch math, and the ``triton`` backend against the ``torch``
backend.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 when no CUDA device is visible); on a GPU the same tests run on it. Sparse
results are checked against exact attention under the dense keep masks that test_sparse writes
out independently of the library's layout code.
"""

from __future__ import annotations

import functools
import json
import math
import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import compiler  # noqa: E402
from backends import triton_ops  # noqa: E402
from backends.triton_attention import FULL_SLOT, PARTIAL_SLOT, attention, merge_splits, sparse_attention  # noqa: E402
from backends.triton_layout import pattern_tables, sparse_tables, tables_from_layout  # noqa: E402
from backends.triton_schedule import ConfigCache, KernelConfig, Scheduler, decode_splits  # noqa: E402
from compiler.variants.block_layout import static_layout, topk_layout, vslash_layout  # noqa: E402
from compiler.ir.errors import BackendError  # noqa: E402
from compiler.ir.ops import attention_reference  # noqa: E402
from compiler.reference.sparse_ops import kv_head_map, sparse_attention_reference, sparse_keep_mask  # noqa: E402
from compiler.variants.language import TopK, VerticalSlash, Window, parse_variant  # noqa: E402
from oracles import oracle  # noqa: E402
from test_sparse import (blocksparse_keep, causal_keep, make_mask, make_problem, neighborhood_keep,  # noqa: E402
                         topk_keep, vslash_keep, window_keep)
from zoo import hf_model, torch_model  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOL = 1e-4
SPARSE_OP = torch.ops.attnforge_triton.sparse_attention.default
pytestmark = pytest.mark.usefixtures("one_thread")


def on(device, *xs):
    return [None if x is None else x.to(device) for x in xs]


def max_err(got, want) -> float:
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "NaN or inf in the kernel's output"
    return float((got.float().cpu() - want.float().cpu()).abs().max()) if got.numel() else 0.0


# ----------------------------------------------------------------------------- fused kernel

# b, hq, hkv, sq, sk, d, causal, mask kind, tiles (None: the scheduler's default)
FUSED = [
    (1, 2, 2, 37, 37, 32, True, "none", None),
    (2, 4, 2, 20, 45, 64, False, "bool", (16, 16)),
    (1, 4, 1, 45, 20, 80, True, "additive", (16, 16)),
    (2, 4, 4, 33, 33, 128, False, "pad-inf", None),
    (2, 4, 2, 17, 50, 96, True, "pad-bool", (16, 32)),
    (1, 4, 1, 64, 64, 64, True, "bool", (32, 16)),
    (2, 2, 1, 50, 19, 32, False, "pad-1e30", (16, 16)),
    (1, 8, 2, 23, 23, 64, False, "none", (16, 16)),
]


@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,causal,mask_kind,tiles", FUSED)
def test_fused_matches_reference(b, hq, hkv, sq, sk, d, causal, mask_kind, tiles):
    q, k, v, m = make_problem(sq * 7 + sk, b, hq, hkv, sq, sk, d, d, mask_kind)
    scale = 1.0 / math.sqrt(d)
    cfg = KernelConfig(*tiles) if tiles else None
    got = attention(*on(DEVICE, q, k, v, m), scale=scale, is_causal=causal, config=cfg)
    assert max_err(got, attention_reference(q, k, v, m, scale, causal)) < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_fused_softcap_scale_and_value_dim(causal):
    q, k, v, m = make_problem(3, 1, 4, 2, 29, 41, 64, 32, "additive")
    got = attention(*on(DEVICE, q, k, v, m), scale=0.3, is_causal=causal, softcap=5.0, config=KernelConfig(16, 16))
    assert max_err(got, attention_reference(q, k, v, m, 0.3, causal, 5.0)) < TOL


def test_fully_masked_rows_are_zero():
    q, k, v, _ = make_problem(5, 2, 2, 2, 19, 19, 32, 32, "none")
    m = torch.ones(2, 1, 19, 19, dtype=torch.bool)
    m[0, 0, 3] = False  # one query with no key
    m[1] = False  # a whole batch row with no key
    got = attention(*on(DEVICE, q, k, v, m), scale=0.2, config=KernelConfig(16, 16)).cpu()
    assert torch.isfinite(got).all()
    assert got[0, :, 3].abs().max() == 0 and got[1].abs().max() == 0
    assert max_err(got, attention_reference(q, k, v, m, 0.2)) < TOL
    bias = torch.zeros(2, 1, 1, 19).masked_fill(~m[:, :, :1], float("-inf"))
    got = attention(*on(DEVICE, q, k, v, bias), scale=0.2).cpu()
    assert got[1].abs().max() == 0 and max_err(got, attention_reference(q, k, v, bias, 0.2)) < TOL


def test_half_precision_inputs_accumulate_in_fp32():
    q, k, v, m = make_problem(6, 1, 2, 1, 40, 40, 64, 64, "additive")
    q16, k16, v16 = (x.half() for x in (q, k, v))
    got = attention(*on(DEVICE, q16, k16, v16, m), scale=0.125, is_causal=True, config=KernelConfig(16, 16))
    assert got.dtype == torch.float16
    want = attention_reference(q16.float(), k16.float(), v16.float(), m, 0.125, True)
    assert max_err(got, want) < 5e-3


@pytest.mark.skipif(DEVICE == "cpu", reason="numpy, behind the interpreter, has no bfloat16")
def test_bfloat16_inputs():
    q, k, v, m = make_problem(7, 2, 8, 2, 300, 300, 128, 128, "none")
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    got = attention(*on(DEVICE, qb, kb, vb), scale=0.09, is_causal=True)
    want = attention_reference(qb.float(), kb.float(), vb.float(), None, 0.09, True)
    assert got.dtype == torch.bfloat16 and max_err(got, want) < 2e-2


# ----------------------------------------------------------------------------- decode path


@pytest.mark.parametrize("sq,splits,mask_kind", [(1, 4, "none"), (3, 7, "pad-bool"), (2, 3, "additive"), (1, 1, "bool")])
def test_split_keys_merge_to_the_reference(sq, splits, mask_kind):
    q, k, v, m = make_problem(sq + splits, 2, 4, 1, sq, 300, 64, 64, mask_kind)
    if m is not None and m.dtype == torch.bool and m.shape[-2] == 1:
        m[0] = False  # a sequence with every key masked: zeros, not NaN, through the merge
    got = attention(*on(DEVICE, q, k, v, m), scale=0.125, config=KernelConfig(16, 16), splits=splits)
    assert max_err(got, attention_reference(q, k, v, m, 0.125)) < TOL


@pytest.mark.parametrize("mask_kind,causal,packed", [("none", False, 4), ("pad-bool", False, 4), ("pad-inf", False, 4),
                                                    ("bool", False, None), ("none", True, None)])
def test_decode_packs_grouped_heads_into_one_tile(mask_kind, causal, packed):
    q, k, v, m = make_problem(19, 2, 8, 2, 2, 200, 64, 64, mask_kind)
    info: dict = {}
    got = attention(*on(DEVICE, q, k, v, m), scale=0.125, is_causal=causal, config=KernelConfig(16, 16), record=info)
    assert max_err(got, attention_reference(q, k, v, m, 0.125, causal)) < TOL
    assert info.get("packed_heads") == packed  # a per-query mask or causality needs each row's position


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_inner_launch_order_gives_the_same_result(causal):
    q, k, v, m = make_problem(20, 2, 4, 2, 40, 40, 32, 32, "additive")
    cfg = KernelConfig(16, 16, blocks_inner=True)
    got = attention(*on(DEVICE, q, k, v, m), scale=0.25, is_causal=causal, config=cfg)
    assert max_err(got, attention_reference(q, k, v, m, 0.25, causal)) < TOL
    t = pattern_tables(Window(left=20, sinks=2, block=16), q, k, 0.25, causal, kv_head_map(4, 2))
    got = sparse_attention(*on(DEVICE, q, k, v), _on_tables(t), m.to(DEVICE), 0.25, causal, config=cfg)
    keep = window_keep(40, 40, 20, None, 2, causal).expand(2, 4, 40, 40)
    assert max_err(got, oracle(q, k, v, keep, m, 0.25)) < TOL


def _on_tables(t):
    from backends.triton_attention import SparseTables

    return SparseTables(t.block, *(x.to(DEVICE) for x in (t.kv_blocks, t.counts, t.kinds, t.tiles, t.order)))


def test_merge_of_empty_splits_is_zero():
    out = torch.randn(1, 1, 2, 4, 3)
    lse = torch.tensor([[[[0.5, float("-inf"), 1.0], [float("-inf")] * 3]]])
    merged = merge_splits(out, lse)
    w = torch.softmax(torch.tensor([0.5, float("-inf"), 1.0]), 0)
    assert torch.allclose(merged[0, 0, 0], (out[0, 0, 0] * w).sum(-1))
    assert merged[0, 0, 1].abs().max() == 0


def test_decode_splits_fill_the_gpu_but_keep_work_per_split():
    sms = 132
    assert decode_splits(programs=200, key_tiles=1000, sms=sms) == 1  # already a full wave
    assert decode_splits(programs=8, key_tiles=4, sms=sms) == 1  # too short to split
    s = decode_splits(programs=8, key_tiles=1000, sms=sms)
    assert s * 8 >= 2 * sms and 1000 // s >= 4
    assert decode_splits(programs=8, key_tiles=40, sms=sms) == 10  # each split keeps 4 tiles


# ----------------------------------------------------------------------------- sparse tables


def dense_from_tables(t, b, hq, sq, sk, causal) -> torch.Tensor:
    """The pairs the kernel attends, rebuilt from its tables with loops."""
    bs = t.block
    keep = torch.zeros(b, hq, sq + bs, sk + bs, dtype=torch.bool)
    kv, counts, kinds, tiles = (x.cpu() for x in (t.kv_blocks, t.counts, t.kinds, t.tiles))
    i = torch.arange(bs).view(-1, 1)
    j = torch.arange(bs).view(1, -1)
    for bi in range(b):
        for h in range(hq):
            bl, hl = min(bi, kv.shape[0] - 1), min(h, kv.shape[1] - 1)
            for qb in range(counts.shape[-1]):
                for s in range(int(counts[bl, hl, qb])):
                    kb, kind = int(kv[bl, hl, qb, s]), int(kinds[bl, hl, qb, s])
                    ii, jj = i + qb * bs, j + kb * bs
                    tile = torch.ones(bs, bs, dtype=torch.bool)
                    if kind != FULL_SLOT:
                        tile = (jj < sk) & ((jj <= ii) if causal else True)
                        if kind != PARTIAL_SLOT:
                            tile = tile & tiles[kind].bool()
                    keep[bi, h, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs] |= tile
    return keep[:, :, :sq, :sk]


@pytest.mark.parametrize("pattern,sq,sk,causal", [
    (Window(left=40, block=16), 70, 70, True),
    (Window(left=40, right=20, sinks=3, block=16), 50, 61, False),
    (Window(left=80, sinks=2, block=32), 130, 130, True),
])
def test_tables_classify_full_partial_and_tiles(pattern, sq, sk, causal):
    layout = static_layout(pattern, sq, sk, causal)
    t = tables_from_layout(layout, causal)
    want = layout.dense_keep(causal).expand(1, 1, sq, sk)
    assert torch.equal(dense_from_tables(t, 1, 1, sq, sk, causal), want)
    kinds = t.kinds[torch.arange(t.kinds.shape[-1]) < t.counts.unsqueeze(-1)]
    assert (kinds == FULL_SLOT).any(), "no block was found full: the kernel would mask everything"
    assert (kinds >= 0).any(), "a window edge needs a keep tile"
    # Heaviest query blocks first.
    counts = t.counts[0, 0]
    assert sorted(t.order[0, 0].tolist()) == list(range(len(counts)))
    assert (counts[t.order[0, 0].long()].diff() <= 0).all()


def test_tables_built_a_few_query_blocks_at_a_time_are_the_same(monkeypatch):
    from backends import triton_layout

    q, k, _, _ = make_problem(10, 1, 2, 2, 90, 90, 16, 16, "none")
    p = VerticalSlash(vertical=4, slash=3, last=16, sinks=1, local=2, block=16)
    layout = vslash_layout(p, q, k, 0.25, True)
    whole = tables_from_layout(layout, True)
    monkeypatch.setattr(triton_layout, "PAIR_BUDGET", 1)  # one query block per chunk
    chunked = tables_from_layout(layout, True)
    want = layout.dense_keep(True).expand(1, 2, 90, 90)
    assert torch.equal(dense_from_tables(chunked, 1, 2, 90, 90, True), want)
    assert torch.equal(dense_from_tables(whole, 1, 2, 90, 90, True), want)
    assert len(chunked.tiles) == len(whole.tiles), "a tile found in two chunks must be kept once"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", [TopK(blocks=1, block=16), TopK(mass=0.5, block=16, local=0, sinks=0),
                                     VerticalSlash(vertical=5, slash=3, last=16, sinks=1, local=2, block=16)])
def test_content_tables_equal_the_layout(pattern, causal):
    q, k, _, _ = make_problem(11, 2, 4, 2, 50, 50, 16, 16, "none")
    kv_map = kv_head_map(4, 2)
    t = pattern_tables(pattern, q, k, 0.25, causal, kv_map)
    kq = k.index_select(1, kv_map)
    build = topk_layout if isinstance(pattern, TopK) else vslash_layout
    want = build(pattern, q, kq, 0.25, causal).dense_keep(causal).expand(2, 4, 50, 50)
    assert torch.equal(dense_from_tables(t, 2, 4, 50, 50, causal), want)


# ----------------------------------------------------------------------------- sparse kernel

SPARSE_CASES = [
    ("window:20,block=16", lambda q, k, c: window_keep(q.shape[2], k.shape[2], 20, None, 0, c)),
    ("window:20,sinks=3,block=16", lambda q, k, c: window_keep(q.shape[2], k.shape[2], 20, None, 3, c)),
    ("window:13,right=5,block=16", lambda q, k, c: window_keep(q.shape[2], k.shape[2], 13, 5, 0, c)),
    ("blocksparse:block=16,local=0,global=1,stride=2",
     lambda q, k, c: blocksparse_keep(q.shape[2], k.shape[2], 16, 0, 1, 2, c)),
    ("topk:blocks=1,block=16,local=0,sinks=1", lambda q, k, c: topk_keep(q, k, 0.25, c, 1, 16, 0, 1)),
    ("topk:mass=0.6,block=16,local=1,sinks=0", lambda q, k, c: topk_keep(q, k, 0.25, c, 0, 16, 1, 0, 0.6)),
    ("vslash:vertical=5,slash=3,last=16,sinks=1,local=2,block=16",
     lambda q, k, c: vslash_keep(q, k, 0.25, c, 5, 3, 16, 1, 2)),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("text,keep_of", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
def test_block_sparse_equals_dense_masked_oracle(text, keep_of, causal):
    mask_kind = "pad-bool" if "topk" in text else "additive"
    q, k, v, m = make_problem(len(text), 2, 4, 2, 50, 50, 32, 32, mask_kind)
    keep = keep_of(q, k, causal)
    keep = keep.expand(2, 4, 50, 50)
    got = SPARSE_OP(*on(DEVICE, q, k, v, m), 0.25, causal, 0.0, parse_variant(text).text)
    assert max_err(got, oracle(q, k, v, keep, m, 0.25)) < TOL


def test_block_sparse_with_fewer_queries_than_keys_and_softcap():
    q, k, v, m = make_problem(12, 1, 4, 1, 21, 70, 64, 64, "bool")
    text = parse_variant("window:24,sinks=2,block=16").text
    keep = window_keep(21, 70, 24, None, 2, True).expand(1, 4, 21, 70)
    got = SPARSE_OP(*on(DEVICE, q, k, v, m), 0.125, True, 3.0, text)
    assert max_err(got, oracle(q, k, v, keep, m, 0.125, softcap=3.0)) < TOL


def test_neighborhood_grid():
    q, k, v, m = make_problem(13, 1, 2, 2, 50, 50, 32, 32, "none")
    text = parse_variant("neighborhood:3x3,grid=7x7,prefix=1,block=16").text
    keep = neighborhood_keep(3, 3, 7, 7, 1).expand(1, 2, 50, 50)
    got = SPARSE_OP(*on(DEVICE, q, k, v, m), 0.2, False, 0.0, text)
    assert max_err(got, oracle(q, k, v, keep, m, 0.2)) < TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("text,launches", [
    ("heads[0]=fused; heads[*]=window:9,sinks=1,block=16", 1),
    ("heads[1]=topk:blocks=1,block=16,local=0,sinks=1; heads[3]=fused; heads[*]=window:20,block=32", 3),
])
def test_head_mix(text, launches, causal):
    q, k, v, m = make_problem(14, 2, 4, 2, 45, 45, 32, 32, "additive")
    spec = parse_variant(text).text
    keep = sparse_keep_mask(q, k, spec, 0.25, causal)  # checked against loop oracles in test_sparse
    assert len(sparse_tables(spec, q, k, 0.25, causal)) == launches
    got = SPARSE_OP(*on(DEVICE, q, k, v, m), 0.25, causal, 0.0, spec)
    assert max_err(got, oracle(q, k, v, keep, m, 0.25)) < TOL
    assert max_err(got, sparse_attention_reference(q, k, v, m, 0.25, causal, 0.0, spec)) < TOL


def test_block_the_kernel_cannot_tile_runs_the_reference_and_says_so():
    q, k, v, m = make_problem(15, 1, 2, 2, 20, 20, 16, 16, "none")
    spec = parse_variant("window:3,block=4").text
    records, other = triton_ops.KernelRecords(), triton_ops.KernelRecords()
    got = SPARSE_OP(*on(DEVICE, q, k, v), m, 0.25, True, 0.0, spec, records.site_arg("site-x"))
    assert max_err(got, sparse_attention_reference(q, k, v, m, 0.25, True, 0.0, spec)) < TOL
    assert other.entries == {}  # each program's records are its own
    rec = records.entries["site-x"]
    assert rec["kernel"] == "reference" and "block 4" in rec["reason"]


def test_sparse_kernel_refuses_tiles_that_differ_from_the_block():
    q, k, v, _ = make_problem(16, 1, 2, 2, 32, 32, 16, 16, "none")
    t = pattern_tables(Window(left=8, block=16), q, k, 0.25, True, kv_head_map(2, 2))
    with pytest.raises(ValueError, match="block 16"):
        sparse_attention(q, k, v, t, config=KernelConfig(32, 32))


# ----------------------------------------------------------------------------- scheduling


def test_scheduler_tunes_once_and_reads_the_cache_back(tmp_path):
    calls = []
    timings = {KernelConfig(64, 64): 3.0, KernelConfig(128, 64): 1.0, KernelConfig(32, 32): 2.0}

    def timer(fn):
        cfg = fn()
        calls.append(cfg)
        return timings[cfg]

    cache = ConfigCache(tmp_path / "c.json")
    s = Scheduler(cache, timer, tune=True)
    choice = s.choose("k1", list(timings), lambda c: c)
    assert choice.config == KernelConfig(128, 64) and choice.source == "tuned" and len(calls) == 3
    assert json.loads((tmp_path / "c.json").read_text())["k1"]["block_m"] == 128
    again = Scheduler(ConfigCache(tmp_path / "c.json"), timer, tune=True).choose("k1", list(timings), lambda c: c)
    assert again.config == KernelConfig(128, 64) and again.source == "cache" and len(calls) == 3


def test_scheduler_skips_failing_candidates_and_survives_a_damaged_cache(tmp_path):
    (tmp_path / "c.json").write_text("{not json")

    def run(c):
        if c.block_m == 64:
            raise RuntimeError("out of shared memory")
        return c

    s = Scheduler(ConfigCache(tmp_path / "c.json"), lambda fn: float(fn().block_n), tune=True)
    choice = s.choose("k", [KernelConfig(64, 16), KernelConfig(32, 64), KernelConfig(16, 32)], run)
    assert choice.config == KernelConfig(16, 32)


def test_interpreter_uses_the_default_and_writes_nothing(tmp_path):
    s = Scheduler(ConfigCache(tmp_path / "c.json"), lambda fn: pytest.fail("timed"), tune=False)
    assert s.choose("k", [KernelConfig(16, 16), KernelConfig(32, 32)], lambda c: c).source == "default"
    assert not (tmp_path / "c.json").exists()


# ----------------------------------------------------------------------------- the backend


def _compile(z, policy, backend, **kw):
    model = z.model.to(DEVICE)
    kwargs = {k: v.to(DEVICE) for k, v in z.kwargs.items()}
    return compiler.compile(model, z.args, policy, backend=backend, example_kwargs=kwargs, show_progress=False,
                            **kw), kwargs


@pytest.mark.parametrize("kind,policy", [("llama", "fused"), ("gpt2", "window:3,sinks=1,block=16"),
                                         ("bert", "topk:blocks=1,block=16"),
                                         ("llama", "heads[0]=fused;heads[*]=window:2,block=16")])
def test_whole_model_matches_the_torch_backend(kind, policy):
    z = hf_model(kind, "eager")
    cm, kwargs = _compile(z, policy, "triton")
    ref, _ = _compile(z, policy, "torch")
    got, want = cm(**kwargs).last_hidden_state, ref(**kwargs).last_hidden_state
    assert max_err(got, want) < TOL
    low = cm.report.lowering
    assert low["format"] == "triton" and low["max_abs_error_vs_torch"] < TOL
    rewritten = [s for s in cm.report.sites if s.status == "rewritten"]
    assert len(rewritten) == z.attention_blocks
    assert all(s.lowering and s.lowering.split()[0] in ("fused", "block-sparse") for s in rewritten)
    ops = [n.target for n in cm._run.module.graph.nodes if n.op == "call_function"]
    assert sum(str(t).startswith("attnforge_triton.") for t in ops) == z.attention_blocks
    assert not any(str(t).startswith("attnforge.") for t in ops), "a reference op was left in the graph"
    assert cm.report.plan is not None and "triton" in {s.backend for s in cm._run.plan.segments}


@pytest.mark.parametrize("kind,policy,kernel", [("encoder-causal", "linear:elu", "chunked-linear"),
                                                ("mha", "linear:map=favor,features=16", "linear")])
def test_linear_sites_match_the_torch_backend(kind, policy, kernel):
    # torch's own modules: their key padding mask is a key mask in every transformers version
    # (Hugging Face models may build a per-query mask, which linear attention refuses).
    z = torch_model(kind)
    model, args = z.model.to(DEVICE), tuple(a.to(DEVICE) for a in z.args)
    cm = compiler.compile(model, args, policy, backend="triton", show_progress=False)
    ref = compiler.compile(model, args, policy, show_progress=False)
    assert max_err(cm(*args), ref(*args)) < TOL
    assert all(s.lowering.startswith(kernel) for s in cm.report.sites if s.status == "rewritten")


def test_compile_rest_keeps_our_kernels_opaque():
    z = hf_model("gpt2", "eager")
    cm, kwargs = _compile(z, "fused", "triton",
                          backend_options={"compile_rest": "aot_eager" if DEVICE == "cpu" else True})
    ref, _ = _compile(z, "fused", "torch")
    assert max_err(cm(**kwargs).last_hidden_state, ref(**kwargs).last_hidden_state) < TOL
    assert cm.report.lowering["compile_rest"]


class _TwoSites(torch.nn.Module):
    def forward(self, q, k, v):
        a = torch.ops.attnforge_triton.attention(q, k, v, None, 0.25, True)
        return torch.ops.attnforge_triton.attention(a, k, v, None, 0.25, False)


def test_exported_graph_keeps_each_kernel_as_one_node():
    q, k, v, _ = make_problem(17, 1, 2, 1, 20, 20, 16, 16, "none")
    ep = torch.export.export(_TwoSites(), tuple(on(DEVICE, q, k, v)))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.attnforge_triton.attention.default] * 2
    want = attention_reference(attention_reference(q, k.expand(1, 2, 20, 16), v.expand(1, 2, 20, 16), None, 0.25,
                                                   True), k, v, None, 0.25, False)
    assert max_err(ep.module()(*on(DEVICE, q, k, v)), want) < TOL


def test_no_gpu_refuses_in_one_line_naming_the_alternatives(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    z = hf_model("bert", "eager")
    with pytest.raises(BackendError) as e:
        compiler.compile(z.model, (), "fused", backend="triton", example_kwargs=z.kwargs, show_progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "CUDA" in msg and "backend='torch'" in msg and "backend='onnxruntime'" in msg


def test_unknown_backend_option_is_refused():
    z = hf_model("bert", "eager")
    with pytest.raises(BackendError, match="compile_rest"):
        _compile(z, "fused", "triton", backend_options={"threads": 2})


def test_plan_places_attention_on_triton_without_copies():
    z = hf_model("gpt2", "eager")
    cm, _ = _compile(z, "fused", "triton")
    plan = cm._run.plan
    crossings = plan.transitions
    assert crossings and all(t.cost_us == crossings[0].cost_us for t in crossings), \
        "torch <-> triton moves no bytes, so every crossing costs the same fixed switch"
    assert sum(s.backend == "triton" for s in plan.segments) == z.attention_blocks


def test_records_name_the_configuration_per_site():
    z = hf_model("gpt2", "eager")
    cm, _ = _compile(z, "fused", "triton")
    for s in cm.report.sites:
        assert "config=block_m=" in s.lowering and "splits=" in s.lowering


@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_masked_causal_rows_match_with_query_longer_than_keys(mask_kind):
    q, k, v, _ = make_problem(18, 1, 2, 2, 40, 24, 32, 32, "none")
    m = make_mask(torch.Generator().manual_seed(1), mask_kind, 1, 2, 40, 24)
    got = attention(*on(DEVICE, q, k, v, m), scale=0.25, is_causal=True, config=KernelConfig(16, 16))
    assert max_err(got, attention_reference(q, k, v, m, 0.25, True)) < TOL
    keep = causal_keep(40, 24)
    assert keep[30].all()  # top-left alignment: a query past the last key sees every key


class _Qkv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.proj(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum(1)


def test_torch_compile_backend_option_runs_our_kernels():
    from compiler.dynamo_backend import attnforge_backend, reports

    torch.manual_seed(0)
    m = _Qkv().eval().to(DEVICE)
    x = torch.randn(2, 10, 32, device=DEVICE)
    # The callable itself, so the test does not depend on the installed entry point.
    backend = functools.partial(attnforge_backend, options={"policy": "fused", "backend": "triton"})
    compiled = torch.compile(m, backend=backend)
    with torch.no_grad():
        assert max_err(compiled(x), m(x)) < TOL
    assert reports[-1].lowering["format"] == "triton"
    assert reports[-1].sites[0].lowering.startswith("fused")
