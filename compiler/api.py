"""``compile()``: capture, rewrite, verify, report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.export import ExportedProgram

import backends
from compiler.driver import auto, verify
from compiler.driver.auto import calibration_batches
from compiler.driver.budget import Fidelity
from compiler.driver.capture import capture, hf_defaults
from compiler.ir.errors import InputError, PolicyError, VerificationError, first_line
from compiler.driver.explain import attention_maps as explain_maps
from compiler.driver.explain import rewritten_subgraph
from compiler.ir.graph import shape
from compiler.driver.measure import SiteEffect, exact_probabilities, record_site_run, site_effect
from compiler.driver.pipeline import PassContext, exact_pipeline, variant_pipeline
from compiler.ir.plan import Plan
from compiler.variants.policy import Policy, PolicySpec, parse_policy
from compiler.driver.progress import quiet_dependencies, status
from compiler.ir.program import clone_program
from compiler.report.data import FidelityRecord, Report, SiteRecord
from compiler.driver.site_record import site_record
from compiler.variants.language import FUSED, Variant

_VIEWLIKE = {"view", "reshape", "_unsafe_view", "expand", "alias", "unsqueeze", "permute", "transpose", "detach"}


class CompiledModel:
    """The rewritten program, runnable on a backend, with the report of how it was made."""

    def __init__(self, exported_program: ExportedProgram, report: Report, backend: str = "torch",
                 default_kwargs: Optional[dict] = None, backend_options: Optional[dict] = None,
                 plan: Optional[Plan] = None):
        self.exported_program = exported_program
        self.report = report
        self.backend = backend
        # Keyword arguments fixed at capture (use_cache=False for Hugging Face models).
        self.default_kwargs = dict(default_kwargs or {})
        self.backend_options = backend_options
        self._run = backends.load(backend, exported_program, backend_options, plan)
        self.plan: Plan = self._run.plan
        report.plan = self.plan.summary()

    def __call__(self, *args, **kwargs):
        return self._run(*args, **{**self.default_kwargs, **kwargs})

    def save(self, path) -> Path:
        """Write the rewritten program: ``.onnx`` as an ONNX model (the one the onnxruntime backend
        runs), anything else with ``torch.export.save`` (read it back with ``compiler.load``). The
        plan goes next to it, as ``<path>.plan.json``."""
        path = Path(path)
        if path.suffix == ".onnx":
            if self.backend == "onnxruntime":
                self._run.save(path)
            else:
                from backends.onnx_export import export_onnx, save_onnx

                save_onnx(export_onnx(self.exported_program).model, path)
        else:
            # A whole file or none: written under a temporary name (ending in .pt2, as torch wants), then renamed.
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")
            try:
                with quiet_dependencies():
                    torch.export.save(self.exported_program, tmp)
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
        self.plan.save(plan_path(path))
        return path


def plan_program(ep: ExportedProgram, backend: str = "torch") -> Plan:
    """The execution plan ``backend`` would run ``ep`` by, without lowering or running anything."""
    from backends.capabilities import prepare
    from backends.planner import make_plan

    backends.check(backend)
    return make_plan(prepare(ep, backend).module(), backend)


def plan_path(path) -> Path:
    """Where a compiled model's plan is saved, next to it."""
    path = Path(path)
    return path.with_name(path.name + ".plan.json")


def load_program(path) -> ExportedProgram:
    """``torch.export.load``, with one line naming the real cause when the file cannot be read."""
    import zipfile

    import compiler  # noqa: F401  (our ops and Hugging Face output types, which the program may use)

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}; give a .pt2 written by "
                         "torch.export.save or CompiledModel.save")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a .pt2 archive written by torch.export.save (not a zip file)")
    try:
        with quiet_dependencies():
            return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line with its cause
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:200]
        cause = f"{type(e).__name__}: {first}" if first else type(e).__name__
        hint = ("import the package that defines that type first" if "in pytree is not registered" in first
                else "the file is damaged or was written by another torch version; export it again")
        raise InputError(f"{path}: torch.export.load cannot read it ({cause}); {hint}") from None


def load(path, backend: str = "torch", backend_options: Optional[dict] = None) -> CompiledModel:
    """A compiled model saved as ``.pt2`` by ``CompiledModel.save``, with the plan saved next to it
    (planned again if the plan is missing or was made for another backend)."""
    path = Path(path)
    ep = load_program(path)
    sidecar = plan_path(path)
    plan = Plan.load(sidecar) if sidecar.is_file() else None
    report = Report(model=path.stem, policy="(loaded)", backend=backend)
    return CompiledModel(ep, report, backend, backend_options=backend_options, plan=plan,
                         default_kwargs=fixed_kwargs(ep))


