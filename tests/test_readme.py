"""README's commands stay honest: every command in a fenced shell block of README.md is checked
without compiling a model.

- `make TARGET`: the target exists (`make -n TARGET`, which runs nothing).
- `nti-invert ...`, `python scripts/X.py ...`, `python benchmarks/X.py ...`, `python -m MODULE ...`:
  the program answers `--help`, and every `--flag` the command passes appears in that help (an
  option that takes a value gets one; a value of an option with choices is one of them).
  `nti-invert` is checked as `python -m nti_jax.run.cli`, the module pyproject installs it from.
- `pip install -r FILE`: the file exists.
- Shell glue (`for ...; do CMD & done; wait`, `VAR=value CMD`) is taken apart and each command
  in it checked.
Anything else fails: a command README shows must be one this test knows how to check. A trailing
`# needs: ...` comment says what a command needs to run for real (a model, a device, data); such a
command is checked the same way.

The Python block's `nti_jax.NAME(...)` calls are checked too: the names exist and take the
keywords README passes them.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
SEPARATORS = {";", "&", "&&", "||", "|"}
SHELL_WORDS = {"do", "then", "else", "done", "fi", "wait"}
NEEDS = re.compile(r"\s+#\s*needs:\s*\S.*$")


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        m = re.match(r"^```\s*(\S*)\s*$", line)
        if m and lang is None:
            lang, lines = m.group(1).lower(), []
        elif line.startswith("```") and lang is not None:
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "README.md: a fenced block is not closed"
    return blocks


def readme_commands() -> list[str]:
    """Every command line of README's shell blocks, its `# needs:` comment removed."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    out = []
    for lang, lines in fenced_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        for line in lines:
            line = NEEDS.sub("", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: split at ; & && || |, shell keywords, `for` heads
    and leading VAR=value assignments removed; a trailing comment dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    cmds, cur = [], []
    for tok in lex:
        if tok in SEPARATORS:
            cmds.append(cur)
            cur = []
        else:
            cur.append(tok)
    cmds.append(cur)
    result = []
    for cmd in cmds:
        while cmd and cmd[0] in SHELL_WORDS:
            cmd = cmd[1:]
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if not cmd or cmd[0] == "for":
            continue
        result.append(cmd)
    return result


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def help_of(argv: list[str]) -> str:
    proc = subprocess.run(argv + ["--help"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


def options_of(help_text: str) -> dict[str, tuple[bool, tuple[str, ...]]]:
    """--flag -> (takes a value, its choices) from argparse's help: the option lines and the
    usage line's bracketed groups."""
    opts: dict[str, tuple[bool, tuple[str, ...]]] = {}
    pattern = re.compile(r"(?:^\s+|\[|, )(--[A-Za-z0-9][\w-]*)(?:[ =](\{[^}]*\}|[A-Z][^\s\],]*))?", re.M)
    for m in pattern.finditer(help_text):
        flag, value = m.group(1), m.group(2)
        choices = tuple(value[1:-1].split(",")) if value and value.startswith("{") else ()
        takes, old = bool(value), opts.get(flag)
        if old is None or (takes and not old[0]):
            opts[flag] = (takes, choices)
    return opts


def check_flags(cmd: list[str], args: list[str], help_text: str) -> None:
    opts = options_of(help_text)
    i = 0
    while i < len(args):
        tok = args[i]
        if tok.startswith("--"):
            flag, eq, value = tok.partition("=")
            assert flag in opts, f"{' '.join(cmd)}: {flag} is not in its --help"
            takes, choices = opts[flag]
            if takes and not eq:
                i += 1
                assert i < len(args), f"{' '.join(cmd)}: {flag} needs a value"
                value = args[i]
            elif not takes:
                assert not eq, f"{' '.join(cmd)}: {flag} takes no value"
            if choices:
                assert value in choices, f"{' '.join(cmd)}: {flag} {value} is not one of {choices}"
        i += 1


def program(cmd: list[str]) -> tuple[list[str], list[str]]:
    """(argv that runs the program, the command's own arguments) for a Python program."""
    if cmd[0] == "nti-invert":
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            target = tomllib.load(f)["project"]["scripts"]["nti-invert"]
        module = target.split(":")[0]
        return [sys.executable, "-m", module], cmd[1:]
    assert cmd[0] in ("python", "python3"), f"README runs {cmd[0]!r}, which this test cannot check"
    assert len(cmd) > 1, "a bare `python`"
    if cmd[1] == "-m":
        return [sys.executable, "-m", cmd[2]], cmd[3:]
    script = os.path.join(ROOT, cmd[1])
    assert os.path.isfile(script), f"README runs {cmd[1]}, which does not exist"
    return [sys.executable, cmd[1]], cmd[2:]


def check_command(cmd: list[str], help_cache: dict) -> None:
    if cmd[0] == "make":
        targets = [t for t in cmd[1:] if not t.startswith("-") and "=" not in t]
        for t in targets:
            proc = subprocess.run(["make", "-n", "-C", ROOT, t], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"make {t}: no such target ({proc.stderr.strip()})"
        return
    if cmd[0] in ("pip", "pip3") or cmd[:3] in (["python", "-m", "pip"], ["python3", "-m", "pip"]):
        args = cmd[1:] if cmd[0].startswith("pip") else cmd[3:]
        assert args and args[0] == "install", f"{' '.join(cmd)}: only `pip install` is checked"
        for i, a in enumerate(args):
            if a == "-r":
                assert os.path.isfile(os.path.join(ROOT, args[i + 1])), f"{' '.join(cmd)}: no {args[i + 1]}"
        return
    argv, args = program(cmd)
    key = tuple(argv)
    if key not in help_cache:
        help_cache[key] = help_of(argv)
    check_flags(cmd, args, help_cache[key])


def test_readme_has_commands():
    cmds = [c for line in readme_commands() for c in simple_commands(line)]
    names = {c[0] for c in cmds}
    assert {"make", "nti-invert"} <= names, names


def test_readme_shell_commands():
    help_cache: dict = {}
    checked = 0
    for line in readme_commands():
        for cmd in simple_commands(line):
            check_command(cmd, help_cache)
            checked += 1
    assert checked >= 5


def test_readme_python_calls():
    """Each `nti_jax.NAME` the Python block uses exists, and each call's keywords are parameters."""
    import nti_jax

    with open(README, encoding="utf-8") as f:
        blocks = [lines for lang, lines in fenced_blocks(f.read()) if lang == "python"]
    assert blocks, "README.md has no Python block"
    for lines in blocks:
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain, base = [], node
                while isinstance(base, ast.Attribute):
                    chain.insert(0, base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "nti_jax":
                    obj = nti_jax
                    for name in chain:
                        assert hasattr(obj, name), f"README uses nti_jax.{'.'.join(chain)}, which does not exist"
                        obj = getattr(obj, name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if isinstance(f.value, ast.Name) and f.value.id == "nti_jax":
                    params = inspect.signature(getattr(nti_jax, f.attr)).parameters
                    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                        continue
                    for kw in node.keywords:
                        assert kw.arg in params, f"README passes {kw.arg}= to nti_jax.{f.attr}, which has no such parameter"


# The checker itself: it must catch a command that does not exist and flags that are wrong.
@pytest.mark.parametrize("line, error", [
    ("nti-invert --modle x --image a.png", "--modle is not in its --help"),
    ("nti-invert --method nulltext", "is not one of"),
    ("nti-invert --attention=yes", "takes no value"),
    ("python scripts/no_such.py --help", "does not exist"),
    ("nti-frobnicate --image a.png", "cannot check"),
    ("make no-such-target", "no such target"),
    ("for i in 1 2; do nti-invert --out runs/x --bogus & done; wait", "--bogus is not in its --help"),
])
def test_checker_catches(line, error):
    with pytest.raises(AssertionError, match=re.escape(error)):
        for cmd in simple_commands(NEEDS.sub("", line)):
            check_command(cmd, {})


def test_checker_passes_a_good_line():
    help_cache: dict = {}
    for cmd in simple_commands("JAX_PLATFORMS=cpu nti-invert --model m --steps 5 --method=direct --attention   # needs: a model"):
        check_command(cmd, help_cache)
