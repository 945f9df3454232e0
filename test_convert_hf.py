"""convert_hf.py: HF -> native -> HF is exact, every input layout is read, peak memory follows the largest
shard, and bad input fails with one line naming the problem and leaves nothing behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import convert_hf
import models
from conftest import cli_error, perturb_, save_hf

ROOT = Path(__file__).parent
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(**extra):
    torch.manual_seed(0)
    return perturb_(LlamaForCausalLM(LlamaConfig(**{**TINY, **extra})).eval())


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact_and_loads_in_transformers(tied, tmp_path):
    hf = tiny_llama(tie_word_embeddings=tied)
    save_hf(hf, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    convert_hf.native_to_hf(tmp_path / "native", tmp_path / "back")

    original, back = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name in original:
        assert torch.equal(original[name], back[name]), name
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    idx = torch.randint(0, TINY["vocab_size"], (1, 17))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits)


def test_native_layout_fuses_projections(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["family"] == "llama"
    with safe_open(tmp_path / "native" / "model.safetensors", "pt") as f:
        assert f.get_slice("layers.0.attn.qkv.weight").get_shape() == [(4 + 2 * 2) * 16, 64]
        assert f.get_slice("layers.0.mlp.gate_up.weight").get_shape() == [2 * 128, 64]


def test_sharded_safetensors_in_sharded_out(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    assert (tmp_path / "native" / "model.safetensors.index.json").is_file()
    model = models.load(tmp_path / "native", device="cpu")
    idx = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), hf(idx).logits)


def test_pytorch_bin_input(tmp_path):
    hf = tiny_llama()
    save_hf(hf, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model = convert_and_load_cli(tmp_path)
    idx = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), hf(idx).logits)


def convert_and_load_cli(tmp_path):
    r = cli(tmp_path / "hf", tmp_path / "native")
    assert r.returncode == 0, r.stderr
    return models.load(tmp_path / "native", device="cpu")


def test_dtype_flag_casts_weights(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    r = cli(tmp_path / "hf", tmp_path / "native", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert {t.dtype for t in load_file(tmp_path / "native" / "model.safetensors").values()} == {torch.bfloat16}


def test_peak_memory_follows_the_largest_shard_not_the_model(tmp_path):
    # ~96 MB of fp32 weights in shards of ~12 MB: converting must not hold the whole model in memory.
    big = dict(TINY, vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**big)).save_pretrained(tmp_path / "hf", max_shard_size="12MB")
    model_mb = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors")) / 2**20
    probe = (f"import resource, sys; sys.path.insert(0, {str(ROOT)!r}); import convert_hf, torch; "
             f"base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
             f"convert_hf.hf_to_native({str(tmp_path / 'hf')!r}, {str(tmp_path / 'native')!r}); "
             f"print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)")
    grown_mb = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                    check=True).stdout)
    assert model_mb > 90
    assert grown_mb < model_mb / 2, f"peak memory grew {grown_mb:.0f} MB converting a {model_mb:.0f} MB model"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 1, no output dir


def assert_clean_failure(r, out: Path, *fragments):
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_dir(tmp_path):
    assert_clean_failure(cli(tmp_path / "nope", tmp_path / "out"), tmp_path / "out", str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    (tmp_path / "hf").mkdir()
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", "config.json")


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "gpt2"}))
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", "'gpt2'", "llama", "mistral")


def test_missing_weights(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", "no weights")


def test_missing_shard(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", shard.name, "missing")


def test_truncated_file(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", "truncated")


def test_shape_mismatch(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "intermediate_size": 64}))
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", "shape mismatch", "layers.0.mlp")


def test_missing_tensor(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    assert_clean_failure(cli(tmp_path / "hf", tmp_path / "out"), tmp_path / "out", "missing",
                         "model.layers.1.mlp.up_proj.weight")


def test_failed_conversion_keeps_the_previous_output(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    convert_hf.hf_to_native(tmp_path / "hf", tmp_path / "native")
    before = (tmp_path / "native" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage")
    r = cli(tmp_path / "hf", tmp_path / "native")
    assert r.returncode == 1
    assert (tmp_path / "native" / "model.safetensors").read_bytes() == before


def main_error(*args) -> str:
    return cli_error(convert_hf.main, *args)


def test_bad_config_json_names_the_file_and_the_key(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    good = json.loads(path.read_text())
    for bad, key in (([good], "JSON object"),
                     ({k: v for k, v in good.items() if k != "num_attention_heads"}, "num_attention_heads"),
                     ({**good, "num_hidden_layers": "2"}, "num_hidden_layers"),
                     ({**good, "hidden_size": 0}, "hidden_size"),
                     ({**good, "num_hidden_layers": 100000}, "it has 100000 layers, the weights hold 2")):
        path.write_text(json.dumps(bad))
        message = main_error(tmp_path / "hf", tmp_path / "out")
        assert str(path) in message and key in message, message
        assert list(tmp_path.iterdir()) == [tmp_path / "hf"]


def test_legacy_pytorch_bin_input(tmp_path):
    # torch.save before the zip format (torch < 1.6, still on the Hub): read with weights_only, without mmap
    hf = tiny_llama()
    save_hf(hf, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "native")])
    model = models.load(tmp_path / "native", device="cpu")
    idx = torch.randint(0, TINY["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(model(idx), hf(idx).logits)


class Payload:
    """Unpickling this would run `touch <marker>`."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_malicious_pickle_is_refused_and_never_run(zip_format, tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, tmp_path / "hf" / "pytorch_model.bin",
               _use_new_zipfile_serialization=zip_format)
    message = main_error(tmp_path / "hf", tmp_path / "native")
    assert "holds Python objects, not only tensors" in message and "system" in message and "truncated" not in message
    assert not marker.exists() and not (tmp_path / "native").exists()