def fixed_kwargs(ep: ExportedProgram) -> dict:
    """Keyword arguments captured as constants (``use_cache=False``): the program takes only these values."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    spec = ep.call_spec.in_spec
    names = set(spec.child(1).context) if spec is not None and spec.num_children == 2 else set()
    return {s.arg.name: s.arg.value for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and isinstance(s.arg, ConstantArgument) and s.arg.name in names}


def _intermediate_bytes(nodes) -> int:
    total = 0
    for n in nodes:
        v = n.meta.get("val")
        name = getattr(getattr(n.target, "_overloadpacket", None), "__name__", "")
        if isinstance(v, torch.Tensor) and name not in _VIEWLIKE:
            s = shape(n)
            total += int(torch.Size(s).numel()) * v.element_size()
    return total


def _site_record(m, status: str, reason: str = "", err: Optional[float] = None, variant: Optional[Variant] = None,
                 effect: Optional[SiteEffect] = None) -> SiteRecord:
    rewritten = status == "rewritten"
    return site_record(m.site, (variant or FUSED).text if rewritten else "dense", status,
                       intermediate_bytes=_intermediate_bytes(m.internal), exact_after=rewritten, reason=reason,
                       max_abs_error=err, effect=effect)


@dataclass
class SiteChecks:
    bad: dict[str, str] = field(default_factory=dict)  # site -> why it is rolled back
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # site -> (error, magnitude), example
    checked: list[str] = field(default_factory=list)  # labels of the input sets the sites were checked on
    rows: Optional[int] = None  # query rows of a long site compared per input set (None = all)
    forced_outputs: Any = None  # the program's outputs on the example with every site given the original's value


def _original_names(original: ExportedProgram, ctx: PassContext) -> bool:
    """Whether the original program computes every rewritten site's output under the node name
    it has before fusion (same op, same shape and dtype): then the per-site references are taken
    from the original's own run, the one the end-to-end reference comes from."""
    orig = {n.name: n for n in original.graph.nodes}
    before = {n.name: n for n in ctx.before_fusion.graph.nodes}
    for sid in ctx.fusion.rewritten:
        name = ctx.fusion.output_nodes[sid]
        a, b = orig.get(name), before.get(name)
        if a is None or b is None or a.op != "call_function" or a.target != b.target:
            return False
        va, vb = a.meta.get("val"), b.meta.get("val")
        if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
                and str(tuple(va.shape)) == str(tuple(vb.shape))):
            return False
    return True


def _site_checks(ctx: PassContext, checks: list, originals: verify.OriginalRuns) -> SiteChecks:
    """Check every rewritten site on every input set: its value against the same site in the
    original (the program before fusion when the original does not name it alike), each site
    fed the values the original gives it (so one wrong site costs one site).

    A forced site's own value is needed only to compare, since its consumers get the
    original's: a long exact site computes just the query rows measurement samples
    (``verify.forced_run``, stated as ``SiteChecks.rows``). An input set the program before
    fusion cannot run is no check if the original cannot run it either (asked only then, so
    the sets are not validated up front), and the passes' fault if it can."""
    f = ctx.fusion
    res = SiteChecks()
    if not f.rewritten:
        return res
    same_names = _original_names(originals.ep, ctx)
    names = [f.output_nodes[sid] for sid in f.rewritten]
    for i, (label, args, kwargs) in enumerate(checks):
        live = [sid for sid in f.rewritten if sid not in res.bad]
        if not live:
            break
        # Every site, bad ones too, continues from the original's value: each is checked alone.
        try:
            ref = (originals.get(i, names)[0] if same_names
                   else verify.node_values(ctx.before_fusion, args, kwargs, names))
        except verify.RunFailure:
            if i == 0 or (not same_names and _runs(originals, i)):
                raise  # the cleaned-up program fails where the original runs: its passes are at fault
            continue  # the original does not accept these inputs: not a check
        res.checked.append(label)
        forced = {f.site_outputs[sid]: ref[f.output_nodes[sid]] for sid in f.rewritten if f.output_nodes[sid] in ref}
        try:
            run = verify.forced_run(ctx.ep, args, kwargs, forced, sample_rows=True)
        except verify.RunFailure as e:
            sid = _site_upstream_of(ctx, e.node)
            if sid is None:
                raise
            res.bad[sid] = f"the rewritten program fails on {label} ({e}); rolled back"
            return res
        if i == 0:
            res.forced_outputs = run.outputs
        new = run.values
        for sid in live:
            r, n = ref.get(f.output_nodes[sid]), new.get(f.site_outputs[sid])
            if r is None or n is None:
                res.bad[sid] = "site output not computed; rolled back"
                continue
            finite = r.detach()[torch.isfinite(r)] if r.is_floating_point() else r
            magnitude = float(finite.abs().max()) if finite.numel() else 1.0
            ranges = run.rows.get(f.site_outputs[sid])
            if ranges is not None:
                r = r.reshape(n.shape[0], n.shape[1], -1, n.shape[-1])
                r = torch.cat([r[:, :, a:z] for a, z in ranges], 2)
                rows = sum(z - a for a, z in ranges)
                res.rows = rows if res.rows is None else max(res.rows, rows)
            err = verify.max_abs_error(r, n, nan_is_undefined=i > 0)
            t = verify.tolerance(r.dtype, magnitude)
            if i == 0:
                res.errors[sid] = (err, magnitude)
            if not err <= t:
                res.bad[sid] = f"site output differs by {err:.2e} (> {t:.1e}) on {label}; rolled back"
    return res


