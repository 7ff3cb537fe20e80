"""launch/megatron_lm_pretrain.sh and the flags files of configs/megatron_lm/: the command they build, the NSA
settings it gives, and the loud stop without Megatron-LM (run with PYTHON=echo: nothing is trained)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from megatron_nsa.megatron_lm.arguments import add_nsa_arguments, load_nsa_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "megatron_lm_pretrain.sh"


def launch(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": "echo", "NPROC": "1", **env}  # echo: print the command, run nothing
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=60)


def test_without_megatron_lm_it_stops_and_says_how_to_get_it():
    done = launch("configs/megatron_lm/nsa_1b_64k.args", MEGATRON_LM="/nonexistent")
    assert done.returncode == 2 and "git clone --branch core_v0.19.0" in done.stderr


def test_flags_files_build_the_paper_model_command(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("")
    done = launch("configs/megatron_lm/nsa_1b_64k.args", "configs/megatron_lm/paper_attention.args",
                  "--train-iters", "7", MEGATRON_LM=str(tmp_path), CKPT_DIR=str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[:2] == ["-m", "torch.distributed.run"] and "megatron_nsa.megatron_lm.pretrain_gpt" in words
    flags = words[words.index("megatron_nsa.megatron_lm.pretrain_gpt") + 1:]
    assert flags[-2:] == ["--train-iters", "7"] and "--mock-data" in flags
    assert flags[flags.index("--save") + 1] == flags[flags.index("--load") + 1] == str(tmp_path / "ckpt")
    nsa, megatron = add_nsa_arguments(argparse.ArgumentParser()).parse_known_args(flags)
    assert (nsa.nsa_compression, nsa.nsa_separate_kv, nsa.nsa_qk_head_dim, nsa.nsa_backend) == \
        ("mlp", True, 192, "triton")
    last_position = len(flags) - 1 - flags[::-1].index("--position-embedding-type")
    assert flags[last_position + 1] == "none"  # paper_attention.args comes later: NSA's own RoPE
    recipe = load_nsa_file(str(ROOT / nsa.nsa_config_file))
    assert recipe["nsa_select_count"] == 16 and recipe["nsa_window_size"] == 512


def test_data_path_needs_a_tokenizer(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("")
    done = launch("configs/megatron_lm/nsa_1b_64k.args", MEGATRON_LM=str(tmp_path), DATA_PATH="/data/corpus")
    assert done.returncode == 2 and "DATA_PATH needs TOKENIZER" in done.stderr
    done = launch("configs/megatron_lm/nsa_1b_64k.args", MEGATRON_LM=str(tmp_path), DATA_PATH="/data/a /data/b",
                  TOKENIZER="gpt2")
    flags = done.stdout.split()
    assert flags[flags.index("--data-path") + 1: flags.index("--data-path") + 3] == ["/data/a", "/data/b"]


def test_entry_point_without_megatron_lm_says_how_to_get_it(tmp_path):
    """megatron-core alone (as in CI): the entry point stops before parsing, with the clone command."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "megatron_nsa.megatron_lm.pretrain_gpt", "--nsa-compression", "mlp"],
                          capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=120)
    assert done.returncode == 1 and "git clone --branch core_v0.19.0" in done.stderr
    assert "could not be imported" in done.stderr


def test_entry_point_refuses_a_pretrain_gpt_that_is_not_megatron_lms(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("forward_step = None\n")
    fake_training = tmp_path / "megatron" / "training"
    fake_training.mkdir(parents=True)
    (fake_training / "__init__.py").write_text("")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "megatron_nsa.megatron_lm.pretrain_gpt"], capture_output=True,
                          text=True, cwd=tmp_path, env=environment, timeout=120)
    assert done.returncode == 1 and "is not Megatron-LM's pretrain_gpt.py" in done.stderr
    assert "train_valid_test_datasets_provider" in done.stderr