# ----------------------------------------------------------------------------------------------------------------
# Never delete what the tool did not write


def test_refuses_an_output_dir_it_did_not_write_unless_overwrite(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = main_error(tmp_path / "hf", out)
    assert "--overwrite" in message and "notes.txt" in message
    assert (out / "notes.txt").read_text() == "mine"
    convert_hf.main([str(tmp_path / "hf"), str(out), "--overwrite"])
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    # a checkpoint this tool wrote is replaced without asking; an empty dir is filled
    convert_hf.main([str(tmp_path / "hf"), str(out)])
    (tmp_path / "empty").mkdir()
    convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "empty")])


def test_an_hf_dir_is_not_mistaken_for_an_output_this_tool_wrote(tmp_path):
    # the same file names as a checkpoint (config.json, model.safetensors), but written by transformers
    save_hf(tiny_llama(), tmp_path / "hf")
    save_hf(tiny_llama(num_hidden_layers=1), tmp_path / "other_hf")
    before = (tmp_path / "other_hf" / "model.safetensors").read_bytes()
    assert "--overwrite" in main_error(tmp_path / "hf", tmp_path / "other_hf")
    assert (tmp_path / "other_hf" / "model.safetensors").read_bytes() == before


def test_refuses_outputs_that_would_destroy_the_source_or_more(tmp_path, monkeypatch):
    src = tmp_path / "models" / "hf"
    save_hf(tiny_llama(), src)
    (tmp_path / "models" / "sibling").mkdir()
    (tmp_path / "models" / "sibling" / "keep.txt").write_text("keep")
    (tmp_path / "a_file").write_text("keep")
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, why in ((src, "is the source"), (src / "native", "inside it"), (tmp_path / "models", "contains the source"),
                     (tmp_path / "a_file", "is a file"), (Path("."), "current directory")):
        for flags in ([], ["--overwrite"]):        # --overwrite never allows these
            assert why in main_error(src, out, *flags)
            assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, out
            assert not [p for p in tmp_path.rglob(".*")], "a temporary was left behind"


def test_refuses_a_symlink_out_of_the_source(tmp_path):
    save_hf(tiny_llama(), tmp_path / "hf")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (tmp_path / "hf" / "tokenizer.json").symlink_to(secret)
    message = main_error(tmp_path / "hf", tmp_path / "out")
    assert "symbolic link" in message and str(tmp_path / "hf" / "tokenizer.json") in message
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# kill -9 at any moment loses nothing, and the next run removes what the killed one left. A child process converts
# and SIGKILLs itself at a chosen point, found with sys.setprofile: the nth time `name` is entered, returns, or (a
# builtin) is called, with `where` the function it happens in.

KILL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import convert_hf, models
event, name, where, nth, src, out = sys.argv[1:7]
if len(sys.argv) > 7:            # as on a platform without renameat2: the two-rename swap
    models.exchange = lambda a, b: False
seen = 0

def kill_at(frame, e, arg):
    global seen
    if e == event and (arg.__name__ if e == "c_call" else frame.f_code.co_name) == name \\
            and frame.f_code.co_name == where:
        seen += 1
        if seen == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

sys.setprofile(kill_at)
convert_hf.hf_to_native(src, out)
"""


def convert_killed_at(event: str, name: str, where: str, nth: int, src: Path, out: Path, *two_renames: str):
    r = subprocess.run([sys.executable, "-c", KILL_AT.format(root=str(ROOT)), event, name, where, str(nth),
                        str(src), str(out), *two_renames], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("when, kill_at", [
    ("mid-write", ("call", "copy_tokenizer_files", "copy_tokenizer_files", 1)),
    ("after the exchange", ("return", "swap_dirs", "swap_dirs", 1)),
])
def test_kill_9_while_replacing_loses_nothing_and_the_next_run_cleans_up(when, kill_at, tmp_path):
    save_hf(tiny_llama(), tmp_path / "old_hf")
    save_hf(tiny_llama(num_hidden_layers=3), tmp_path / "new_hf")
    out = tmp_path / "native"
    convert_hf.hf_to_native(tmp_path / "old_hf", out)
    old = (out / "model.safetensors").read_bytes()
    convert_killed_at(*kill_at, tmp_path / "new_hf", out)
    assert leftovers(out), "the kill left no temporary: it came too late to test anything"
    if when == "mid-write":
        assert (out / "model.safetensors").read_bytes() == old
    else:
        assert models.load(out, device="cpu").config.n_layer == 3
    convert_hf.main([str(tmp_path / "new_hf"), str(out)])
    assert models.load(out, device="cpu").config.n_layer == 3 and leftovers(out) == []


def test_kill_9_between_two_renames_is_recovered_by_the_next_run(tmp_path):
    # Without renameat2 the swap is two renames: killed between them, the target is missing and the old copy
    # waits under .native.old-*; the next write of the target puts it back first, even if that write then fails.
    save_hf(tiny_llama(), tmp_path / "old_hf")
    save_hf(tiny_llama(num_hidden_layers=3), tmp_path / "new_hf")
    out = tmp_path / "native"
    convert_hf.hf_to_native(tmp_path / "old_hf", out)
    old = (out / "model.safetensors").read_bytes()
    convert_killed_at("c_call", "rename", "swap_dirs", 2, tmp_path / "new_hf", out, "two renames")
    assert not out.exists() and any(".old-" in name for name in leftovers(out))
    path = tmp_path / "new_hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert "truncated" in main_error(tmp_path / "new_hf", out)
    assert (out / "model.safetensors").read_bytes() == old and leftovers(out) == []
