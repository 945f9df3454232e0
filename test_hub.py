"""Models by Hub name: generate.py, convert_hf.py and LLM.load take "org/name", fetch it with huggingface_hub and
convert it once into $FLATLM_CHECKPOINTS/org/name. No network here: the tests lay out a Hugging Face cache the way
huggingface_hub writes it and run with HF_HUB_OFFLINE=1, so the real huggingface_hub code reads it; the errors a
user meets online come from a local HTTP server answering as the Hub does."""

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import generate
import train

ROOT = Path(__file__).parent


def lay_out_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """models--org--name/blobs/<hash> holding each file once (LFS files under their sha256, others under their git
    blob sha1), snapshots/<commit>/<file> as relative symlinks to ../../blobs/<hash>, refs/main naming the
    commit: what huggingface_hub's snapshot_download leaves behind."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        if name.endswith((".safetensors", ".bin")):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (repo / "snapshots" / commit / name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


@pytest.fixture(scope="module")
def hub(tiny_dir, tmp_path_factory):
    """An offline Hub cache holding org/tiny (safetensors, and a pytorch_model.bin that is not even a pickle: it
    must never be read) and org/tiny-bin (pytorch_model.bin only), both the tiny random Llama of conftest.tiny_dir,
    whose native conversion is the expected result; and the environment that points everything at it."""
    root = tmp_path_factory.mktemp("hub")
    hf_dir = tiny_dir.parent / "hf"
    files = {p.name: p.read_bytes() for p in hf_dir.iterdir() if p.is_file()}
    lay_out_hub_cache(root / "cache", "org/tiny", {**files, "pytorch_model.bin": b"not a pickle"})
    bin_path = root / "pytorch_model.bin"
    torch.save(load_file(hf_dir / "model.safetensors"), bin_path)
    only_bin = {name: data for name, data in files.items() if name != "model.safetensors"}
    lay_out_hub_cache(root / "cache", "org/tiny-bin", {**only_bin, "pytorch_model.bin": bin_path.read_bytes()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "cache"), "HF_HOME": str(root / "home"),
           "FLATLM_CHECKPOINTS": str(root / "checkpoints")}
    return root, env


def run(script: str, *args, env: dict, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def assert_same_weights(a: Path, b: Path):
    ours, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_generate_by_name_converts_once_and_llm_load_reuses_it(hub, tiny_dir, monkeypatch):
    root, env = hub
    r = run("generate.py", "org/tiny", "--prompt", "Hello", "--max_new_tokens", "4", "--temperature", "0", env=env)
    assert r.returncode == 0, r.stderr
    assert "converting org/tiny" in r.stderr
    converted = root / "checkpoints" / "org" / "tiny"
    assert_same_weights(converted, tiny_dir)                  # the same as converting the HF dir by hand
    assert not (converted / "pytorch_model.bin").exists()
    inode = (converted / "model.safetensors").stat().st_ino

    monkeypatch.setenv("FLATLM_CHECKPOINTS", str(root / "checkpoints"))
    llm = generate.LLM.load("org/tiny", device="cpu")          # the second load: no conversion, no Hub
    assert (converted / "model.safetensors").stat().st_ino == inode
    assert llm.generate("Hello", max_new_tokens=4, temperature=0) == r.stdout.removesuffix("\n")


def test_convert_by_name_reads_pickles_only_when_the_repo_has_no_safetensors(hub, tiny_dir, tmp_path):
    root, env = hub
    r = run("convert_hf.py", "org/tiny-bin", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    assert_same_weights(tmp_path / "out", tiny_dir)
    assert not (root / "checkpoints" / "org" / "tiny-bin").exists()   # OUT given: nothing in checkpoints/


def assert_one_line_error(r, *fragments):
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), r.stderr
    assert not any("Traceback" in line for line in lines), r.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_a_repo_missing_from_the_offline_cache_says_what_to_do(hub):
    root, env = hub
    r = run("generate.py", "org/missing", "--prompt", "Hello", env=env)
    assert_one_line_error(r, "org/missing", "HF_HUB_OFFLINE")
    assert not (root / "checkpoints" / "org" / "missing").exists()


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers repo lookups as huggingface.co does for a gated repo and for one that does not exist."""

    def do_GET(self):
        code, error = (403, "GatedRepo") if "/org/gated/" in self.path else (404, "RepoNotFound")
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("X-Error-Message", "Access restricted" if code == 403 else "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_gated_missing_and_unreachable_hub_give_one_line_that_says_what_to_do(hub, tmp_path):
    root, env = hub
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    online = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    try:
        assert_one_line_error(run("convert_hf.py", "org/gated", env=online, cwd=tmp_path), "org/gated", "gated",
                              "hf auth login")
        assert_one_line_error(run("convert_hf.py", "org/nope", env=online, cwd=tmp_path), "org/nope",
                              "hf auth login", "exact repo id")
    finally:
        server.shutdown()
        server.server_close()
    # a port nobody listens on: the Hub cannot be reached at all
    unreachable = {**online, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    assert_one_line_error(run("convert_hf.py", "org/nope", env=unreachable, cwd=tmp_path), "org/nope",
                          "cannot reach", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "checkpoints").exists()


def test_a_recipe_names_its_checkpoint_by_hub_id(tiny_dir, tmp_path, monkeypatch):
    # train.py resolves checkpoint_dir: org/name as LLM.load does; here the conversion is already there
    shutil.copytree(tiny_dir, tmp_path / "checkpoints" / "org" / "tiny")
    monkeypatch.setenv("FLATLM_CHECKPOINTS", str(tmp_path / "checkpoints"))
    recipe = train.load_recipe(ROOT / "recipes" / "smollm2_135m_lora.yaml", [
        "checkpoint_dir=org/tiny", "model={}", f"out_dir={tmp_path / 'run'}", "data.max_seq_len=48",
        "global_batch_size=2", "micro_batch_size=2", "max_steps=1", "eval_interval=0", "eval_batches=1"])
    final = train.train(recipe, train.Env())
    assert generate.LLM.load(final, device="cpu").model.config.n_layer == 2