def _runs(originals: verify.OriginalRuns, i: int) -> bool:
    try:
        originals.get(i)
    except verify.RunFailure:
        return False
    return True


def _site_upstream_of(ctx: PassContext, node_name: str) -> Optional[str]:
    """The rewritten site nearest upstream of ``node_name`` (inclusive), if any."""
    nodes = {n.name: n for n in ctx.ep.graph.nodes}
    node = nodes.get(node_name)
    if node is None:
        return None
    from compiler.ir.graph import ancestors

    up = ancestors(node)
    order = {n: i for i, n in enumerate(ctx.ep.graph.nodes)}
    best = None
    for sid, name in ctx.fusion.site_outputs.items():
        n = nodes.get(name)
        if n is not None and n in up and (best is None or order[n] > order[best[1]]):
            best = (sid, n)
    return best[0] if best else None


def _failing_site(ctx: PassContext, args, kwargs) -> Optional[str]:
    """The site nearest upstream of where the rewritten program raises, if any."""
    try:
        verify.forced_values(ctx.ep, args, kwargs, {})
    except verify.RunFailure as e:
        return _site_upstream_of(ctx, e.node)
    return None


# ``verification["end_to_end"]`` when the backend's program is the one checked end to end.
LOWERED = "the backend's program"

# Passes that may be left out when the program they leave fails end-to-end verification.
CLEANUP_PASSES = frozenset({"constant_folding", "common_subexpression_elimination", "layout_cleanup"})


def _exact_variants(ctx: PassContext, pol: Policy) -> list[bool]:
    """Whether each rewritten site's variant is exact, known before calibration (none under
    ``auto``, whose variants calibration chooses)."""
    if pol.auto:
        return []
    sites = {m.site.id: m.site for m in ctx.discovery.matches}
    return [pol.variant_for(sites[sid]).exact for sid in ctx.fusion.rewritten]


def _approximate_only(ctx: PassContext, pol: Policy) -> bool:
    """Every rewritten site gets an approximate variant: the exact program is never returned,
    only its sites' agreement with the original matters."""
    exact = _exact_variants(ctx, pol)
    return bool(exact) and not any(exact)


def _exact_only(ctx: PassContext, pol: Policy) -> bool:
    """Every rewritten site keeps exact attention: the exact program, lowered, is the one returned."""
    exact = _exact_variants(ctx, pol)
    return bool(exact) and all(exact)


