"""The documentation holds together: every relative link of README.md, docs/*.md and the model card reaches a file (and
its #anchor a heading there), and every command in README's ```bash blocks is one the scripts or CLIs accept."""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
         REPO_ROOT / "models" / "tiny-llama-fc" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")
SHARED_SCRIPTS = ("presets.sh", "data_rounds.sh")


def prose_and_blocks(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside code fences, and each fenced block as (language, lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and block is None:
            block = (fence.group(1), [])
        elif fence or (line.strip() == "```" and block is not None):
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def anchor_of(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = prose_and_blocks(page.read_text(encoding="utf-8"))
    return {anchor_of(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    prose, _ = prose_and_blocks(page.read_text(encoding="utf-8"))
    links = [target for line in prose for target in LINK.findall(line)]
    assert page.name != "README.md" or page.parent != REPO_ROOT or len(links) >= 7, "the README links its docs"
    for target in links:
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link {target} reaches no file"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: link {target}: no such heading in {resolved.name}"


def readme_commands() -> list[str]:
    """README's ```bash commands: continuation lines joined, comments dropped, `a && b` as two commands."""
    _, blocks = prose_and_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    commands, pending = [], ""
    for language, lines in blocks:
        if language != "bash":
            continue
        for line in lines:
            line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def script_reads(script: str, variable: str) -> bool:
    """Whether SCRIPT, or what it sources (presets.sh, data_rounds.sh), reads the variable."""
    pattern = re.compile(rf"\b{re.escape(variable)}\b")
    return any(pattern.search((REPO_ROOT / name).read_text(encoding="utf-8")) for name in (script, *SHARED_SCRIPTS))


def check_python(words: list[str]) -> None:
    """`python3 X.py ARGS`: X's own parser accepts ARGS, or (without one) each --flag is in `X.py --help`."""
    script, args = words[0], words[1:]
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist"
    module = importlib.import_module(Path(script).stem)
    if hasattr(module, "build_parser"):
        try:
            module.build_parser().parse_args(args)
        except SystemExit as exit_:
            pytest.fail(f"python3 {shlex.join(words)}: its parser refuses the arguments (exit {exit_.code})")
        return
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=60).stdout
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert flag in help_text, f"python3 {script}: {flag} is not in its --help"


def test_every_readme_command_is_accepted():
    commands = readme_commands()
    assert len(commands) >= 20
    seen = set()
    for command in commands:
        words = shlex.split(command)
        variables = []
        while words and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            variables.append(words.pop(0).split("=")[0])
        program, rest = words[0], words[1:]
        if program == "bash":
            script = rest[0]
            assert (REPO_ROOT / script).is_file(), f"{command}: {script} does not exist"
            for variable in variables:
                assert script_reads(script, variable), f"{command}: {script} does not read {variable}"
            assert rest[1:] in ([], ["--help"]), f"{command}: a script takes its settings as variables"
            seen.add("bash")
        elif program == "python3" and rest[:2] == ["-m", "pip"]:
            assert (REPO_ROOT / rest[-1]).is_file(), f"{command}: no {rest[-1]}"
        elif program == "python3" and rest[:2] == ["-m", "pytest"]:
            assert not variables
        elif program == "python3":
            check_python(rest)
            seen.add("python3")
        else:
            pytest.fail(f"README command of an unknown kind: {command}")
    assert seen == {"bash", "python3"}


def test_the_commands_reader_sees_what_a_user_types():
    # One case of each rule the command check relies on: continuations, comments, `&&`, variables before bash.
    assert "python3 -m pip install -r requirements.txt" in readme_commands()
    assert any(c.startswith("MODEL=meta-llama/Llama-3.2-3B-Instruct") and c.endswith("bash run_n_rounds_main.sh")
               for c in readme_commands())
    assert not script_reads("run_n_rounds_main.sh", "NO_SUCH_VARIABLE")
    assert anchor_of("The prototype loss's weight (`PROTOTYPE_WEIGHT`)") == "the-prototype-losss-weight-prototype_weight"
