"""The README's examples run as written.

* ```python blocks run in order in one namespace (a block may use names an earlier one defined);
* every command line of a ```bash block that starts with ``lowprec`` runs through the CLI;
* ```toml blocks load as recipes and convert a small model.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is not run (it trains for minutes or
launches processes); the tests below still check that it names only real commands and recipes.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from lowprec import cli
from lowprec.recipes import Recipe, available

pytestmark = pytest.mark.usefixtures("eager_quantized_adamw")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")
FENCE = re.compile(r"^```(\w*)\s*$")


def blocks(text: str) -> list[dict]:
    """Fenced code blocks: language, source, first line number, and whether marked skip."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start, lang, body = i, m.group(1), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            out.append({"lang": lang, "code": "\n".join(body), "line": start + 1, "skip": bool(SKIP.search(prev))})
        i += 1
    return out


BLOCKS = blocks(README.read_text())


def _ids(kind: str) -> list[tuple[str, dict]]:
    return [(f"line{b['line']}", b) for b in BLOCKS if b["lang"] == kind and not b["skip"]]


def _commands(code: str) -> list[str]:
    """Command lines of a shell block, comments after the command removed."""
    cmds = []
    for line in code.splitlines():
        line = re.split(r"\s#\s", line, maxsplit=1)[0].strip()
        if line and not line.startswith("#"):
            cmds.append(line)
    return cmds


@pytest.fixture(scope="module")
def namespace() -> dict:
    return {"__name__": "readme"}


@pytest.mark.parametrize("block", [b for _, b in _ids("python")], ids=[i for i, _ in _ids("python")])
def test_python_block_runs(block, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(block["code"], f"README.md:{block['line']}", "exec"), namespace)


@pytest.mark.parametrize("block", [b for _, b in _ids("bash")], ids=[i for i, _ in _ids("bash")])
def test_shell_block_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cmds = _commands(block["code"])
    assert cmds, f"README.md:{block['line']}: an empty shell block"
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[0] == "lowprec", f"README.md:{block['line']}: {cmd!r} is not a lowprec command; mark it skip"
        try:
            rc = cli.main(argv[1:])
        except SystemExit as e:  # --help exits through argparse
            rc = e.code
        assert rc == 0, f"README.md:{block['line']}: {cmd!r} exited with {rc}:\n{capsys.readouterr().err}"


@pytest.mark.parametrize("block", [b for _, b in _ids("toml")], ids=[i for i, _ in _ids("toml")])
def test_toml_block_is_a_valid_recipe_and_converts(block):
    import lowprec
    from lowprec.models import demo_llama

    recipe = Recipe.from_dict(tomllib.loads(block["code"]), source=f"README.md:{block['line']}")
    model = demo_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64)
    model, report = lowprec.convert(model, recipe, report=True)
    assert report.converted
    for pattern in recipe.exclude.patterns:
        matched = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, pattern)]
        assert matched, f"exclude pattern {pattern!r} matches no module of a Llama"
        assert not any(n in report.converted for n in matched), "an excluded module was converted"


def test_skipped_blocks_name_real_commands_and_recipes():
    """Blocks too slow to run still must not rot: each lowprec command parses, and each recipe exists."""
    parser = cli.build_parser()
    for b in BLOCKS:
        if not (b["skip"] and b["lang"] == "bash"):
            continue
        for cmd in _commands(b["code"]):
            argv = shlex.split(cmd)
            if argv[0] == "torchrun":
                argv = argv[argv.index("lowprec"):]
            if argv[0] != "lowprec":
                continue
            args = parser.parse_args(argv[1:])  # SystemExit (a test error) on an unknown option
            recipe = getattr(args, "recipe", None)
            if recipe and not recipe.endswith(".toml"):
                assert recipe in available(), f"README.md:{b['line']}: unknown recipe {recipe!r}"


def test_readme_lists_every_shipped_recipe_and_command():
    text = README.read_text()
    for name in available():
        assert f"| `{name}` |" in text, f"recipe {name!r} is missing from the README's recipe table"
    for command in ("demo", "train", "sensitivity", "inspect", "bench", "recipes"):
        assert f"lowprec {command}" in text
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in text and re.search(rf"^{target}:", makefile, re.M)