def _fuse_exact(ep: ExportedProgram, pol: Policy, args: tuple, kwargs: dict, originals: verify.OriginalRuns,
                checks: list, lowered_check: bool = False):
    """Discover and fuse every site the policy does not leave dense, exactly; roll back any
    site whose fused output differs from the original beyond rounding, on the example inputs
    and on ``checks`` (``verify.verification_inputs``, not validated: a set the original does
    not accept is skipped; empty: verification is off).

    The end-to-end check runs the fused program on the example, unless every site will be
    replaced by an approximate variant: then the exact program is never returned, and the
    program around the sites is checked by the forced run instead (every site given the
    original's value, its outputs must equal the original's), so a wrong pass outside the sites
    is still caught; the approximate program is compared end to end afterwards. With
    ``lowered_check``, an exact program is not run end to end here either: the backend's lowering
    of it is, against the original (``_check_lowered``), one forward pass fewer.

    A program that still differs end to end is never returned: the cleanup passes are left out,
    then every site is rolled back, then ``VerificationError``.
    """
    excluded: dict[str, str] = {}
    skipped_passes: set[str] = set()
    while True:
        ctx = PassContext(clone_program(ep), pol, exclude=set(excluded), skip_passes=set(skipped_passes))
        records = exact_pipeline().run(ctx)
        if not checks:
            return ctx, records, excluded, SiteChecks()
        reference = _reference(originals, ctx)
        try:
            sc = _site_checks(ctx, checks, originals)
        except verify.RunFailure as e:
            sc, failure = SiteChecks(), str(e)
        else:
            failure = None
        if sc.bad:
            excluded.update(sc.bad)
            continue
        composed = sc.forced_outputs is not None and _approximate_only(ctx, pol)
        lowered = failure is None and lowered_check and _exact_only(ctx, pol)
        if failure is None and not lowered:
            try:
                if composed:
                    cmp = verify.compare(reference, sc.forced_outputs)
                else:
                    ctx.exact_outputs = verify.run(ctx.ep, args, kwargs)
                    cmp = verify.compare(reference, ctx.exact_outputs)
                if not cmp["passed"]:
                    failure = f"outputs differ by {cmp['max_abs_error']:.2e} (over tolerance {cmp['tolerance']:.1e})"
            except Exception as e:  # noqa: BLE001 - a program that does not run fails verification
                failure = first_line(e, 200, type(e).__name__)
                sid = _failing_site(ctx, args, kwargs)
                if sid is not None:
                    excluded[sid] = f"the rewritten program fails on the example inputs ({failure}); rolled back"
                    continue
        if failure is None:
            ctx.verification = {"inputs": sc.checked or [checks[0][0]], "passes_left_out": sorted(skipped_passes),
                                "site_rows": sc.rows,
                                "end_to_end": ("sites forced to the original's values" if composed else
                                               LOWERED if lowered else "exact program")}
            return ctx, records, excluded, sc
        if not CLEANUP_PASSES <= skipped_passes:
            skipped_passes |= CLEANUP_PASSES
            continue
        if ctx.fusion.rewritten:
            for sid in ctx.fusion.rewritten:
                excluded[sid] = f"end-to-end check failed ({failure}); rolled back"
            continue
        raise VerificationError(f"the compiled program differs from the model even with no site rewritten ({failure}); "
                                "compile with policy='dense' to capture only, and please report this model")


def _reference(originals: verify.OriginalRuns, ctx: Optional[PassContext] = None):
    """The original's outputs on the example inputs (recording the rewritten sites' outputs on the
    same run when the original names them alike), or one line saying the inputs do not fit."""
    names = ([ctx.fusion.output_nodes[sid] for sid in ctx.fusion.rewritten]
             if ctx is not None and ctx.fusion is not None and _original_names(originals.ep, ctx) else [])
    try:
        return originals.get(0, names)[1]
    except verify.RunFailure as e:  # the user's inputs do not fit their own program
        raise InputError(f"the example inputs do not run through the program ({first_line(e, 200)}); give "
                         "inputs shaped like the ones it was exported with") from None


def _check_batches(ep: ExportedProgram, batches: list, defaults: dict) -> None:
    """Fill keyword defaults fixed at capture (``use_cache=False``) and make sure every batch
    fits the captured program, with a message that says what to change."""
    for i, (args, kw) in enumerate(batches):
        for k, v in defaults.items():
            if k not in kw and not isinstance(v, torch.Tensor):
                kw[k] = v
        try:
            ep._graph_module_flat_inputs(args, kw)
            verify.run(ep, args, kw)
        except Exception as e:
            first = first_line(e, 200, type(e).__name__)
            raise InputError(f"calibration batch {i} does not fit the captured program ({first}); give batches "
                             "shaped like the example inputs, or capture with dynamic shapes") from None


