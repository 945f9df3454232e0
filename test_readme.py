"""The README's commands run as written. Every command line of every ```bash block is run, in README order, in a
scratch directory that looks like a checkout after `python3 dev.py demo` (the converted SmolLM2-135M-Instruct in
checkpoints/, Shakespeare's plays in data/shakespeare), unless the README marks it plainly as something this
machine cannot do: "(needs ...)" in its own comment, in a comment line above it in its block, or in the sentence
that introduces the block, e.g.

    python train.py recipes/llama3_8b_qlora.yaml           # QLoRA on one 24 GB GPU (needs a GPU)

A new README command costs nothing more: it is run, and if it cannot run here the test fails and says so. The
only changes to a command are made by appending arguments, never by editing it (SHORTER: fewer steps, fewer new
tokens); outputs land under the scratch directory because their paths are relative.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
README = ROOT / "README.md"
MARK = re.compile(r"\(needs [^)]+\)")

# Arguments appended to a command that runs this script, so that it ends in seconds: they override the ones
# before them (argparse and recipe overrides both take the last value).
SHORTER = {
    "train.py": ["max_steps=1", "eval_batches=1"],
    "finetune_lora.py": ["max_steps=1", "eval_batches=1"],        # not for `finetune_lora.py merge ...`
    "generate.py": ["--max_new_tokens", "8"],
    "bench_generate.py": ["--new_tokens", "8", "--repeats", "1"],
}


def without_comment(line: str) -> str:
    """The command of a shell line: up to a # that starts a word outside quotes."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[dict]:
    """Every command line in the ```bash blocks: {line, text (continuations joined, comment dropped), words, mark
    (the "(needs ...)" that applies, or None)}."""
    commands = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        intro = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")    # the sentence before the block
        block_mark = MARK.search(intro)
        comment_mark, after_comment = None, False     # a mark in comment lines holds until a blank or the next comment
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line, number = lines[i], i + 1
            while line.endswith("\\") and i + 1 < len(lines):                # continuation lines
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            stripped = line.strip()
            is_comment = stripped.startswith("#")
            if not stripped:
                comment_mark = None
            elif is_comment:
                comment_mark = MARK.search(stripped) or (comment_mark if after_comment else None)
            after_comment = is_comment
            if stripped and not is_comment:
                text = without_comment(stripped)
                mark = MARK.search(stripped[len(text):]) or comment_mark or block_mark
                commands.append({"line": number, "text": text, "words": shlex.split(text),
                                 "mark": mark.group(0) if mark else None})
        i += 1
    return commands


COMMANDS = readme_commands(README.read_text())


def script_of(words: list[str]) -> str | None:
    """The .py file a command runs (python X.py ..., torchrun ... X.py ...), or None."""
    return next((Path(w).name for w in words if w.endswith(".py")), None)


def extra_arguments(words: list[str]) -> list[str]:
    script = script_of(words)
    if script == "finetune_lora.py" and "merge" in words:
        return []
    return SHORTER.get(script, [])


def test_every_readme_command_is_run_or_marked():
    # What the slow test below will run must be a command this machine can run: python, python3 or torchrun on a
    # file of this repository, with no PLACEHOLDER arguments. Anything else needs a "(needs ...)" mark.
    assert len(COMMANDS) > 10
    for c in COMMANDS:
        if c["mark"]:
            continue
        where = f"README.md:{c['line']}: {c['text']!r}"
        hint = "; if it cannot run on a 2-core CPU machine without network, say why with \"(needs ...)\""
        assert c["words"][0] in ("python", "python3", "torchrun"), where + hint
        script = script_of(c["words"])
        assert script and (ROOT / script).is_file(), where + " runs no .py file of this repository" + hint
        placeholders = [w for w in c["words"] if re.fullmatch(r"[A-Z][A-Z_]{2,}(/\S*)?", w)]
        assert not placeholders, f"{where}: {placeholders} are placeholders; write a real path" + hint


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, smollm2_dir, shakespeare_dir) -> Path:
    """A directory where the README's relative paths mean what they mean in a checkout after the demo: links to the
    repository's files, the converted demo checkpoint and the plays; what the commands write stays here."""
    d = tmp_path_factory.mktemp("readme")
    for p in ROOT.iterdir():
        if not p.name.startswith(".") and p.name not in ("dev.py", "checkpoints", "data", "out", "hf"):
            (d / p.name).symlink_to(p)
    # dev.py works in the directory it is in: a copy, with a .venv that it finds installed (its stamp: the digest
    # of the requirements) and whose python is this one.
    shutil.copy(ROOT / "dev.py", d / "dev.py")
    (d / ".venv" / "bin").mkdir(parents=True)
    (d / ".venv" / "bin" / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (d / ".venv" / "bin" / "python").chmod(0o755)
    requirements = b"".join((ROOT / f).read_bytes() for f in ("requirements.txt", "requirements-dev.txt"))
    (d / ".venv" / ".installed").write_text(hashlib.sha256(requirements).hexdigest())
    (d / "checkpoints" / "HuggingFaceTB").mkdir(parents=True)
    (d / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct").symlink_to(smollm2_dir)
    (d / "data").mkdir()
    (d / "data" / "shakespeare").symlink_to(shakespeare_dir)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("c", [c for c in COMMANDS if not c["mark"]], ids=lambda c: f"line{c['line']}")
def test_readme_command_runs(c, scratch):
    # Run by bash as written (minus its comment), with SHORTER's arguments appended; python, python3 and torchrun
    # are this environment's.
    command = " ".join([c["text"], *map(shlex.quote, extra_arguments(c["words"]))])
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    r = subprocess.run(["bash", "-c", command], cwd=scratch, env={**os.environ, "PATH": path}, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert r.returncode == 0, f"README.md:{c['line']}: {command}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
