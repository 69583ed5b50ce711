"""Generation with a KV cache: ``compile_generator`` and the ``Generator`` it returns.

Capture follows transformers' exportable recipe for decoder-only LMs
(``transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM``): one program
``(input_ids, cache_position) -> logits`` whose static cache is a pair of mutable buffers per
layer. A Hugging Face model is exported with a dynamic prompt length (prefill in one call,
decode one token per call); a ``.pt2`` a user exported with the recipe at a fixed length of one
token prefills token by token. ``passes.cache_rewrite`` then gives every site the cache its
policy keeps:

* ``fused``: the full cache, read only up to the filled length (exact);
* ``sinks:S,window:W``: S sink slots + W + 1 rolling slots (StreamingLLM; ``window`` as in
  ``compiler.compile``: the W previous keys and the current one), constant memory;
* ``heads[..]=fused; heads[*]=sinks:S,window:W``: per-KV-head caches (DuoAttention);
* ``topk:...`` / ``vslash:...`` (MInference, FlexPrefill): a sparse prefill of the prompt, then
  the full cache in decode (the prompt must be prefilled in one call, from position 0: a
  one-token ``.pt2`` prefills token by token, exactly). Sites that should also stream in decode
  are not expressible in one variant; give those sites ``sinks:S,window:W`` instead;
* ``dense``: the site as exported (the whole static cache under the exported mask).

Positions follow the model: a key keeps the rotary position it was written with.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch.export import Dim, ExportedProgram

from compiler.reference import kv_cache  # noqa: F401  (registers attnforge::cache_attention)
from compiler.reference import sparse_ops  # noqa: F401  (registers attnforge::sparse_attention: a sparse prefill)
from compiler.driver.budget import Fidelity
from compiler.driver.capture import _one_line
from compiler.ir.errors import BackendError, CaptureError, InputError, PolicyError
from compiler.reference.kv_cache import CacheGroup, layout_text
from compiler.variants.policy import PolicySpec, parse_policy
from compiler.ir.site import AttentionSite
from compiler.variants.registry import feature
from compiler.variants.language import HeadMix, Variant

if TYPE_CHECKING:
    from passes.cache_rewrite import CacheSite

GENERATION_VARIANTS = ("fused, dense, sinks:S,window:W (or window:W), a head mix of them, or a sparse prefill "
                       "(topk:..., vslash:...) over a full cache")


def _prefill_sparse(v: Variant) -> bool:
    """Content-selected patterns (top-k, vertical-slash) pick keys from the whole prompt's scores:
    they make the prefill sparse, and decode reads the full cache."""
    return feature(v.pattern, "layout") is not None


_NO_AUTO = ("policy='auto' chooses streaming heads on calibration prompts: call compile_generator(..., "
            "policy='auto', budget=compiler.Fidelity(max_kl=...))")


# ---------------------------------------------------------------------------- policy -> cache layout


def _ring(v: Variant, site: AttentionSite) -> CacheGroup:
    p = v.pattern
    if p.right not in (None, 0):
        raise PolicyError(f"{site.id} ({site.module}): {v.text} looks at future keys; a decode cache holds only "
                          "past keys: drop right=")
    return CacheGroup((), p.sinks, p.left)


def _has_cache_form(v: Variant, in_mix: bool = False) -> bool:
    """A sparse prefill applies to a whole site (its cache is one full group), not inside a head mix."""
    if v.kind in ("fused", "dense") or feature(v.pattern, "decode_ring"):
        return True
    if _prefill_sparse(v):
        return not in_mix
    return isinstance(v.pattern, HeadMix) and all(_has_cache_form(var, True) for _, var in v.pattern.groups)


def check_generation_policy(pol) -> None:
    """Refuse a variant with no cache form before anything is captured."""
    for selector, v in pol.rules:
        if not _has_cache_form(v):
            raise PolicyError(f"{selector}: {v.text} has no KV-cache form for generation; use {GENERATION_VARIANTS}")


def cache_layout(site: AttentionSite, v: Variant) -> Optional[list[CacheGroup]]:
    """The cache groups ``v`` gives ``site`` (None: leave the site as exported)."""
    if v.kind == "dense":
        return None
    if v.kind == "fused":
        return [CacheGroup(tuple(range(site.num_kv_heads)))]
    if _prefill_sparse(v):
        return [CacheGroup(tuple(range(site.num_kv_heads)), prefill=v.text)]
    if feature(v.pattern, "decode_ring"):
        g = _ring(v, site)
        return [CacheGroup(tuple(range(site.num_kv_heads)), g.sinks, g.window)]
    if not _has_cache_form(v):
        raise PolicyError(f"{site.id} ({site.module}): {v.text} has no KV-cache form for generation; "
                          f"use {GENERATION_VARIANTS}")
    rep = site.num_heads // site.num_kv_heads
    named = {h for heads, _ in v.pattern.groups if heads for h in heads}
    if max(named, default=-1) >= site.num_heads:
        raise PolicyError(f"{site.id} ({site.module}): head {max(named)} does not exist; the site has "
                          f"{site.num_heads} query heads")
    by_kv: dict[int, tuple] = {}
    for heads, var in v.pattern.groups:
        qs = heads if heads is not None else tuple(h for h in range(site.num_heads) if h not in named)
        if feature(var.pattern, "decode_ring"):
            g = _ring(var, site)
            key = (g.sinks, g.window)
        else:
            key = (0, None)  # fused (a mix has no dense heads: they parse as fused)
        for kv in sorted({h // rep for h in qs}):
            shares = set(range(kv * rep, (kv + 1) * rep))
            if not shares <= set(qs):
                raise PolicyError(f"{site.id} ({site.module}): query heads {sorted(shares)} share KV head {kv}, "
                                  f"so they need one cache; put them in the same heads[...] group")
            by_kv[kv] = key
    groups: dict[tuple, list[int]] = {}
    for kv in range(site.num_kv_heads):
        groups.setdefault(by_kv.get(kv, (0, None)), []).append(kv)
    return sorted((CacheGroup(tuple(hs), s, w) for (s, w), hs in groups.items()), key=lambda g: g.kv_heads[0])


# ---------------------------------------------------------------------------- capture


def _default_max_len(model) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return int(min(n, 4096))


def capture_for_generation(model: torch.nn.Module, example_input_ids: Optional[torch.Tensor],
                           max_cache_len: int) -> ExportedProgram:
    """transformers' static-cache export of ``model``, prompt length dynamic in ``[1, max_cache_len]``,
    batch fixed at the example's."""
    gc = getattr(model, "generation_config", None)
    if gc is None or not hasattr(model, "config"):
        raise CaptureError(f"{type(model).__name__} cannot be captured with a KV cache: give a Hugging Face causal "
                           "LM (…ForCausalLM) or a .pt2 exported with transformers.integrations.executorch")
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    ids = example_input_ids if example_input_ids is not None else torch.zeros(1, 4, dtype=torch.long)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 1:
        raise InputError("example_input_ids must be a [batch, n] tensor of token ids")
    ids = ids[:, : max_cache_len - 1]
    if ids.shape[1] < 2:  # a length of 1 would be specialized; 2+ keeps the prompt length dynamic
        ids = ids.repeat(1, 2)[:, :2]
    saved = (gc.use_cache, gc.cache_implementation)
    was_training = model.training
    model.eval()
    gc.use_cache, gc.cache_implementation = True, "static"
    try:
        # The batch is the example's: the static cache is allocated for it (equal-length prompts).
        wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=ids.shape[0], max_cache_len=max_cache_len)
        seq = Dim("prompt_len", min=1, max=max_cache_len)
        with torch.no_grad():
            device = next(model.parameters()).device  # the example follows the model (the cache is made there)
            ids = ids.to(device)
            return wrapper.export(input_ids=ids, cache_position=torch.arange(ids.shape[1], device=device),
                                  dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}})
    except Exception as e:  # noqa: BLE001 - every capture failure gets the same one-line answer
        raise CaptureError(_one_line(e, model) + "; generation needs a decoder-only LM that transformers can "
                           "export with a static cache") from None
    finally:
        gc.use_cache, gc.cache_implementation = saved
        model.train(was_training)


