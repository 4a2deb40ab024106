"""
Multi-node training the standard way, on CPU: two torchrun "nodes" on this machine
(`torchrun --nnodes=2 --nproc_per_node=1 --node_rank=R --rdzv_endpoint=127.0.0.1:PORT`, gloo) run chat_sft
and reach the same final weights as one node with `--nproc_per_node=2`. The scripts need no change for this:
compute_init takes the device from LOCAL_RANK and the process group from RANK / WORLD_SIZE / MASTER_ADDR,
which torchrun sets from its rendezvous.

    .venv/bin/python -m pytest tests/test_multinode.py
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sft_source(tmp_path_factory, tokenizer):
    from tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("multinode")
    make_tiny_checkpoint(str(root / "base"), tokenizer, source="base", depth=2, n_embd=64)
    rng = random.Random(0)
    data = root / "custom.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(32):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n")
    return root


def _sft_args(data):
    return ["-m", "scripts.chat_sft", "--", "--source=base", "--max_seq_len=128", "--eval_every=-1",
            "--eval_metrics_every=-1", "--max_iterations=3", "--device_batch_size=1", "--target_examples_per_step=4",
            "--init_lr_frac=0.5", f"--train_mixture=['CustomJSON:{data}']", f"--val_mixture=['CustomJSON:{data}']"]


def _final_weights(base_dir, source_dir):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint

    checkpoint_dir = os.path.join(base_dir, source_dir, "d2")
    step = find_last_step(checkpoint_dir)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, "cpu")
    return model_data, meta


def _one_node_and_two_nodes(source_dir, args, tmp_path, env_extra=None):
    """Run `args` (torchrun's script part) on one node with 2 processes and on two nodes of 1 process each,
    each in its own copy of source_dir; returns the two base dirs and node 0's output of the two-node run."""
    env_base = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", **(env_extra or {}))
    torchrun = [sys.executable, "-m", "torch.distributed.run"]

    one_node = tmp_path / "one_node"
    shutil.copytree(source_dir, one_node)
    env = dict(env_base, NANOCHAT_BASE_DIR=str(one_node))
    out = subprocess.run(torchrun + ["--standalone", "--nnodes=1", "--nproc_per_node=2"] + args, cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # two "nodes": the same command on each, with its node_rank and the rendezvous endpoint of node 0
    two_nodes = tmp_path / "two_nodes"
    shutil.copytree(source_dir, two_nodes)
    env = dict(env_base, NANOCHAT_BASE_DIR=str(two_nodes))
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(torchrun + ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
                                          f"--rdzv_endpoint={endpoint}"] + args,
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node_rank in (0, 1)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return one_node, two_nodes, outputs[0]


def _assert_same_trained_weights(one_node, two_nodes, source_base, source_dir):
    want, want_meta = _final_weights(one_node, source_dir)
    got, got_meta = _final_weights(two_nodes, source_dir)
    assert got_meta["step"] == want_meta["step"] == 3
    if source_base is not None:  # training moved the weights
        base = _final_weights(source_base, "base_checkpoints")[0]
        assert any(not torch.equal(base[k], want[k]) for k in want)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    return want_meta, got_meta


@pytest.mark.slow
def test_chat_sft_two_nodes_equal_one_node_with_two_processes(sft_source, tmp_path):
    one_node, two_nodes, out0 = _one_node_and_two_nodes(sft_source / "base", _sft_args(sft_source / "custom.jsonl"),
                                                        tmp_path)
    assert "world_size 2" in out0 and "Training loss" in out0  # global rank 0 lives on node 0
    want_meta, got_meta = _assert_same_trained_weights(one_node, two_nodes, sft_source / "base",
                                                       "chatsft_checkpoints")
    assert got_meta["world_size"] == want_meta["world_size"] == 2


@pytest.mark.slow
def test_base_train_two_nodes_equal_one_node_with_two_processes(tmp_path, data_dir, tokenizer):
    from nanochat.tokenizer import compute_token_bytes, save_token_bytes

    source = tmp_path / "source"
    tokenizer.save(str(source / "tokenizer"))
    save_token_bytes(compute_token_bytes(tokenizer), str(source / "tokenizer"))
    args = ["-m", "scripts.base_train", "--", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
            "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=3", "--eval_every=-1",
            "--sample_every=-1", "--core_metric_every=-1"]
    one_node, two_nodes, out0 = _one_node_and_two_nodes(source, args, tmp_path, {"NANOCHAT_DATA_DIR": data_dir})
    assert "world_size=2" in out0
    _, got_meta = _assert_same_trained_weights(one_node, two_nodes, None, "base_checkpoints")
    assert got_meta["world_size"] == 2
