"""train.py under torchrun: real processes, gloo on CPU, FSDP2. Two processes give the losses and weights of one
process with the same global batch; sharded checkpoints resume on one process and on two; nothing of torch_xla is
imported where there is no TPU."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import recipe as recipe_lib
import train
from conftest import TINY_PRETRAIN_MODELS, tiny_pretraining

ROOT = Path(__file__).parent
RECIPE = ROOT / "recipes" / "smollm2_135m_lora.yaml"


def small(tiny_dir, out_dir, *overrides):
    return [str(RECIPE), f"checkpoint_dir={tiny_dir}", "model={}", f"out_dir={out_dir}", "data.max_seq_len=48",
            "global_batch_size=4", "micro_batch_size=1", "eval_interval=0", "eval_batches=2", "max_steps=4",
            "optimizer.lr=5e-3", "optimizer.warmup_steps=1", *overrides]


def launch(nproc: int, *args, script=ROOT / "train.py"):
    """python train.py ... (nproc 1) or torchrun --nproc_per_node=nproc train.py ..., one thread per process."""
    cmd = [sys.executable, str(script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    r = subprocess.run(cmd + list(map(str, args)), capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out_dir: Path, column="loss") -> dict[int, float]:
    with open(out_dir / "log.csv") as f:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(f) if row[column]}


def assert_same_weights(a: Path, b: Path, atol=1e-5):   # 1/500 of one step at lr 5e-3
    wa, wb = models.load_state_dict(a), models.load_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=1e-5), k


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_match_one(method, tiny_dir, tmp_path):
    launch(1, *small(tiny_dir, tmp_path / "one", f"method={method}"))
    launch(2, *small(tiny_dir, tmp_path / "two", f"method={method}"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    assert two == pytest.approx(one, rel=1e-5)
    assert losses(tmp_path / "two", "val_loss") == pytest.approx(losses(tmp_path / "one", "val_loss"), rel=1e-5)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")   # consolidated on rank 0


def test_sharded_checkpoint_resumes_on_one_and_on_two_processes(tiny_dir, tmp_path):
    launch(2, *small(tiny_dir, tmp_path / "two", "method=full", "save_interval=2"))
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000002"
    assert len(list(checkpoint.glob("*.distcp"))) == 2                            # one shard file per process
    straight = losses(tmp_path / "two")
    for nproc in (1, 2):
        out = tmp_path / f"resumed{nproc}"
        launch(nproc, *small(tiny_dir, out, "method=full", f"resume={checkpoint}"))
        assert losses(out) == pytest.approx({k: v for k, v in straight.items() if k > 2}, rel=1e-5)
        assert_same_weights(out / "final", tmp_path / "two" / "final")


def test_consolidating_a_sharded_checkpoint_gives_the_single_process_weights(tiny_dir, tmp_path):
    launch(1, *small(tiny_dir, tmp_path / "one", "method=lora"))
    launch(2, *small(tiny_dir, tmp_path / "two", "method=lora", "save_interval=2"))
    # the step-4 checkpoint is the final one, written by every run
    launch(1, "consolidate", tmp_path / "two" / "checkpoints" / "step-000004", tmp_path / "consolidated")
    assert_same_weights(tmp_path / "consolidated", tmp_path / "one" / "final")
    assert (tmp_path / "consolidated" / "adapter.safetensors").is_file()


def test_hybrid_sharding_with_activation_checkpointing_matches(tiny_dir, tmp_path):
    # (cpu_offload is accepted and a no-op on CPU processes: their memory is the CPU's already)
    launch(1, *small(tiny_dir, tmp_path / "one", "method=full", "max_steps=2"))
    launch(2, *small(tiny_dir, tmp_path / "hsdp", "method=full", "max_steps=2", "distributed.sharding=hybrid",
                     "distributed.shard_size=1", "distributed.cpu_offload=true", "activation_checkpointing=true"))
    assert losses(tmp_path / "hsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.parametrize("method", ["qlora", "adapter"])
def test_qlora_and_adapter_shard(method, tiny_dir, tmp_path):
    launch(1, *small(tiny_dir, tmp_path / "one", f"method={method}", "max_steps=2"))
    launch(2, *small(tiny_dir, tmp_path / "two", f"method={method}", "max_steps=2"))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_pretraining_on_two_processes_equals_one_for_every_family(small_corpus, tmp_path):
    # Built on the meta device and sharded, every parameter is drawn afresh: the same values as on one process.
    # The two-process runs are one torchrun job (one start-up instead of five), each through train.train.
    jobs = {f: tiny_pretraining(small_corpus, tmp_path / f / "two", f) for f in TINY_PRETRAIN_MODELS}
    (tmp_path / "jobs.json").write_text(json.dumps(list(jobs.values())))
    driver = tmp_path / "train_each.py"
    driver.write_text(f"import json, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport recipe, train\n"
                      f"env = train.setup_env()\nfor argv in json.load(open({str(tmp_path / 'jobs.json')!r})):\n"
                      f"    train.train(recipe.load_recipe(argv[0], argv[1:]), env)\n")
    launch(2, script=driver)
    for family in TINY_PRETRAIN_MODELS:
        args = tiny_pretraining(small_corpus, tmp_path / family / "one", family)
        train.train(recipe_lib.load_recipe(args[0], args[1:]), train.Env())
        one, two = losses(tmp_path / family / "one"), losses(tmp_path / family / "two")
        assert one.keys() == {1, 2, 3} and all(math.isfinite(v) for v in one.values()), family
        assert one[1] == pytest.approx(math.log(257), rel=0.05), family   # a random init predicts uniformly at first
        assert two == pytest.approx(one, rel=1e-5), family
        assert_same_weights(tmp_path / family / "one" / "final", tmp_path / family / "two" / "final")
        # (validation takes eval_batches micro-batches per process, so other windows on two processes)
        assert math.isfinite(losses(tmp_path / family / "two", "val_loss")[3])


def test_no_torch_xla_without_a_tpu():
    assert not train.tpu_available()
    assert train.setup_env().device.type in ("cpu", "cuda")
    assert "torch_xla" not in sys.modules