def _load(path: Path) -> ExportedProgram:
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .pt2 exported with transformers.integrations.executorch "
                         "or a Hugging Face model directory")
    try:
        return torch.export.load(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a readable torch.export program ({type(e).__name__})") from None


# ---------------------------------------------------------------------------- report


@dataclass
class CacheSiteRecord:
    id: str
    module: str
    layer: Optional[int]
    variant: str
    layout: str  # KV heads -> cache kind, e.g. "0-1:full|2-3:sinks=4,window=16"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    full_cache_bytes: int  # K and V at max_cache_len for every KV head
    cache_bytes: int  # what this site's buffers really hold
    q_offset: str = ""  # the node the first query's position is read from
    valid_keys: str = ""  # the key range the exported mask allowed (offset causality)


@dataclass
class GenerationReport:
    model: str
    policy: str
    backend: str
    max_cache_len: int
    sites: list = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    auto: Optional[dict] = None  # policy="auto": the search's record (compiler.driver.generate_auto)

    @property
    def full_cache_bytes(self) -> int:
        return sum(s.full_cache_bytes for s in self.sites)

    @property
    def cache_bytes(self) -> int:
        return sum(s.cache_bytes for s in self.sites)

    @property
    def per_token_seconds(self) -> float:
        return self.decode_seconds / max(1, self.new_tokens - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(full_cache_bytes=self.full_cache_bytes, cache_bytes=self.cache_bytes,
                 per_token_seconds=self.per_token_seconds)
        return d

    def __str__(self) -> str:
        lines = [f"{self.model}: policy {self.policy!r}, backend {self.backend}, max_cache_len {self.max_cache_len}"]
        for s in self.sites:
            lines.append(f"  {s.id:8s} {s.module:40s} {s.layout:36s} cache {s.cache_bytes / 2**10:10.1f} KiB "
                         f"(full {s.full_cache_bytes / 2**10:.1f} KiB)")
        if self.auto:
            a = self.auto
            lines.append(f"  auto: {a['streaming_kv_heads']} of {a['kv_heads']} KV heads streaming "
                         f"({a['streaming']}) within budget {a['budget']}; calibration KL "
                         f"{a['calibration_fidelity']['kl_divergence']:.3g}, total variation "
                         f"{a['calibration_fidelity']['total_variation']:.3g}")
        ratio = self.full_cache_bytes / max(1, self.cache_bytes)
        lines.append(f"  KV cache {self.cache_bytes / 2**20:.3f} MiB vs full {self.full_cache_bytes / 2**20:.3f} MiB "
                     f"({ratio:.2f}x smaller)")
        if self.new_tokens:
            lines.append(f"  prompt {self.prompt_tokens} tokens: prefill {self.prefill_seconds * 1e3:.1f} ms; "
                         f"{self.new_tokens} new tokens: {self.per_token_seconds * 1e3:.2f} ms/token")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- generator


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
          gen: Optional[torch.Generator]) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    x = logits.float() / temperature
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1])).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(x.softmax(-1), 1, generator=gen)