def _check_other_size(ep: ExportedProgram, new: ExportedProgram, args: tuple, kwargs: dict, fid: FidelityRecord,
                      exact: bool, budget: Optional[Fidelity], checks: Optional[list] = None) -> None:
    """A dynamic program's final form (approximate variants included) is also compared end to end
    at another size inside its bounds; ``fid`` then holds the worst of both. An exact rewrite that
    differs there is not returned. ``checks``: the input sets already built for the example."""
    if checks is None:
        checks = verify.verification_inputs(ep, args, kwargs, validate=False)
    for label, a2, kw2 in checks[1:]:
        if label != "another length":
            continue
        try:
            ref = verify.run(ep, a2, kw2)
        except Exception:  # noqa: BLE001 - the original does not accept these inputs: not a check
            continue
        cmp = verify.compare(ref, verify.run(new, a2, kw2))
        fid.checked_inputs.append(f"{label} (end to end)")
        fid.max_abs_error = max(fid.max_abs_error, cmp["max_abs_error"])
        fid.kl_divergence = max(fid.kl_divergence, cmp["kl_divergence"])
        fid.cosine_similarity = min(fid.cosine_similarity, cmp["cosine_similarity"])
        if exact and not cmp["passed"]:
            raise VerificationError(f"the rewritten program matches the original on the example inputs but not at "
                                    f"another length: max abs error {cmp['max_abs_error']:.2e} (> "
                                    f"{cmp['tolerance']:.1e}); nothing returned. Capture with static shapes "
                                    "(dynamic_shapes=None) to rewrite at the example size")
        if budget is not None and fid.passed is not False:
            fid.passed = budget.holds(cmp)


@dataclass
class _Request:
    """What compile_program was asked, as each attempt at it needs it."""

    ep: ExportedProgram
    args: tuple
    kwargs: dict
    pol: Policy
    backend: str
    verify_outputs: bool
    model_name: Optional[str]
    calibration: Any
    budget: Optional[Fidelity]
    show_progress: Optional[bool]
    attention_maps: bool
    backend_options: Optional[dict]


class _TorchProgramDiffers(Exception):
    """The backend's program failed its end-to-end check and so does the rewritten torch program:
    compile again, checking that program first, which rolls back what broke it."""


@quiet_dependencies()
def compile_program(
    ep: ExportedProgram,
    example_inputs: tuple = (),
    example_kwargs: Optional[dict] = None,
    policy: PolicySpec = "fused",
    backend: str = "torch",
    verify_outputs: bool = True,
    model_name: Optional[str] = None,
    calibration=None,
    budget: Optional[Fidelity] = None,
    show_progress: Optional[bool] = None,
    attention_maps: bool = False,
    backend_options: Optional[dict] = None,
) -> CompiledModel:
    t0 = time.perf_counter()
    pol = parse_policy(policy)
    if budget is not None and not isinstance(budget, Fidelity):
        raise PolicyError(f"budget must be a compiler.Fidelity, not {type(budget).__name__}")
    if pol.auto and budget is None:
        raise PolicyError("policy='auto' needs a budget, e.g. budget=compiler.Fidelity(min_cosine=0.99)")
    if pol.auto and not verify_outputs:
        raise PolicyError("policy='auto' chooses by measured fidelity; it cannot run with verify=False")
    kwargs = dict(example_kwargs or {})
    req = _Request(ep, example_inputs, kwargs, pol, backend, verify_outputs, model_name, calibration, budget,
                   show_progress, attention_maps, backend_options)
    checks = verify.verification_inputs(ep, example_inputs, kwargs, validate=False) if verify_outputs else []
    originals = verify.OriginalRuns(ep, checks)  # shared by both attempts: the original runs once per input set
    try:
        cm = _compile_checked(req, originals, checks, lowered_check=backends.get(backend).checks_its_program)
    except _TorchProgramDiffers:
        cm = _compile_checked(req, originals, checks, lowered_check=False)
    cm.report.compile_seconds = time.perf_counter() - t0
    return cm


