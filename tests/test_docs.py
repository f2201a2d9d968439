"""The README and docs stay true: every relative link leads to an existing file and heading, every
`python train.py` / `torchrun ... train.py` command composes (its experiment, groups and keys exist),
and every `python scripts/...` command uses only options its script accepts. The commands that fit
the CPU budget are also run end to end elsewhere: the demo (test_cli.py), the results workflow
(test_workflow.py), the benchmark's CPU smoke run (test_benchmark.py), verify_data.py
(test_fewshot_data.py), the GPU check's CPU mode (test_gpu_check.py)."""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from test_configs import github_anchor

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", REPO / "results" / "README.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND_START = ("python train.py", "python -m pytest", "python scripts/", "torchrun ")


def headings(path: Path) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def code_lines(text: str) -> list[str]:
    """Lines of indented and fenced code blocks, continuation lines joined."""
    lines, fenced, joined = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        joined += line.strip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    return lines


def commands() -> list[tuple[str, str]]:
    """Command lines of the docs; a shell loop's variable stands for its first value."""
    found = []
    for doc in DOCS:
        loop = {}
        for line in code_lines(doc.read_text()):
            if match := re.match(r"for (\w+) in (\S+)", line):
                loop = {match[1]: match[2]}
                line = line.split("do", 1)[1] if " do " in line + " " else ""
            if line.strip() == "done":
                loop = {}
            for name, value in loop.items():
                line = line.replace(f"${name}", value)
            for part in re.split(r"&&|;", line):
                part = re.sub(r"\s+#.*$", "", part).strip()  # a trailing comment
                if part.startswith(COMMAND_START):
                    found.append((doc.relative_to(REPO).as_posix(), part))
    return found


COMMANDS = commands()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_existing_files_and_headings(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to missing {target}"
        if anchor and file.suffix == ".md":
            assert anchor in headings(file), f"{doc.name}: no heading #{anchor} in {file.relative_to(REPO)}"


def overrides_of(argv: list[str]) -> list[str]:
    """Hydra overrides of a train.py command line, with a sweep's first value standing for the sweep."""
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


@pytest.mark.parametrize("doc, command", [c for c in COMMANDS if "train.py" in c[1]],
                         ids=[f"{d}: {c[:70]}" for d, c in COMMANDS if "train.py" in c])
def test_train_commands_compose(doc, command):
    argv = shlex.split(command, comments=True)
    argv = argv[argv.index("train.py") + 1:]
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides_of(argv), return_hydra_config=True)
    assert cfg.name, command


@cache
def script_help(script: str) -> str:
    return subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO).stdout


@pytest.mark.parametrize("doc, command", [c for c in COMMANDS if c[1].startswith("python scripts/")],
                         ids=[f"{d}: {c[:70]}" for d, c in COMMANDS if c.startswith("python scripts/")])
def test_script_commands_use_existing_options(doc, command):
    argv = shlex.split(command, comments=True)
    script = argv[1]
    assert (REPO / script).is_file(), f"{doc}: {script} does not exist"
    if script.endswith(".py") and "verify_data" not in script:  # verify_data takes key=value overrides
        text = script_help(script)
        for option in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert option in text, f"{doc}: {script} has no option {option}"


def test_the_docs_hold_commands():
    """The extraction works: the README's demo, test and paper commands are among them."""
    readme = [c for d, c in COMMANDS if d == "README.md"]
    assert "python train.py" in readme and "python -m pytest -q" in readme
    assert any(c.startswith("python train.py experiment=cifar100_opl") for c in readme)
    assert any(c.startswith("torchrun ") for d, c in COMMANDS)