def _lower_torch(gm: torch.fx.GraphModule, attention=None) -> None:
    """Run the rewritten module eagerly at the least cost per step: ``cache_attention`` nodes call
    the implementation (a decode step makes a few small calls, and the custom-op dispatcher's
    Python layers cost as much as the attention), and the export's dtype/device assertions on
    intermediate values, fixed at capture, go (a fifth of a Llama step's calls). ``attention``
    replaces the implementation (the Triton backend's)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.attnforge.cache_attention.default:
            node.target = attention or kv_cache.cache_attention_eager
        elif node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def _check_backend(backend: str) -> None:
    """An unknown backend, or Triton without CUDA (and not interpreting): one line, as compile()."""
    from backends import check

    check(backend)


class Generator:
    """A captured decoder whose attention reads the caches a policy defines."""

    def __init__(self, ep: ExportedProgram, policy: PolicySpec = "fused", backend: str = "torch",
                 model_name: str = "model"):
        # passes import compiler; importing them here keeps ``import passes.x`` first a working order.
        from passes.cache_rewrite import find_cache_sites, keep_last_logits, rewrite_cache_sites, step_inputs

        t0 = time.perf_counter()
        _check_backend(backend)
        pol = parse_policy(policy)
        if pol.auto:
            raise PolicyError(_NO_AUTO)
        check_generation_policy(pol)
        self.sites: list[CacheSite] = find_cache_sites(ep)
        pol.check_selectors([s.site for s in self.sites])
        self.layouts = {}
        for cs in self.sites:
            groups = cache_layout(cs.site, pol.variant_for(cs.site))
            if groups is not None:
                self.layouts[cs.site.id] = groups
        self._ids_name, self._pos_name = step_inputs(ep)
        ids_val = next(n for n in ep.graph.nodes if n.name == self._ids_name).meta["val"]
        self.max_cache_len = max(cs.max_cache_len for cs in self.sites)
        self.batch = int(ids_val.shape[0])  # the static cache's batch: prompts of equal length, this many
        # Prefill in chunks no longer than the widest window: a ring holds every key the next
        # chunk's queries see, and no chunk builds a prompt-by-prompt score matrix.
        windows = [g.ring for gs in self.layouts.values() for g in gs if g.bounded]
        self._chunk = 1 if isinstance(ids_val.shape[1], int) else min([self.max_cache_len, *windows])
        self.module = ep.module()
        cache_dtype = self.module.get_buffer(self.sites[0].k_buffer).dtype
        self.buffers = rewrite_cache_sites(self.module, self.sites, self.layouts, cache_dtype)
        self.last_position_logits = keep_last_logits(self.module)
        self._session = None
        if backend == "onnxruntime":
            dense = [cs.site.id for cs in self.sites if cs.site.id not in self.layouts]
            if dense:
                raise BackendError(f"sites {', '.join(dense)} are left dense (the exported static cache); "
                                   "backend='onnxruntime' generates with policy caches (fused, sinks/window) only; "
                                   "give those sites one, or use backend='torch'")
            sparse = [sid for sid, gs in self.layouts.items() if any(g.prefill for g in gs)]
            if sparse:
                raise BackendError(f"sites {', '.join(sparse)} have a sparse prefill; backend='onnxruntime' "
                                   "prefills exactly; use backend='torch' for a sparse prefill")
            from backends.onnx_cache import OrtStepSession

            self._session = OrtStepSession(self.module, self._ids_name, self._pos_name)
        elif backend == "triton":
            from backends.triton_cache import cache_attention_triton

            _lower_torch(self.module, cache_attention_triton)
        else:
            _lower_torch(self.module)
        # Positions, prompts and the sampler follow the module's device (a model captured on CUDA).
        self.device = next(iter(self.module.buffers()), torch.empty(0)).device
        self.policy = pol.text
        self.report = GenerationReport(model_name, pol.text, backend, self.max_cache_len)
        self.report.sites = [self._record(cs, pol.variant_for(cs.site)) for cs in self.sites]
        self.report.compile_seconds = time.perf_counter() - t0
        self.last_logits: Optional[torch.Tensor] = None

    def _site_buffers(self, cs: CacheSite) -> list[torch.Tensor]:
        if cs.site.id in self.buffers:
            return [t for pair in self.buffers[cs.site.id] for t in pair]
        return [self.module.get_buffer(cs.k_buffer), self.module.get_buffer(cs.v_buffer)]

    def _record(self, cs: CacheSite, v: Variant) -> CacheSiteRecord:
        s = cs.site
        k = self._site_buffers(cs)[0]
        full = 2 * s.batch * s.num_kv_heads * cs.max_cache_len * s.head_dim * k.element_size()
        groups = self.layouts.get(s.id)
        return CacheSiteRecord(s.id, s.module, s.layer, v.text, layout_text(groups) if groups else "as exported",
                               s.num_heads, s.num_kv_heads, s.head_dim, full,
                               sum(t.nbytes for t in self._site_buffers(cs)), cs.q_offset, cs.valid_keys)

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache buffers hold (allocated once; constant while generating)."""
        return sum(t.nbytes for cs in self.sites for t in self._site_buffers(cs))

    @property
    def bounded(self) -> bool:
        """Every site's every cache group is a ring: generation may run past ``max_cache_len``."""
        return all(cs.site.id in self.layouts and all(g.bounded for g in self.layouts[cs.site.id])
                   for cs in self.sites)

    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if self._session is not None:
            return self._session.run(ids, start)
        positions = torch.arange(start, start + ids.shape[1], device=self.device)
        out = self.module(**{self._ids_name: ids, self._pos_name: positions})
        return out[0] if isinstance(out, (tuple, list)) else out

    def _check(self, input_ids, max_new_tokens: int) -> torch.Tensor:
        b = self.batch
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise InputError(f"input_ids must be a [{b}, n] tensor of token ids (torch.long)")
        if input_ids.shape[0] != b or input_ids.shape[1] < 1:
            raise InputError(f"input_ids has shape {list(input_ids.shape)}; this generator was captured for "
                             f"{b} prompt{'s' if b > 1 else ''} of equal length (at least one token), shape [{b}, n]; "
                             "capture with an example of the batch you generate")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        total = input_ids.shape[1] + max_new_tokens
        if not self.bounded and total > self.max_cache_len:
            raise InputError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                             f"exceeds max_cache_len={self.max_cache_len} of the full cache; raise max_cache_len "
                             "or use a bounded policy such as sinks:4,window:1024")
        return input_ids

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        for start in range(0, ids.shape[1], self._chunk):  # a fixed-length program prefills token by token
            logits = self._forward(ids[:, start:start + self._chunk], start)
        return logits

    @torch.no_grad()
    def score(self, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Teacher-forced decode: prefill ``ids[:, :prompt_len]``, then feed the rest of ``ids`` one
        token per step; the next-token logits of every step, ``[n - prompt_len, V]`` (fp32)."""
        self._check(ids[:, :prompt_len], ids.shape[1] - prompt_len)
        ids = ids.to(self.device)
        steps = [self._prefill(ids[:, :prompt_len])[:, -1]]
        for i in range(prompt_len, ids.shape[1] - 1):
            steps.append(self._forward(ids[:, i:i + 1], i)[:, -1])
        return torch.cat(steps).float()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None) -> torch.Tensor:
        """Prompts plus ``max_new_tokens`` tokens, ``[B, n + max_new_tokens]`` (``B`` prompts of equal
        length, the batch captured). Greedy unless ``do_sample``; the logits of every step are kept in
        ``last_logits``, ``[max_new_tokens * B, V]`` (step-major, as transformers' ``output_logits``
        concatenated)."""
        ids = self._check(input_ids, max_new_tokens).to(self.device)
        if do_sample and not temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, not {temperature!r}")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        n = ids.shape[1]
        t0 = time.perf_counter()
        logits = self._prefill(ids)
        t1 = time.perf_counter()
        steps = [logits[:, -1]]
        tokens = [_pick(steps[-1], do_sample, temperature, top_k, top_p, gen)]
        for i in range(1, max_new_tokens):
            steps.append(self._forward(tokens[-1], n + i - 1)[:, -1])
            tokens.append(_pick(steps[-1], do_sample, temperature, top_k, top_p, gen))
        t2 = time.perf_counter()
        self.last_logits = torch.cat(steps).float()
        r = self.report
        r.prompt_tokens, r.new_tokens, r.prefill_seconds, r.decode_seconds = n, max_new_tokens, t1 - t0, t2 - t1
        return torch.cat([ids, *tokens], dim=1)


def compile_generator(model: Union[torch.nn.Module, ExportedProgram, str, Path],
                      example_input_ids: Optional[torch.Tensor] = None, policy: PolicySpec = "fused",
                      max_cache_len: Optional[int] = None, backend: str = "torch", calibration=None,
                      budget: Optional[Fidelity] = None, streaming: str = "sinks:4,window:1024",
                      calibration_tokens: int = 32) -> Generator:
    """A ``Generator`` for a Hugging Face causal LM, an ``ExportedProgram`` or a ``.pt2`` exported
    with transformers' static-cache recipe. ``max_cache_len`` sizes the full cache (and the
    export); bounded policies generate past it.

    ``policy="auto"`` chooses which KV heads keep only the ``streaming`` cache (DuoAttention's
    split, by search: ``compiler.driver.generate_auto``) so that the next-token distributions over
    ``calibration_tokens`` decode steps after each ``calibration`` prompt (``[1, n]`` ids; default
    the example) stay within ``budget`` (``compiler.Fidelity``, e.g. ``max_kl``);
    ``report.auto`` records each head's measured effect and the choice."""
    t0 = time.perf_counter()
    _check_backend(backend)
    pol = parse_policy(policy)  # a bad policy fails before the (slow) capture
    if pol.auto:
        from compiler.driver.generate_auto import calibration_prompts, streaming_variant

        if budget is None:
            raise PolicyError("policy='auto' needs a budget, e.g. budget=compiler.Fidelity(max_kl=0.01)")
        if not isinstance(budget, Fidelity):
            raise PolicyError(f"budget must be a compiler.Fidelity, not {type(budget).__name__}")
        streaming_variant(streaming)
        prompts = calibration_prompts(calibration, example_input_ids)
    else:
        check_generation_policy(pol)
    if isinstance(model, (str, Path)):
        ep, name = _load(Path(model)), Path(model).stem
    elif isinstance(model, ExportedProgram):
        ep, name = model, "ExportedProgram"
    elif isinstance(model, torch.nn.Module):
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 2):
            raise InputError(f"max_cache_len must be an integer >= 2, not {max_cache_len!r}")
        ep = capture_for_generation(model, example_input_ids, max_cache_len or _default_max_len(model))
        name = type(model).__name__
    else:
        raise CaptureError(f"cannot generate with a {type(model).__name__}: give a Hugging Face causal LM, an "
                           "ExportedProgram or a .pt2 exported with transformers.integrations.executorch")
    record = None
    if pol.auto:
        from compiler.driver.generate_auto import choose_streaming_heads

        policy, record = choose_streaming_heads(ep, prompts, budget, streaming, calibration_tokens)
    g = Generator(ep, policy, backend, name)
    if record is not None:
        record["cache_bytes"], record["full_cache_bytes"] = g.cache_bytes, g.report.full_cache_bytes
        record["bytes_saved"] = g.report.full_cache_bytes - g.cache_bytes
        g.report.auto = record
    g.report.compile_seconds = time.perf_counter() - t0
    return g