def _compile_checked(req: _Request, originals: verify.OriginalRuns, checks: list, lowered_check: bool) -> CompiledModel:
    """Rewrite, verify and lower ``req``'s program; ``lowered_check``: an exact rewrite is checked
    end to end as the backend runs it (``_check_lowered``), not first as a torch program."""
    ep, example_inputs, kwargs, pol, budget = req.ep, req.args, req.kwargs, req.pol, req.budget
    verify_outputs, attention_maps = req.verify_outputs, req.attention_maps
    with status("finding, fusing and verifying attention", req.show_progress):
        # Attention maps read each site's inputs from a run of the torch program: it runs anyway.
        ctx, records, excluded, sc = _fuse_exact(ep, pol, example_inputs, kwargs, originals, checks,
                                                 lowered_check=lowered_check and verify_outputs and not attention_maps)
    reference = _reference(originals) if verify_outputs else None  # recorded by the checks' first run
    lowered = ctx.verification.get("end_to_end") == LOWERED
    site_err = sc.errors
    matches = {m.site.id: m for m in ctx.discovery.matches}
    sites = {sid: m.site for sid, m in matches.items()}
    fused = list(ctx.fusion.rewritten)

    auto_record = None
    if pol.auto:
        batches = calibration_batches(req.calibration, (example_inputs, kwargs))
        _check_batches(ep, batches, kwargs)
        choice = auto.choose(ep, ctx.ep, sites, {sid: ctx.fusion.fused_nodes[sid] for sid in fused}, batches,
                             budget, show_progress=req.show_progress)
        ctx.variants, auto_record = choice.assignment, choice.record
    else:
        ctx.variants = {sid: pol.variant_for(sites[sid]) for sid in fused}
    records += variant_pipeline().run(ctx)

    effects: dict[str, SiteEffect] = {}
    fid = FidelityRecord()
    if verify_outputs:
        approx = {sid: v for sid, v in ctx.variants.items() if not v.exact}
        nodes = ctx.variant_result.nodes
        wanted = ctx.variants if attention_maps else approx
        if lowered:  # exact sites only, the program checked end to end as the backend runs it (below)
            inputs, site_out, final = {}, {}, None
        elif wanted or ctx.exact_outputs is None or ctx.variant_result.applied:
            # One run gives the sites' inputs, the variants' outputs and the program's outputs.
            inputs, site_out, final = record_site_run(ctx.ep, example_inputs, kwargs, [nodes[s] for s in wanted])
        else:  # no variant changed the exact program verified end to end: its outputs stand
            inputs, site_out, final = {}, {}, ctx.exact_outputs
        for sid, var in approx.items():
            x = inputs[nodes[sid]]
            effects[sid] = site_effect(var, x, exact_probs=exact_probabilities(x), output=site_out.get(nodes[sid]))
        rows = ctx.verification.get("site_rows")
        each = f"each site, {rows} sampled query rows" if rows else "each site"
        per_site = [f"{label} ({each})" for label in ctx.verification.get("inputs", [])[1:]]
        if not lowered:
            fid = _fidelity(verify.compare(reference, final), bool(approx), budget, ["example inputs", *per_site])
            _check_other_size(ep, ctx.ep, example_inputs, kwargs, fid, exact=not approx, budget=budget,
                              checks=checks)
        if pol.auto:
            got = [verify.compare(verify.run(ep, *b), verify.run(ctx.ep, *b)) for b in batches]
            auto_record["verified_calibration_fidelity"] = {
                "max_abs_error": max(g["max_abs_error"] for g in got),
                "kl_divergence": max(g["kl_divergence"] for g in got),
                "cosine_similarity": min(g["cosine_similarity"] for g in got),
            }

    report = Report(
        model=req.model_name or "ExportedProgram",
        policy=pol.text,
        backend=req.backend,
        passes=records,
        rejected=ctx.discovery.rejected,
        fidelity=fid,
        budget=budget.to_dict() if budget is not None else None,
        auto=auto_record,
    )
    graph_nodes = {n.name: n for n in ctx.ep.graph.nodes}
    old_names = {n.name for n in ctx.before_fusion.graph.nodes}
    for sid, m in matches.items():
        if sid in ctx.variants:
            err = site_err[sid][0] if sid in site_err else None
            rec = _site_record(m, "rewritten", err=err, variant=ctx.variants[sid], effect=effects.get(sid))
            node = graph_nodes.get(ctx.variant_result.nodes.get(sid))
            if node is not None:
                rec.subgraph_after = rewritten_subgraph(node, old_names)
            if attention_maps and verify_outputs and node is not None:
                rec.attention_map = explain_maps(inputs[node.name], ctx.variants[sid])
            report.sites.append(rec)
        elif sid in excluded:
            report.sites.append(_site_record(m, "rolled_back", excluded[sid]))
        elif sid in ctx.fusion.skipped:
            report.sites.append(_site_record(m, "skipped", ctx.fusion.skipped[sid]))
        else:
            report.sites.append(_site_record(m, "kept", "policy keeps this site dense"))
    for rec in report.sites:
        rec.subgraph_before = ctx.subgraphs.get(rec.id)
    cm = CompiledModel(ctx.ep, report, req.backend, backend_options=req.backend_options)
    if lowered:
        _check_lowered(cm, ep, ctx.ep, reference, example_inputs, kwargs, budget, per_site)
        _check_other_size(ep, ctx.ep, example_inputs, kwargs, report.fidelity, exact=True, budget=budget,
                          checks=checks)
    else:
        _record_lowering(cm, example_inputs, kwargs, final if verify_outputs else None, ep, reference)
    return cm


