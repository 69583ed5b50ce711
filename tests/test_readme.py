"""Every command and code block of the README runs, so the README cannot go stale.

Python blocks run in order in one namespace, in a scratch folder; ``attnforge`` lines of bash
blocks run in-process after them, on the files the Python blocks wrote. Where a block names a
model from the Hub, a tiny random-weight model of the same family stands in (SUBSTITUTES); each
substituted text must still appear in the README. The set-up block (pip install, the whole test
suite) cannot run inside the test suite: it is held to the exact two commands instead.
"""

import re
import shlex
from pathlib import Path

import pytest

from compiler import cli

README = Path(__file__).resolve().parents[1] / "README.md"
SETUP = 'pip install torch==2.13.0 && pip install -e ".[test]" && attnforge demo\nbash .ci/run'

TINY_QWEN = ("transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(hidden_size=32, "
             "intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, "
             "vocab_size=100, max_position_embeddings=600, attn_implementation='eager')).eval()")
SUBSTITUTES = {
    'transformers.AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")': TINY_QWEN,
}


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(\w+)\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_setup_commands_are_the_two_commands():
    lang, body = blocks()[0]
    assert (lang, body.strip()) == ("bash", SETUP)
    assert (README.parent / ".ci" / "run").is_file()
    assert 'attnforge = "compiler.cli:main"' in (README.parent / "pyproject.toml").read_text()


def test_every_block_runs(tmp_path, monkeypatch, capsys, one_thread):
    import torch

    text = README.read_text()
    for old in SUBSTITUTES:
        assert old in text, f"README no longer says {old!r}: update SUBSTITUTES"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    ran = {"python": 0, "bash": 0}
    for lang, body in blocks()[1:]:
        if lang == "python":
            for old, new in SUBSTITUTES.items():
                body = body.replace(old, new)
            exec(compile(body, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
        elif lang == "bash":
            for line in body.strip().splitlines():
                argv = shlex.split(line)
                assert argv[0] == "attnforge", f"a README command this test cannot run: {line}"
                code = cli.main(argv[1:] + (["-q"] if argv[1] == "rewrite" else []))
                err = capsys.readouterr().err
                assert code == 0, f"{line}: {err}"
        else:
            pytest.fail(f"a ```{lang} block this test does not know how to run")
        ran[lang] += 1
    assert ran["python"] >= 4 and ran["bash"] >= 1
    for name in ("fused.pt2", "windowed.pt2", "report.json", "report.html", "fused.onnx", "model-fused.pt2"):
        assert (tmp_path / name).is_file(), name
