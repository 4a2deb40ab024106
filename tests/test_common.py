"""nanochat.common: compute_init (single process and 2-process gloo under torchrun), autocast choice,
atomic writes, base dir."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import (UserError, atomic_write_text, autocast_ctx, compute_init, dist_rank_world, get_base_dir,
                             get_dist_info)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_single_process_compute_init(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ddp, rank, local_rank, world_size, device = compute_init("cpu")
    assert (ddp, rank, local_rank, world_size, device.type) == (False, 0, 0, 1, "cpu")
    assert dist_rank_world() == (0, 1) and get_dist_info() == (False, 0, 0, 1)


def test_torchrun_two_processes_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tests", "dist_common_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["ddp"] is True and res["rank"] == r and res["world_size"] == 2
        assert res["backend"] == "gloo" and res["device"] == "cpu"
        assert res["allreduce"] == 3.0  # 1 + 2
        assert res["dist_rank_world"] == [r, 2]


def test_autocast_choice(capsys):
    with autocast_ctx("cpu", "bfloat16"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32  # CPU: fp32 unless asked
    with autocast_ctx("cpu", "bfloat16", cpu_bf16=True):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16
    out = capsys.readouterr().out
    assert "float32" in out and "bfloat16" in out
    with pytest.raises(UserError, match="dtype must be"):
        autocast_ctx("cpu", "float16")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    atomic_write_text(str(path), "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(str(path), "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temp file left behind


def test_base_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "b"))
    assert get_base_dir() == str(tmp_path / "b") and (tmp_path / "b").is_dir()


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("from nanochat.common import UserError, install_error_handler\n"
                      "install_error_handler()\n"
                      "raise UserError('bad value in\\nsome.txt:3')\n")
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DEBUG"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr == "error: bad value in some.txt:3\n"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**env, "NANOCHAT_DEBUG": "1"})
    assert out.returncode == 2 and "Traceback" in out.stderr and out.stderr.endswith("error: bad value in some.txt:3\n")


def test_wandb_without_a_key_goes_offline_into_the_run_folder(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from nanochat.common import DummyWandb, init_wandb, wandb_api_key_present

    netrc = tmp_path / ".netrc"
    netrc.write_text("machine example.com login a password b\n")
    assert not wandb_api_key_present({}, str(netrc))
    assert wandb_api_key_present({"WANDB_API_KEY": "k"}, str(netrc))
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_api_key_present({}, str(netrc))

    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs) or "run")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert isinstance(init_wandb("dummy", "p", {}), DummyWandb) and not calls
    assert init_wandb("my_run", "p", {"a": 1}, run_dir=str(tmp_path / "run")) == "run"
    assert calls[-1]["mode"] == "offline" and calls[-1]["dir"] == str(tmp_path / "run")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("wandb: no API key") and str(tmp_path / "run" / "wandb") in out[0]
    monkeypatch.setenv("WANDB_MODE", "online")  # an explicit mode is left to wandb
    init_wandb("my_run", "p", {})
    assert "mode" not in calls[-1]

    def broken(**kwargs):
        raise RuntimeError("no API key configured\nmore")

    fake.init = broken
    assert isinstance(init_wandb("my_run", "p", {}), DummyWandb)  # never stops the run
    assert capsys.readouterr().out.strip() == "wandb: could not start (RuntimeError: no API key configured); " \
                                              "continuing without wandb"