def _fidelity(cmp: dict, approximate: bool, budget: Optional[Fidelity], checked: list) -> FidelityRecord:
    """The record of ``cmp`` (``verify.compare`` against the original): exact tolerances and the
    budget (if any) for an exact program, the budget alone for an approximate one."""
    if approximate:
        cmp["tolerance"] = None
        cmp["passed"] = budget.holds(cmp) if budget is not None else None
    elif budget is not None:
        cmp["passed"] = cmp["passed"] and budget.holds(cmp)
    return FidelityRecord(**cmp, checked_inputs=checked)


def _record_lowering(cm: CompiledModel, args: tuple, kwargs: dict, verified: Optional[Any],
                     original: Optional[ExportedProgram] = None, reference: Any = None) -> None:
    """What the backend made of each site; and, where it lowered anything, its outputs on the
    example inputs against ``verified`` (the outputs of the program it lowered, already checked
    against the original ``reference``). A backend that disagrees with that program by more than
    its own rounding of the ``original`` (``_backend_rounding``) has a lowering bug, and compile()
    fails in one line rather than return a program nothing verified."""
    summary = cm._run.lowering_summary()
    if summary is None:
        return  # the backend runs the verified program's own ops
    if verified is not None:
        ours = cm(*args, **kwargs)
        summary = cm._run.lowering_summary()  # Triton kernels record their choices as they run
    else:
        ours = None
    low = _lowering_record(cm, summary)
    if ours is None:
        return
    cmp = verify.compare(verified, ours)
    if not cmp["passed"]:
        _within_rounding(cm, cmp, original, reference, args, kwargs)
    low["checked_against"] = "the torch program"
    low["max_abs_error_vs_torch"] = cmp["max_abs_error"]
    low["tolerance_vs_torch"], low["matches_torch"] = cmp["tolerance"], cmp["passed"]
    low["rounding_of_original"] = cmp.get("rounding_of_original")


def _lowering_record(cm: CompiledModel, summary) -> dict:
    """The report's ``lowering`` section and each site's lowering, from the backend's summary."""
    low = summary.report()
    for rec in cm.report.sites:
        rec.lowering = summary.lowerings.get(rec.id)
    cm.report.lowering = low
    return low


# The most dense attention scores (bytes, one site) the backend may materialise to measure its
# own rounding of the original program.
ROUNDING_PROBE_BYTES = 1 << 30


def _backend_rounding(cm: CompiledModel, original: Optional[ExportedProgram], reference, args: tuple,
                      kwargs: dict) -> Optional[float]:
    """How far the backend's run of the *original* program is from the original's ``reference``:
    the backend's own rounding on this model, which no rewrite caused. onnxruntime's kernels
    accumulate in other orders than PyTorch's: all-MiniLM-L6-v2, not rewritten at all, differs by
    6-9e-5 on outputs up to 5.7, over the exact 1e-5 relative tolerance. None when the original
    cannot run there, or at a length where its dense attention would not fit."""
    if original is None or reference is None:
        return None
    # The backend runs the original's attention as written: dense scores per site. Past a budget
    # (long context) they would not fit; the difference is then reported as it is.
    scores = max((4 * r.batch * r.num_heads * r.seq_q * r.seq_k for r in cm.report.sites), default=0)
    if scores > ROUNDING_PROBE_BYTES:
        return None
    try:
        run = backends.load(cm.backend, original, cm.backend_options)
        with torch.no_grad():
            return verify.compare(reference, run(*args, **kwargs))["max_abs_error"]
    except Exception:  # noqa: BLE001 - no estimate; the caller reports the disagreement as it is
        return None


