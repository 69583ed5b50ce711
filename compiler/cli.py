"""The ``attnforge`` command: rewrite exported programs, inspect reports, run the demo."""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path

from compiler.ir.errors import AttnforgeError, InputError, first_line


def _die(msg: str, code: int = 2) -> int:
    print(f"attnforge: error: {msg}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: the problem, then where the usage is."""

    def error(self, message):
        self.exit(2, f"attnforge: error: {message}; see {self.prog} --help\n")


def _count(text: str) -> int:
    """A non-negative whole number (``--threads``)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; give 0 (onnxruntime's default) or more")
    return n


# One example input at most this many elements: a typo (1x1280000000) should not allocate for minutes.
MAX_EXAMPLE_ELEMENTS = 2**28


def _parse_shape(spec: str):
    """``name=2x16:int64`` or ``2x16`` (float32) -> (name or None, shape, dtype)."""
    import torch

    text, name = spec, None
    if "=" in spec:
        name, spec = spec.split("=", 1)
        if not name.isidentifier():
            raise InputError(f"--example-shape {text!r}: {name!r} is not an input name")
    dtype = "float32"
    if ":" in spec:
        spec, dtype = spec.split(":", 1)
    try:
        dims = [int(d) for d in spec.lower().split("x")]
    except ValueError:
        raise InputError(f"--example-shape {text!r}: expected dims like 2x16, optionally name=2x16:int64") from None
    if any(d < 1 for d in dims):
        raise InputError(f"--example-shape {text!r}: every dim must be at least 1")
    if math.prod(dims) > MAX_EXAMPLE_ELEMENTS:
        raise InputError(f"--example-shape {text!r}: {math.prod(dims):,} elements is more than an example needs "
                         f"(at most {MAX_EXAMPLE_ELEMENTS:,})")
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise InputError(f"--example-shape {text!r}: unknown dtype {dtype!r} (e.g. float32, int64, bool)")
    return name, dims, dt


def _example(shapes: list[str]):
    import torch

    args, kwargs = [], {}
    g = torch.Generator().manual_seed(0)
    for s in shapes:
        name, dims, dt = _parse_shape(s)
        if dt == torch.bool:
            t = torch.ones(dims, dtype=dt)
        elif dt.is_floating_point or dt.is_complex:
            t = torch.randn(dims, generator=g, dtype=dt)
        else:
            t = torch.randint(0, 2, dims, generator=g).to(dt)
        if name in kwargs:
            raise InputError(f"--example-shape names {name} twice")
        if name:
            kwargs[name] = t
        else:
            args.append(t)
    return tuple(args), kwargs


def _load_pt2(path: Path):
    from compiler.api import load_program

    return load_program(path)


def _policy_arg(text: str):
    """A policy string, or a JSON object for per-site rules."""
    import json

    from compiler.ir.errors import PolicyError

    if text.strip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"--policy looks like JSON but does not parse ({e})") from None
    return text


def _budget_arg(a):
    from compiler.driver.budget import Fidelity

    if a.min_cosine is None and a.max_kl is None and a.max_abs_error is None:
        return None
    return Fidelity(max_abs_error=a.max_abs_error, max_kl=a.max_kl, min_cosine=a.min_cosine)


def _calibration_arg(path):
    import torch

    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such calibration file")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:
        first = first_line(e, 200, type(e).__name__)
        raise InputError(f"{path}: not a calibration file written by torch.save ({first})") from None
    if not isinstance(data, (list, tuple)) or not data:
        raise InputError(f"{path}: expected a non-empty list of batches (tuples of tensors or dicts of tensors), "
                         f"got {type(data).__name__}")
    return list(data)


def _check_budget(report) -> None:
    f = report.fidelity
    if report.budget and f.passed is False:
        raise InputError(f"the rewrite misses the budget ({', '.join(f'{k}={v:g}' for k, v in report.budget.items())}): "
                         f"max abs error {f.max_abs_error:.3g}, KL {f.kl_divergence:.3g}, cosine "
                         f"{f.cosine_similarity:.6f}; nothing written. Use a milder policy or policy=auto")


def _example_for(ep, shapes: list, src: Path):
    """The example inputs to compile with: --example-shape held against the program, else the
    inputs stored in the .pt2; checked by running the program once, before the long work."""
    from compiler.driver import verify
    from compiler.driver.example_inputs import fit_example

    if shapes:
        args, kwargs = fit_example(ep, *_example(shapes))
    elif ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
    else:
        raise InputError(f"{src} stores no example inputs; give --example-shape (e.g. input_ids=1x128:int64)")
    try:
        verify.run(ep, tuple(args), dict(kwargs))
    except Exception as e:  # noqa: BLE001 - the program's own guard says what it expects
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
        raise InputError(f"{src} does not run on these example inputs ({first}); give --example-shape shaped "
                         "as the program was captured") from None
    return tuple(args), dict(kwargs)


def cmd_rewrite(a) -> int:
    from compiler.api import compile_program, plan_path
    from compiler.ir.errors import PolicyError
    from compiler.driver.paths import check_input, check_outputs
    from compiler.variants.policy import parse_policy

    src, out = Path(a.input), Path(a.output)
    if src.suffix not in (".pt2", ".onnx"):
        raise InputError(f"{src}: expected a .pt2 file from torch.export.save or an .onnx model")
    if out.suffix not in (".pt2", ".onnx"):
        raise InputError(f"{out}: write a .pt2 (ExportedProgram) or an .onnx model")
    if src.suffix == ".onnx" and out.suffix != ".onnx":
        raise InputError(f"{out}: an ONNX model is rewritten into an ONNX model; name the output .onnx")
    # Everything the user can get wrong is checked before the slow load and compile.
    check_input(src)
    inputs = {"input": src, "--calibration": a.calibration}
    check_outputs(inputs, {"-o": out, "--report": a.report})
    check_outputs(inputs, {"the plan next to -o": plan_path(out), "--report": a.report})
    policy = parse_policy(_policy_arg(a.policy))
    budget = _budget_arg(a)
    if policy.auto and budget is None:
        raise PolicyError("--policy auto needs a budget: --min-cosine, --max-kl and/or --max-abs-error")
    if a.example_shape:
        _example(a.example_shape)  # syntax and sizes, before loading
    if src.suffix == ".onnx":
        return _rewrite_onnx(a, src, out, policy, budget)
    calibration = _calibration_arg(a.calibration)
    from compiler.driver.progress import status

    with status(f"loading {src.name}", None if not a.quiet else False):
        ep = _load_pt2(src)
        args, kwargs = _example_for(ep, a.example_shape, src)
    backend = "onnxruntime" if out.suffix == ".onnx" else "torch"
    options = {"intra_op_num_threads": a.threads} if backend == "onnxruntime" and a.threads else None
    from compiler.driver.capture import model_class_name

    name = model_class_name(ep)
    cm = compile_program(ep, args, kwargs, policy=policy, model_name=f"{name} ({src.name})" if name else src.stem,
                         calibration=calibration, budget=budget, show_progress=None if not a.quiet else False,
                         attention_maps=a.attention_maps, backend=backend, backend_options=options)
    t = cm.report.totals
    if t["sites_found"] == 0:
        raise InputError(f"{src}: no attention found in this program; nothing to rewrite")
    _check_budget(cm.report)
    return _finish(a, cm, out)


def cmd_plan(a) -> int:
    import time

    from compiler.api import plan_program
    from compiler.driver.paths import check_input, check_outputs
    from compiler.ir.plan import plan_lines

    src = Path(a.input)
    if src.suffix != ".pt2":
        raise InputError(f"{src}: plan takes a .pt2 file from torch.export.save (or CompiledModel.save)")
    check_input(src)
    check_outputs({"input": src}, {"--json": a.json})
    t0 = time.perf_counter()
    ep = _load_pt2(src)
    plan = plan_program(ep, a.backend)
    default = " (the default; --backend torch, onnxruntime or triton)" if a.backend == DEFAULT_PLAN_BACKEND else ""
    print(f"execution plan of {src.name} for the {a.backend} backend{default}, made in "
          f"{time.perf_counter() - t0:.1f} s without running the program")
    for line in plan_lines(plan.summary()):
        print(line)
    if a.steps:
        by_name = {s.name: s for s in plan.steps}
        for seg in plan.segments:
            print(f"segment {seg.index} ({seg.backend}):")
            for name in seg.steps:
                step = by_name[name]
                print(f"  {name} = {step.op}({', '.join(step.inputs)})")
    if a.json:
        plan.save(a.json)
        print(f"wrote {a.json}")
    return 0


def _finish(a, result, out: Path) -> int:
    """Write the model (and its plan) and the report, all or nothing."""
    from compiler.api import plan_path

    fresh = [p for p in (out, plan_path(out)) if not Path(p).exists()]  # only these may be removed on failure
    report_tmp = None
    if a.report:
        report = Path(a.report)
        report_tmp = report.with_name(f".{report.name}.{os.getpid()}.tmp")
        report_tmp.write_text(result.report.to_json())
    try:
        result.save(out)
        if report_tmp is not None:
            report_tmp.replace(a.report)
    except BaseException:
        for p in fresh:
            Path(p).unlink(missing_ok=True)
        raise
    finally:
        if report_tmp is not None:
            report_tmp.unlink(missing_ok=True)
    if not a.quiet:
        result.report.render()
        print(f"wrote {out}" + (f" and {a.report}" if a.report else ""))
    return 0


def _rewrite_onnx(a, src: Path, out: Path, policy, budget) -> int:
    from compiler.driver.onnx_program import example_feeds, load_onnx, rewrite_onnx
    from compiler.driver.progress import status

    if a.calibration:
        raise InputError("--calibration is for --policy auto on a .pt2 program; an ONNX rewrite takes an explicit "
                         "policy")
    shapes = None
    if a.example_shape:
        args, kwargs = _example(a.example_shape)
        if args:
            raise InputError("name each --example-shape after the ONNX input it feeds (NAME=2x128:int64)")
        shapes = {k: tuple(v.shape) for k, v in kwargs.items()}
    model = load_onnx(src)
    if shapes:
        _check_onnx_shapes(model, shapes)
    with status(f"rewriting {src.name}", None if not a.quiet else False):
        result = rewrite_onnx(model, policy, example_feeds(model, shapes), budget, model_name=src.stem)
    _check_budget(result.report)
    return _finish(a, result, out)


def _check_onnx_shapes(model, shapes: dict) -> None:
    """Each named shape feeds an input the model has, with its rank and fixed sizes."""
    init = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in init}
    for name, shape in shapes.items():
        if name not in inputs:
            raise InputError(f"--example-shape names {name!r}, but the ONNX model's inputs are {', '.join(inputs)}")
        dims = inputs[name].type.tensor_type.shape.dim
        want = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
        if len(dims) != len(shape) or any(d.HasField("dim_value") and d.dim_value != n for d, n in zip(dims, shape)):
            raise InputError(f"the ONNX model expects {name} as {want}; --example-shape gives "
                             f"{'x'.join(map(str, shape))}")


def cmd_inspect(a) -> int:
    from compiler.driver.paths import check_input, check_outputs
    from compiler.report.data import Report

    check_input(a.report, "report")
    check_outputs({"report": a.report}, {"--html": a.html})
    report = Report.load(a.report)
    # The schema check covers field types, not the contents of free-form sections (plan, auto,
    # lowering): render both views before writing anything, so a damaged section is one line.
    try:
        from rich.console import Console

        console = Console(record=True, file=io.StringIO())
        report.render(console)
        page = None
        if a.html:
            from compiler.report.html import render_html

            page = render_html(report, attention_maps=a.attention_maps)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{a.report}: malformed attnforge report ({type(e).__name__}: {str(e)[:80]}); give a "
                         "report.json written by attnforge") from None
    if page is not None:
        from compiler.report.html import save_html

        save_html(page, a.html)
    if not a.quiet:
        report.render()
        if a.html:
            print(f"wrote {a.html}")
    return 0


def _on(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


DEMO_HTML = "attnforge-demo.html"


def cmd_demo(a) -> int:
    if a.generate:
        from compiler.generate_cli import cmd_demo_generate

        return cmd_demo_generate(a)

    import backends
    import compiler
    from compiler.driver.paths import check_outputs

    # Every argument is checked before the model loads.
    backends.check(a.backend)  # the reason a backend cannot run here
    policy = compiler.parse_policy(_policy_arg(a.policy))
    budget = _budget_arg(a)
    html = a.html or (DEMO_HTML if a.attention_maps else None)
    check_outputs({}, {"--report": a.report, "--html": html})

    import torch

    from compiler.minilm import PARAGRAPHS, SENTENCES, load_minilm, sentence_embeddings

    mini = load_minilm(a.attn_implementation)
    device = "cuda" if a.backend == "triton" and torch.cuda.is_available() else "cpu"
    mini.model.to(device)
    calibration = None
    if policy.auto:
        # Long paragraphs, two per batch, at one length: sparse patterns only pay off on long inputs.
        inputs = _on(mini.encode_inputs(PARAGRAPHS[:2], max_length=128), device)
        calibration = [inputs, _on(mini.encode_inputs(PARAGRAPHS[2:4], max_length=128), device)]
        budget = budget or compiler.Fidelity(min_cosine=0.99)
    else:
        inputs = _on(mini.encode_inputs(SENTENCES), device)
    cm = compiler.compile(mini.model, (), policy=policy, example_kwargs=inputs, dynamic_shapes=None,
                          calibration=calibration, budget=budget, attention_maps=a.attention_maps,
                          backend=a.backend)
    with torch.no_grad():
        before = sentence_embeddings(mini.model(**inputs).last_hidden_state, inputs["attention_mask"])
    out = cm(**inputs)
    after = sentence_embeddings(out["last_hidden_state"], inputs["attention_mask"])
    cm.report.model = "all-MiniLM-L6-v2"
    if a.report:
        cm.report.save(a.report)
    cm.report.render()
    if html:
        from compiler.report.html import write_html

        write_html(cm.report, html, attention_maps=a.attention_maps)
        print(f"wrote {html}" + (" (with the attention maps)" if a.attention_maps else ""))
    err = float((before - after).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(before, after, dim=-1).min())
    n = inputs["input_ids"].shape[0]
    print(f"sentence embeddings before vs after the rewrite: max abs difference {err:.2e}, "
          f"lowest cosine {cos:.6f} over {n} texts")
    if cm.report.totals["sites_approximate"]:
        return 0 if cm.report.fidelity.passed is not False else 1
    return 0 if err <= 1e-5 else 1


def _budget_flags(p) -> None:
    g = p.add_argument_group("fidelity budget (required by --policy auto; otherwise checked)")
    g.add_argument("--min-cosine", type=float, help="lowest cosine similarity of outputs vs the original")
    g.add_argument("--max-kl", type=float, help="highest KL divergence of output softmax vs the original")
    g.add_argument("--max-abs-error", type=float, help="highest max abs error of outputs vs the original")


DEFAULT_PLAN_BACKEND = "onnxruntime"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnforge", description="Find and rewrite attention in exported PyTorch programs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("rewrite", help="rewrite the attention of a .pt2 program or an ONNX model")
    r.add_argument("input", help=".pt2 file written by torch.export.save, or an .onnx model")
    r.add_argument("-o", "--output", required=True,
                   help="where to write the result: .pt2 (ExportedProgram) or .onnx (run and checked in onnxruntime)")
    r.add_argument("--threads", type=_count, default=0, help="onnxruntime intra-op threads (default: its own)")
    r.add_argument("--policy", default="fused",
                   help="variant for every site (fused, window:256,sinks:4, topk:blocks=8,block=64, linear:elu, ...), "
                        "auto, or a JSON object of per-site rules (default: fused)")
    r.add_argument("--calibration", help="with --policy auto: a torch.save'd list of input batches")
    _budget_flags(r)
    r.add_argument("--report", help="also write the pass report as JSON here")
    r.add_argument("--attention-maps", action="store_true",
                   help="store each site's attention maps (example input) in the report, for inspect --html")
    r.add_argument("--example-shape", action="append", help="example input, e.g. input_ids=1x128:int64 (repeatable)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_rewrite)

    pl = sub.add_parser("plan", help="print the execution plan of a .pt2 program for a backend, without running it")
    pl.add_argument("input", help=".pt2 file written by torch.export.save or CompiledModel.save")
    pl.add_argument("--backend", default=DEFAULT_PLAN_BACKEND, choices=["torch", "onnxruntime", "triton"],
                    help=f"the backend to plan for (default: {DEFAULT_PLAN_BACKEND})")
    pl.add_argument("--steps", action="store_true", help="also list every step, segment by segment")
    pl.add_argument("--json", help="write the whole plan (registers, steps, buffers) as JSON here")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="show a JSON pass report, in the terminal or as an HTML page")
    i.add_argument("report")
    i.add_argument("--html", help="also write the report as one self-contained HTML page here")
    i.add_argument("--attention-maps", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the attention maps stored in the report (rewrite --attention-maps)")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="rewrite the embedded all-MiniLM-L6-v2 model and show the report")
    d.add_argument("--policy", default="fused", help="as for rewrite; auto calibrates on long paragraphs")
    _budget_flags(d)
    d.add_argument("--attn-implementation", default="eager", choices=["eager", "sdpa"])
    d.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "triton"],
                   help="run the rewritten model in PyTorch, exported to ONNX in onnxruntime, or with "
                        "attention in Triton kernels (CUDA GPU)")
    d.add_argument("--report", help="also write the report as JSON here")
    d.add_argument("--attention-maps", action="store_true",
                   help=f"draw each site's attention maps into the HTML report (--html, default {DEMO_HTML})")
    d.add_argument("--html", help="also write the report as one self-contained HTML page here")
    d.add_argument("--generate", action="store_true",
                   help="instead: generate with a KV cache on a small random-weight Llama (fused vs model.generate, "
                        "then --policy or a DuoAttention head mix)")
    d.set_defaults(func=cmd_demo)

    from compiler.generate_cli import add_generate_parser

    add_generate_parser(sub)
    return p


def _quiet_libraries() -> None:
    """Library warnings and log lines would bury our one-line messages."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    # onnxscript's version converter and onnx-ir's shape inference log recoverable fallbacks as
    # warnings (with a traceback); the result is checked by us either way.
    for name in ("torch", "transformers", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else 2
    _quiet_libraries()
    try:
        return args.func(args)
    except AttnforgeError as e:
        return _die(str(e))
    except KeyboardInterrupt:
        return _die("interrupted", 130)
    except OSError as e:  # the file system's answer (disk full, permissions) is the user's to act on
        where = f"{e.filename}: " if e.filename else ""
        return _die(f"{where}{e.strerror or e}")
    except Exception as e:  # a bug of ours: still one line, and say so
        first = first_line(e, 300)
        return _die(f"internal error ({type(e).__name__}: {first}); please report it with the command you ran", 3)


if __name__ == "__main__":
    sys.exit(main())