def _within_rounding(cm: CompiledModel, cmp: dict, original, reference, args: tuple, kwargs: dict) -> None:
    """``cmp`` (the backend's program against a verified program) failed the exact tolerance.
    Within that tolerance plus twice the backend's own rounding of the original program it is
    the backend's arithmetic, and ``cmp`` is updated to say so (the widened tolerance, the
    rounding); beyond it, the lowering is wrong: ``VerificationError``."""
    rounding = _backend_rounding(cm, original, reference, args, kwargs)
    over = f"max abs error {cmp['max_abs_error']:.2e} over the {cmp['tolerance']:.0e} tolerance"
    if rounding is None:
        raise VerificationError(f"the {cm.backend} backend's program differs from the verified program on the example "
                                f"inputs ({over}), and its own rounding of the original model could not be measured "
                                "here to tell the two apart; nothing returned; backend='torch' runs the verified ops")
    if not cmp["max_abs_error"] <= cmp["tolerance"] + 2 * rounding:
        raise VerificationError(f"the {cm.backend} backend's program disagrees with the verified program on the example "
                                f"inputs ({over} and {cm.backend}'s own rounding of the original model, "
                                f"{rounding:.1e}); this is an attnforge bug, please report it; backend='torch' runs "
                                "the verified ops")
    cmp.update(tolerance=cmp["tolerance"] + 2 * rounding, passed=True, rounding_of_original=rounding)


def _check_lowered(cm: CompiledModel, original: ExportedProgram, program: ExportedProgram, reference, args: tuple,
                   kwargs: dict, budget: Optional[Fidelity], per_site: list) -> None:
    """An exact rewrite checked end to end as the backend runs it: its outputs on the example
    against the original's, the report's fidelity (``_fuse_exact`` checked each site and left
    the whole to this). Where they differ, the rewritten torch ``program`` runs to say whose
    fault it is: its own (``_TorchProgramDiffers``: compile again, checking it first, which rolls
    back what broke it) or the backend's: its rounding (``_within_rounding``) or its lowering (an
    attnforge bug, one line)."""
    summary = cm._run.lowering_summary()
    ours = cm(*args, **kwargs) if summary is not None else verify.run(program, args, kwargs)
    cmp = verify.compare(reference, ours)
    if not cmp["passed"]:
        if summary is None:
            raise _TorchProgramDiffers()
        if not verify.compare(reference, verify.run(program, args, kwargs))["passed"]:
            raise _TorchProgramDiffers()
        _within_rounding(cm, cmp, original, reference, args, kwargs)
    rounding = cmp.pop("rounding_of_original", None)
    example = f"example inputs ({cm.backend} program)" if summary is not None else "example inputs"
    cm.report.fidelity = _fidelity(cmp, False, budget, [example, *per_site])
    if summary is not None:
        low = _lowering_record(cm, summary)
        low["checked_against"] = "the original"  # no torch run to compare with
        low["rounding_of_original"] = rounding


@quiet_dependencies()
def compile(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: tuple = (),
    policy: PolicySpec = "fused",
    backend: str = "torch",
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    verify: bool = True,
    calibration=None,
    budget: Optional[Fidelity] = None,
    show_progress: Optional[bool] = None,
    attention_maps: bool = False,
    backend_options: Optional[dict] = None,
) -> CompiledModel:
    """Capture ``model``, rewrite its attention by ``policy`` and return a runnable model.

    ``cm(*inputs)`` gives the model's outputs with the same structure; ``cm.report`` says what
    every pass did; ``cm.exported_program`` is the rewritten program; ``cm.save(path)``.

    ``policy="auto"`` chooses a variant per site so that the outputs on ``calibration`` (a list
    of batches: tuples of args or dicts of kwargs; default the example inputs) stay within
    ``budget`` (``compiler.Fidelity``). With another policy, a budget is checked and reported.
    ``attention_maps=True`` stores each site's attention maps (example input, batch 0) in the
    report for ``attnforge inspect --html``.

    ``backend="onnxruntime"`` exports the rewritten program to ONNX and runs it in an
    InferenceSession; ``backend_options`` sets its ``providers``, ``intra_op_num_threads``,
    ``graph_optimization_level``, ``optimized_model_path`` and ``io_binding``.
    """
    backends.check(backend)
    t0 = time.perf_counter()
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    with status(f"capturing {type(model).__name__} with torch.export", show_progress):
        ep = capture(model, example_inputs, dynamic_shapes, example_kwargs)
    kwargs = dict(example_kwargs or {})
    if isinstance(model, torch.nn.Module):
        kwargs = hf_defaults(model, kwargs)
    name = type(model).__name__
    cm = compile_program(ep, example_inputs, kwargs, policy, backend, verify, name, calibration, budget, show_progress,
                         attention_maps, backend_options)
    cm.default_kwargs = {k: v for k, v in kwargs.items() if k not in (example_kwargs or {})}
    cm.report.compile_seconds = time.perf_counter() - t0
    return cm
