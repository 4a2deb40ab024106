"""
Runs that never clobber each other: a run owns its output folder (run_id in meta; another run's folder is
refused before anything is loaded, overwrite = 1 replaces it), the writable probe, one resume design for
base_train / mid_train / chat_sft (per-rank run state, find_resumable_step, bit-exact), tokenizer identity
(sha256 in meta, checked on load, tok_train refuses to replace a tokenizer in use), and reports that keep
per-task results. Unit tests of nanochat/runs.py and nanochat/report.py first, then behaviour
tests through the scripts as subprocesses (CPU, tiny models, one shared tiny base checkpoint).

    NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_runs.py
"""

import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.common import UserError
from nanochat.runs import (check_tokenizer, checkpoints_trained_with, find_resumable_step, load_run_state, prepare_run,
                           probe_writable, save_run_state, tokenizer_sha256)
from nanochat.report import Report, format_task_results, task_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# helpers


def _fake_checkpoint(checkpoint_dir, step, run_id="run-a", run_name="alice", world_size=1, state=True):
    """A checkpoint with a tiny 'model', the meta of a run, and (optionally) rank 0's run state."""
    if state:
        save_run_state(checkpoint_dir, step, 0, world_size, 10, {"cursor": step}, {"n": step},
                       {"train_loss": [1.0] * step}, "cpu")
    save_checkpoint(checkpoint_dir, step, {"w": torch.full((2,), float(step))}, None,
                    {"step": step, "run_id": run_id, "run_name": run_name, "world_size": world_size})


def _digest(folder):
    """{file name: sha256} of every file in a folder."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _make_unwritable(path):
    """Make `path` a folder this process cannot write: chmod 0555, or (as root, which ignores permissions)
    a symlink to /sys, where even root cannot create files. Fails the test if neither works."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    try:
        with open(os.path.join(path, ".check"), "w"):
            pass
    except OSError:
        return
    os.remove(os.path.join(path, ".check"))
    os.chmod(path, 0o755)
    os.rmdir(path)
    os.symlink("/sys", path)
    try:
        with open(os.path.join(path, ".check"), "w"):
            pass
    except OSError:
        return
    pytest.fail(f"could not make {path} unwritable on this machine")


def _run(module, base_dir, args, nproc=1, expect=0, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, "--", *args]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == expect, (f"{module} exited {out.returncode}, expected {expect}:\n"
                                      f"STDOUT\n{out.stdout[-4000:]}\nSTDERR\n{out.stderr[-4000:]}")
    return out


def _error_line(out):
    """The one `error: ...` line of a refused run (and nothing else on stderr from rank 0's handler)."""
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) >= 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


def _weights(checkpoint_dir, step):
    return load_checkpoint(str(checkpoint_dir), step, "cpu")[0]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _interrupt_after(straight, interrupted, checkpoint_subdir, final_step):
    """A copy of a finished run's base dir as it was before its final save (the run 'crashed' after the last
    periodic checkpoint)."""
    shutil.copytree(straight, interrupted)
    final = glob.glob(os.path.join(interrupted, checkpoint_subdir, f"*_{final_step:06d}*"))
    assert final
    for path in final:
        os.remove(path)


# ---------------------------------------------------------------------------------------------------------
# unit tests: output folders


def test_fresh_run_into_another_runs_folder_is_refused_and_overwrite_replaces_it(tmp_path):
    out_dir = str(tmp_path / "chatsft_checkpoints" / "d2")
    _fake_checkpoint(out_dir, 2)
    _fake_checkpoint(out_dir, 5)
    with open(os.path.join(out_dir, "notes.txt"), "w") as f:
        f.write("mine")
    before = _digest(out_dir)
    with pytest.raises(UserError) as e:
        prepare_run(out_dir, resume="0", overwrite=0)
    msg = str(e.value)
    for part in (out_dir, "run 'alice'", "id run-a", "newest step 5", "resume = 1", "output_tag", "overwrite = 1"):
        assert part in msg, (part, msg)
    assert _digest(out_dir) == before  # nothing touched, no probe file left behind
    plan = prepare_run(out_dir, resume="0", overwrite=1)
    assert plan.resume_dir is None and plan.run_id != "run-a"
    # only checkpoint files are set aside (removed at the new run's first save); the new run owns the folder
    assert sorted(os.listdir(out_dir)) == [".replaced", ".run.lock", "notes.txt"]
    from nanochat.runs import discard_set_aside, restore_set_aside

    restore_set_aside(out_dir)  # the new run stopped before its first save (a bad option, a missing dataset)
    assert _digest(out_dir) == before | {".run.lock": _digest(out_dir)[".run.lock"]}
    plan = prepare_run(out_dir, resume="0", overwrite=1)
    _fake_checkpoint(out_dir, 1, run_id=plan.run_id)
    restore_set_aside(out_dir)  # no-op: the new run has saved
    discard_set_aside(out_dir)
    assert sorted(checkpoint_files(out_dir)) == ["meta_000001.json", "model_000001.safetensors", "notes.txt",
                                                 "state_000001_rank0.pt"]
    with pytest.raises(UserError, match="contradict"):
        prepare_run(out_dir, resume="1", overwrite=1)


def test_resume_finds_the_run_and_keeps_its_id(tmp_path):
    out_dir = str(tmp_path / "out")
    plan = prepare_run(out_dir, resume="1")  # nothing there yet: a fresh start
    assert plan.resume_dir is None and os.path.isdir(out_dir)
    _fake_checkpoint(out_dir, 3)
    _fake_checkpoint(out_dir, 6)
    save_checkpoint(out_dir, 9, {"w": torch.zeros(2)}, None, {"step": 9, "run_id": "run-a"})  # no run state
    assert find_resumable_step(out_dir) == 6
    plan = prepare_run(out_dir, resume=1)
    assert (plan.resume_dir, plan.resume_step, plan.run_id) == (out_dir, 6, "run-a")
    with pytest.raises(UserError, match="saved with world size 1, this run has 2"):
        prepare_run(out_dir, resume="1", world_size=2)
    with pytest.raises(UserError, match="expected 0 .* 1 .* or an existing checkpoint folder"):
        prepare_run(out_dir, resume=str(tmp_path / "nowhere"))
    # resuming from a folder into another output folder that holds a third run's checkpoints is refused
    other = str(tmp_path / "other")
    _fake_checkpoint(other, 4, run_id="run-b", run_name="bob")
    with pytest.raises(UserError, match="run 'bob'"):
        prepare_run(other, resume=out_dir)
    # a resumed run writing into a new folder is fine
    plan = prepare_run(str(tmp_path / "new"), resume=out_dir)
    assert plan.resume_step == 6 and plan.run_id == "run-a"


def test_unwritable_folder_fails_fast(tmp_path):
    target = str(tmp_path / "ro")
    _make_unwritable(target)
    with pytest.raises(UserError, match=r"output folder .*ro is not writable"):
        probe_writable(target)


def test_run_state_round_trip_rng_and_mismatches(tmp_path):
    d = str(tmp_path)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    save_run_state(d, 4, 1, 2, 10, {"epoch": 0, "cursor": 7}, {"examples": 16, "min": float("inf")},
                   {"train_loss": [2.0, 1.5]}, "cpu")
    want = (torch.rand(3), random.random(), np.random.rand())
    state = load_run_state(d, 4, 1, 2, 10, "cpu")  # restores the RNG states saved above
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]
    assert state["data_state"] == {"epoch": 0, "cursor": 7} and state["counters"]["examples"] == 16
    assert state["loss_series"] == {"train_loss": [2.0, 1.5]} and state["step"] == 4
    with pytest.raises(UserError, match="world size 2, this run has 1"):
        load_run_state(d, 4, 1, 1, 10, "cpu")
    with pytest.raises(UserError, match="schedule of 10 steps, this run's options give 12"):
        load_run_state(d, 4, 1, 2, 12, "cpu")
    save_run_state(d, 10, 0, 1, 10, {}, {}, {}, "cpu")
    with pytest.raises(UserError, match=r"already finished \(step 10 of 10\)"):
        load_run_state(d, 10, 0, 1, 10, "cpu")
    with pytest.raises(UserError, match="missing"):
        load_run_state(d, 4, 0, 2, 10, "cpu")


def test_tokenizer_hash_check(tmp_path, tokenizer):
    tok_dir = str(tmp_path / "tokenizer")
    tokenizer.save(tok_dir)
    sha = tokenizer_sha256(tok_dir)
    assert sha == tokenizer_sha256(tok_dir) and len(sha) == 64
    assert tokenizer_sha256(str(tmp_path / "none")) is None
    check_tokenizer("ckpt", 3, {"tokenizer_sha256": sha}, tok_dir)  # same tokenizer: fine
    check_tokenizer("ckpt", 3, {}, tok_dir)  # checkpoints from before the hash are not checked
    with open(os.path.join(tok_dir, "tokenizer.json"), "a") as f:
        f.write(" ")
    new_sha = tokenizer_sha256(tok_dir)
    assert new_sha != sha
    with pytest.raises(UserError) as e:
        check_tokenizer("ckpt", 3, {"tokenizer_sha256": sha}, tok_dir)
    assert sha[:16] in str(e.value) and new_sha[:16] in str(e.value) and "ckpt step 3" in str(e.value)
    # which checkpoint folders were trained with a tokenizer (their newest meta decides)
    base = tmp_path / "base"
    save_checkpoint(str(base / "base_checkpoints" / "d2"), 1, {"w": torch.zeros(1)}, None,
                    {"step": 1, "tokenizer_sha256": sha})
    save_checkpoint(str(base / "mid_checkpoints" / "x"), 1, {"w": torch.zeros(1)}, None,
                    {"step": 1, "tokenizer_sha256": new_sha})
    assert checkpoints_trained_with(sha, str(base)) == [os.path.join("base_checkpoints", "d2")]


def test_output_tag_is_a_plain_folder_name():
    from nanochat.runs import default_output_tag

    assert default_output_tag(None, {"n_layer": 4}) == "d4"
    assert default_output_tag("quokka-sft", {"n_layer": 4}) == "quokka-sft"
    for bad in ("../elsewhere", "/tmp/x", "..", ".", "", " ", "a\\b", "x\ny"):
        with pytest.raises(UserError, match="plain folder name"):
            default_output_tag(bad, {"n_layer": 4})
    from nanochat.checkpoint_manager import resolve_checkpoint  # model tags (read side) are names too
    with pytest.raises(UserError, match="model_tag = '../base_checkpoints'"):
        resolve_checkpoint("sft", "../base_checkpoints", None, "/nonexistent-base")


# ---------------------------------------------------------------------------------------------------------
# unit tests: one live run per folder, temp files, keep_last, resume options, Ctrl-C


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder, pid, host=None):
    import socket

    from nanochat.folder_lock import LOCK_FILE

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-01 10:00:00",
                   "command": "scripts.chat_sft --run=other"}, f)


def test_a_folder_has_one_live_run_and_a_stale_lock_is_taken_over(tmp_path):
    from nanochat.folder_lock import LOCK_FILE, release_output_folder

    out_dir = str(tmp_path / "out")
    _write_lock(out_dir, os.getppid())  # a live process (pytest's parent) owns the folder
    with pytest.raises(UserError) as e:
        prepare_run(out_dir)
    msg = str(e.value)
    assert f"pid {os.getppid()}" in msg and "scripts.chat_sft --run=other" in msg and LOCK_FILE in msg
    assert not os.listdir(out_dir) == [] and checkpoint_files(out_dir) == []
    _write_lock(out_dir, 12345, host="another-host")  # another host: cannot be checked, refused as live
    with pytest.raises(UserError, match="another-host"):
        prepare_run(out_dir)
    _write_lock(out_dir, _dead_pid())  # a killed run's lock: taken over
    prepare_run(out_dir)
    lock = os.path.join(out_dir, LOCK_FILE)
    with open(lock) as f:
        assert json.load(f)["pid"] == os.getpid()
    prepare_run(out_dir, resume="1")  # this process again: its own lock
    release_output_folder(lock)
    assert not os.path.exists(lock)


def checkpoint_files(folder):
    return [n for n in os.listdir(folder) if not n.startswith(".")]


def test_two_processes_started_at_once_one_is_refused(tmp_path):
    """Two real processes race for one folder; exactly one owns it while both live."""
    out_dir = str(tmp_path / "out")
    code = ("import sys, time; from nanochat.runs import prepare_run; from nanochat.common import UserError\n"
            "try:\n    prepare_run(sys.argv[1]); print('owner', flush=True); time.sleep(4)\n"
            "except UserError as e:\n    print('refused', e, flush=True)")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code, out_dir], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].split()[0] for p in procs)
    assert outs == ["owner", "refused"], outs


def test_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    out_dir = str(tmp_path / "out")
    _fake_checkpoint(out_dir, 3)
    leftovers = [".tmp-model_000006.safetensors-k1ll3d", ".tmp-optim_000006_rank0.pt-x", ".tmp-meta_000006.json-y"]
    for name in leftovers + [".tmp-notes.txt-mine"]:
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("partial")
    prepare_run(out_dir, resume="1")
    names = set(os.listdir(out_dir))
    assert not names & set(leftovers) and ".tmp-notes.txt-mine" in names and "meta_000003.json" in names


def test_keep_last_keeps_the_newest_resumable_checkpoints(tmp_path):
    from nanochat.config import run_options
    from nanochat.runs import prune_checkpoints

    assert {o.name: o.default for o in run_options("base_checkpoints")}["keep_last"] == -1
    out_dir = str(tmp_path / "out")
    save_checkpoint(out_dir, 1, {"w": torch.zeros(2)}, None, {"step": 1})  # not resumable: never pruned
    for step in (2, 4, 6, 8):
        _fake_checkpoint(out_dir, step)
        save_run_state(out_dir, step, 1, 2, 10, {}, {}, {}, "cpu")  # a second rank's state file
    assert prune_checkpoints(out_dir, -1) == []
    assert prune_checkpoints(out_dir, 2) == [2, 4]
    assert prune_checkpoints(out_dir, 2, rank=1) == [2, 4]
    assert sorted(checkpoint_files(out_dir)) == sorted(
        ["model_000001.safetensors", "meta_000001.json"]
        + [f"{kind}_{step:06d}{ext}" for step in (6, 8) for kind, ext in
           (("model", ".safetensors"), ("meta", ".json"), ("state", "_rank0.pt"), ("state", "_rank1.pt"))])
    assert find_resumable_step(out_dir) == 8


def test_resume_refuses_options_that_change_the_data_or_batch(tmp_path):
    from nanochat.runs import check_resume_config

    out_dir = str(tmp_path / "out")
    saved = {"depth": 2, "total_batch_size": 512, "device_batch_size": 4, "max_seq_len": 64, "seed": 42,
             "train_mixture": ["SmolTalk:train"], "packing": "pad", "eval_every": 10, "run": "a", "resume": "0"}
    save_run_state(out_dir, 3, 0, 1, 10, {}, {}, {}, "cpu")
    save_checkpoint(out_dir, 3, {"w": torch.zeros(2)}, None, {"step": 3, "user_config": saved, "run_id": "r"})
    plan = prepare_run(out_dir, resume="1")
    same = dict(saved, eval_every=50, run="b", resume="1", keep_last=2)  # logging and saving may change
    check_resume_config(plan, same)
    changed = dict(same, depth=4, total_batch_size=1024, train_mixture=["SmolTalk:train*2"], packing="bestfit")
    with pytest.raises(UserError) as e:
        check_resume_config(plan, changed)
    msg = str(e.value)
    for part in ("depth = 4 (the run had 2)", "total_batch_size = 1024 (the run had 512)",
                 "train_mixture = ['SmolTalk:train*2']", "packing = 'bestfit'"):
        assert part in msg, msg
    assert "eval_every" not in msg and "max_seq_len" not in msg
    for key, value in (("device_batch_size", 8), ("max_seq_len", 128), ("seed", 1)):
        with pytest.raises(UserError, match=key):
            check_resume_config(plan, dict(same, **{key: value}))
    check_resume_config(prepare_run(str(tmp_path / "fresh")), changed)  # a fresh start compares nothing


def test_ctrl_c_ends_in_one_line_naming_the_last_checkpoint(tmp_path):
    from nanochat.runs import interrupt_note

    out_dir = str(tmp_path / "out")
    assert interrupt_note(out_dir, 7) == (f"stopped at step 7 (Ctrl-C); no checkpoint saved in {out_dir} "
                                          f"(save_every = N saves resumable ones)")
    _fake_checkpoint(out_dir, 5)
    assert interrupt_note(out_dir, 7) == (f"stopped at step 7 (Ctrl-C); the last checkpoint is step 5 in "
                                          f"{out_dir}; resume with resume = 1")
    # the script's loop variable `step` is read at the interrupt, through the error handler
    script = tmp_path / "train.py"
    script.write_text("from nanochat.common import install_error_handler\nfrom nanochat.runs import prepare_run\n"
                      f"install_error_handler()\nprepare_run({out_dir!r}, resume='1')\n"
                      "for step in range(10):\n    if step == 7:\n        raise KeyboardInterrupt\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    env.pop("NANOCHAT_DEBUG", None)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130 and out.stderr.strip().splitlines() == [interrupt_note(out_dir, 7)], out.stderr


def test_prepare_finetune_resolves_checks_and_plans(tmp_path, tokenizer, monkeypatch):
    from tiny_checkpoint import make_tiny_checkpoint

    from nanochat.runs import prepare_finetune

    base_dir = str(tmp_path)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)  # the tokenizer check reads the tokenizer there
    source = make_tiny_checkpoint(base_dir, tokenizer, source="base", depth=2, step=3)
    source_dir, source_step, meta, plan = prepare_finetune("base", None, None, "mid_checkpoints", None)
    assert (source_dir, source_step, meta["step"]) == (source, 3, 3)
    assert plan.output_dir == os.path.join(base_dir, "mid_checkpoints", "d2") and os.path.isdir(plan.output_dir)
    assert plan.resume_dir is None and plan.run_id
    _, _, _, plan = prepare_finetune("base", "d2", 3, "chatsft_checkpoints", "quokka", base_dir=base_dir)
    assert plan.output_dir == os.path.join(base_dir, "chatsft_checkpoints", "quokka")
    with pytest.raises(UserError, match="no optimizer state"):  # the warm-start check, on a fresh start only
        prepare_finetune("base", None, None, "chatsft_checkpoints", "warm", check_optimizer=True)
    assert not os.path.exists(os.path.join(base_dir, "chatsft_checkpoints", "warm"))  # refused before writing
    with open(os.path.join(base_dir, "tokenizer", "tokenizer.json"), "a") as f:
        f.write(" ")  # another tokenizer than the checkpoint's
    with pytest.raises(UserError, match="tokenizer"):
        prepare_finetune("base", None, None, "mid_checkpoints", None)


def test_load_resume_restores_run_state_and_optimizers(tmp_path):
    from nanochat.runs import load_resume

    d = str(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_run_state(d, 5, 0, 1, 10, {"cursor": 7}, {"examples": 40}, {"train_loss": [1.0]}, "cpu")
    save_checkpoint(d, 5, model.state_dict(), [opt.state_dict()], {"step": 5, "world_size": 1})
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    state = load_resume(d, 5, [fresh], 0, 1, 10, "cpu")
    assert state["step"] == 5 and state["data_state"] == {"cursor": 7} and state["counters"] == {"examples": 40}
    saved, loaded = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) and float(loaded[k]["step"]) == 1
    with pytest.raises(UserError, match="schedule of 10 steps"):
        load_resume(d, 5, [fresh], 0, 1, 12, "cpu")


def test_save_training_checkpoint_writes_run_state_model_optimizers_and_meta(tmp_path):
    from nanochat.runs import load_run_state, save_training_checkpoint
    from nanochat.gpt import GPTConfig, random_model

    d = str(tmp_path)
    model = random_model(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    optimizers = model.setup_optimizers()
    run_state = dict(num_iterations=9, data_state={"cursor": 3}, counters={"examples": 12}, loss_series={"train": []})
    save_training_checkpoint(d, 4, model, optimizers, run_state, {"run_id": "r1", "step": 99})
    weights, optimizer_data, meta = load_checkpoint(d, 4, "cpu", load_optimizer=True)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert len(optimizer_data) == len(optimizers)
    assert meta["model_config"]["n_embd"] == 16 and meta["world_size"] == 1 and meta["num_iterations"] == 9
    assert meta["run_id"] == "r1" and meta["git_commit"] and meta["step"] == 4  # the script cannot change the step
    state = load_run_state(d, 4, 0, 1, 9, "cpu")
    assert state["data_state"] == {"cursor": 3} and state["counters"] == {"examples": 12}


# ---------------------------------------------------------------------------------------------------------
# unit tests: report results per task


def test_subset_results_keep_the_other_tasks_and_are_marked(tmp_path):
    report = Report(str(tmp_path / "report"))
    section = "Chat evaluation sft"
    full = {t: {"value": v, "max_problems": None, "checkpoint": "sft d2 step 6"}
            for t, v in [("ARC-Easy", 0.5), ("ARC-Challenge", 0.25), ("MMLU", 0.3), ("GSM8K", 0.1)]}
    report.merge_task_results(section, full)
    merged = report.merge_task_results(section, {"ARC-Easy": {"value": 0.75, "max_problems": 20,
                                                              "checkpoint": "sft d2 step 6"}})
    assert set(merged) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K"}
    lines = format_task_results(merged, "sft d2 step 6")
    assert lines["ARC-Easy"] == "0.7500 (-x 20)" and lines["MMLU"] == "0.3000"
    assert format_task_results(merged, "sft d2 step 9")["MMLU"] == "0.3000 (from sft d2 step 6)"
    assert task_metrics(merged)["ARC-Easy"] == {"value": 0.75, "note": "-x 20"}
    assert task_metrics(merged)["MMLU"] == {"value": 0.3, "note": None}
    report.log(section, [{"source": "sft"}, lines], metrics=task_metrics(merged))
    report.log("Stage timings", [{"tok_train (s)": 10, "base_train (s)": 50, "total (s)": 60}])
    text = open(report.generate()).read()
    row = next(line for line in text.splitlines() if line.startswith("| ARC-Easy |"))
    assert "0.7500 (-x 20)" in row
    assert "| ARC-Challenge | - | - | 0.2500 |" in text
    assert "Total wall clock time: 0h01m00s (sum of the stages' times)" in text
    assert "0.7500 (-x 20)" in report.summary()


def test_total_time_is_the_sum_of_section_durations(tmp_path):
    report = Report(str(tmp_path / "report"))
    report.log("Base model training", [{"a": 1}], duration_s=100.0)
    report.log("Chat SFT", [{"b": 2}], duration_s=20.5)
    report.log("Chat evaluation sft", [{"c": 3}])  # a section without a duration adds nothing
    text = open(report.generate()).read()
    assert "Total wall clock time: 0h02m00s (sum of the stages' times)" in text


# ---------------------------------------------------------------------------------------------------------
# behaviour tests through the scripts


def _conversations(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


@pytest.fixture(scope="module")
def runs_env(tmp_path_factory, tokenizer):
    """One base dir with the tokenizer and a tiny base checkpoint (copied by each test), and a CustomJSON file."""
    from tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("runs")
    make_tiny_checkpoint(str(root / "base"), tokenizer, source="base", depth=2, n_embd=64)
    data = root / "custom.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _conversations(64)))
    return {"base": root / "base", "data": str(data)}


def _base_copy(runs_env, tmp_path, name="base"):
    base_dir = tmp_path / name
    shutil.copytree(runs_env["base"], base_dir)
    return base_dir


def _sft_args(runs_env, *extra):
    return ["--source=base", "--max_seq_len=64", "--eval_every=-1", "--eval_metrics_every=-1",
            "--device_batch_size=2", "--target_examples_per_step=4", "--max_iterations=4",
            f"--train_mixture=['CustomJSON:{runs_env['data']}']",
            f"--val_mixture=['CustomJSON:{runs_env['data']}:0:8']", *extra]


@pytest.mark.slow
def test_second_sft_run_into_the_same_folder_is_refused_early(runs_env, tmp_path):
    base_dir = _base_copy(runs_env, tmp_path)
    out_dir = base_dir / "chatsft_checkpoints" / "d2"
    _run("scripts.chat_sft", base_dir, _sft_args(runs_env, "--save_every=2", "--run=first"))
    before = _digest(out_dir)
    assert "meta_000002.json" in before and "state_000002_rank0.pt" in before
    first_id = json.load(open(out_dir / "meta_000004.json"))["run_id"]

    t0 = time.time()
    out = _run("scripts.chat_sft", base_dir, _sft_args(runs_env, "--max_iterations=3", "--run=second"), expect=2)
    line = _error_line(out)
    assert line.startswith(f"error: output folder {out_dir} already holds checkpoints of run 'first'")
    assert "newest step 4 saved" in line and "resume = 1" in line and "overwrite = 1" in line
    assert "Loaded checkpoint" not in out.stdout and "Training conversations" not in out.stdout  # before loading
    assert time.time() - t0 < 60
    assert _digest(out_dir) == before  # the first run's files are byte-identical

    # overwrite = 1 from a config file replaces the first run
    config = tmp_path / "overwrite.txt"
    config.write_text("overwrite = 1  # replace the earlier run\nrun = 'third'\n")
    out = _run("scripts.chat_sft", base_dir, ["--config", str(config)] + _sft_args(runs_env, "--max_iterations=3"))
    assert "overwrite = 1: set aside 8 checkpoint files of run 'first'" in out.stdout
    # only the new run's step-3 files are left (model weights may be .pt or .safetensors)
    assert sorted(name.split(".")[0] for name in os.listdir(out_dir)) == [
        "meta_000003", "model_000003", "optim_000003_rank0", "state_000003_rank0"]
    meta = json.load(open(out_dir / "meta_000003.json"))
    assert meta["run_name"] == "third" and meta["run_id"] != first_id
    assert meta["tokenizer_sha256"] == tokenizer_sha256(str(base_dir / "tokenizer"))


@pytest.mark.slow
def test_output_tag_separate_from_model_tag(runs_env, tmp_path, tokenizer):
    from tiny_checkpoint import make_tiny_checkpoint

    base_dir = tmp_path / "base"
    make_tiny_checkpoint(str(base_dir), tokenizer, source="base", model_tag="quokka")
    out = _run("scripts.chat_sft", base_dir, _sft_args(runs_env, "--model_tag=quokka", "--output_tag=quokka-sft",
                                                       "--max_iterations=2", "--run=quokka_run"))
    assert f"Loaded checkpoint: {base_dir}/base_checkpoints/quokka step 0" in out.stdout
    assert sorted(os.listdir(base_dir / "chatsft_checkpoints")) == ["quokka-sft"]
    meta = json.load(open(base_dir / "chatsft_checkpoints" / "quokka-sft" / "meta_000002.json"))
    assert meta["source_dir"].endswith("base_checkpoints/quokka") and meta["run_name"] == "quokka_run"
    # chat_cli loads it by its tag and says which checkpoint it loaded
    out = _run("scripts.chat_cli", base_dir, ["-i", "sft", "-g", "quokka-sft", "-p", "hi", "-m", "4"])
    assert re.search(rf"Loaded checkpoint: {re.escape(str(base_dir))}/chatsft_checkpoints/quokka-sft step 2 "
                     rf"\(run 'quokka_run', id {meta['run_id']}\)", out.stdout), out.stdout


@pytest.mark.slow
def test_unwritable_output_folder_is_refused_before_the_first_step(runs_env, tmp_path):
    base_dir = _base_copy(runs_env, tmp_path)
    target = base_dir / "chatsft_checkpoints" / "d2"
    _make_unwritable(str(target))
    t0 = time.time()
    out = _run("scripts.chat_sft", base_dir, _sft_args(runs_env), expect=2)
    assert _error_line(out).startswith(f"error: output folder {target} is not writable")
    assert "Step 00000" not in out.stdout and "Loaded checkpoint" not in out.stdout
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_tok_train_refuses_to_replace_a_tokenizer_in_use(runs_env, tmp_path, data_dir):
    base_dir = _base_copy(runs_env, tmp_path)
    before = _digest(base_dir / "tokenizer")
    old_sha = tokenizer_sha256(str(base_dir / "tokenizer"))
    args = ["--max_chars=100000", "--vocab_size=300"]
    out = _run("scripts.tok_train", base_dir, args, expect=2)
    line = _error_line(out)
    assert old_sha[:16] in line and "base_checkpoints/d2" in line and "overwrite = 1" in line
    assert _digest(base_dir / "tokenizer") == before
    # with overwrite = 1 it is replaced; the checkpoint then refuses to load, naming both hashes
    _run("scripts.tok_train", base_dir, args + ["--overwrite=1"])
    new_sha = tokenizer_sha256(str(base_dir / "tokenizer"))
    assert new_sha != old_sha
    out = _run("scripts.chat_cli", base_dir, ["-i", "base", "-p", "hi", "-m", "4"], expect=2)
    line = _error_line(out)
    assert old_sha[:16] in line and new_sha[:16] in line and "base_checkpoints/d2 step 0" in line


@pytest.mark.slow
def test_base_train_resume_is_bit_exact(tmp_path, data_dir, tokenizer):
    base_dir = tmp_path / "straight"
    tokenizer.save(str(base_dir / "tokenizer"))
    args = ["--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64", "--device_batch_size=2",
            "--total_batch_size=256", "--num_iterations=6", "--eval_every=3", "--eval_tokens=512",
            "--sample_every=-1", "--core_metric_every=-1", "--save_every=3"]
    _run("scripts.base_train", base_dir, args)
    interrupted = tmp_path / "interrupted"
    _interrupt_after(base_dir, interrupted, "base_checkpoints/d2", 6)
    out = _run("scripts.base_train", interrupted, args + ["--resume=1"])
    assert re.search(r"Resuming from .*base_checkpoints/d2 step 3 \(run 'dummy'", out.stdout)
    assert "step 00002/" not in out.stdout and "step 00003/" in out.stdout
    _assert_same_weights(_weights(base_dir / "base_checkpoints" / "d2", 6),
                         _weights(interrupted / "base_checkpoints" / "d2", 6))
    straight_meta = json.load(open(base_dir / "base_checkpoints" / "d2" / "meta_000006.json"))
    resumed_meta = json.load(open(interrupted / "base_checkpoints" / "d2" / "meta_000006.json"))
    assert resumed_meta["run_id"] == straight_meta["run_id"]  # kept across the resume
    assert resumed_meta["val_bpb"] == straight_meta["val_bpb"]
    # a different schedule is one clear line, not an assertion
    _interrupt_after(base_dir, tmp_path / "other", "base_checkpoints/d2", 6)
    out = _run("scripts.base_train", tmp_path / "other", [*args[:-1], "--num_iterations=8", "--resume=1"],
               expect=2)
    assert "num_iterations = 8 (the run had 6)" in _error_line(out)
    # so is another depth or batch (the model and data order of the run would silently change)
    changed = [a for a in args if not a.startswith(("--depth", "--total_batch_size"))]
    out = _run("scripts.base_train", tmp_path / "other", [*changed, "--depth=3", "--total_batch_size=512",
                                                           "--output_tag=d2", "--resume=1"], expect=2)
    line = _error_line(out)
    assert "depth = 3 (the run had 2)" in line and "total_batch_size = 512 (the run had 256)" in line, line


@pytest.mark.slow
def test_mid_train_resume_is_bit_exact(runs_env, tmp_path):
    base_dir = _base_copy(runs_env, tmp_path, "straight")
    args = ["--device_batch_size=2", "--total_batch_size=256", "--max_seq_len=64", "--num_iterations=6",
            "--eval_every=3", "--eval_tokens=256", "--save_every=3",
            f"--train_mixture=['CustomJSON:{runs_env['data']}']",
            f"--val_mixture=['CustomJSON:{runs_env['data']}:0:8']", "--skip_unavailable=[]"]
    out = _run("scripts.mid_train", base_dir, args)
    assert f"Loaded checkpoint: {base_dir}/base_checkpoints/d2 step 0 (run 'tiny_checkpoint'" in out.stdout
    interrupted = tmp_path / "interrupted"
    _interrupt_after(base_dir, interrupted, "mid_checkpoints/d2", 6)
    out = _run("scripts.mid_train", interrupted, args + ["--resume=1"])
    assert re.search(r"Resuming from .*mid_checkpoints/d2 step 3 \(run 'dummy'", out.stdout)
    assert "step 00002/" not in out.stdout and "step 00003/" in out.stdout
    _assert_same_weights(_weights(base_dir / "mid_checkpoints" / "d2", 6),
                         _weights(interrupted / "mid_checkpoints" / "d2", 6))
    # the base checkpoint and the mid weights differ: training did happen
    base = _weights(base_dir / "base_checkpoints" / "d2", 0)
    assert any(not torch.equal(base[k], v) for k, v in _weights(base_dir / "mid_checkpoints" / "d2", 6).items())


@pytest.mark.slow
def test_chat_sft_resume_two_ranks_gloo_is_bit_exact(runs_env, tmp_path):
    base_dir = _base_copy(runs_env, tmp_path, "straight")
    args = _sft_args(runs_env, "--device_batch_size=1", "--save_every=2", "--init_lr_frac=0.5")
    _run("scripts.chat_sft", base_dir, args, nproc=2)
    assert os.path.exists(base_dir / "chatsft_checkpoints" / "d2" / "state_000002_rank1.pt")
    interrupted = tmp_path / "interrupted"
    _interrupt_after(base_dir, interrupted, "chatsft_checkpoints/d2", 4)
    # resuming with another world size is one clear line
    out = _run("scripts.chat_sft", interrupted, args + ["--resume=1"], expect=2)
    assert "saved with world size 2, this run has 1" in _error_line(out)
    out = _run("scripts.chat_sft", interrupted, args + ["--resume=1"], nproc=2)
    assert "Resuming from" in out.stdout and not re.search(r"^Step 00001 \|", out.stdout, re.M)
    _assert_same_weights(_weights(base_dir / "chatsft_checkpoints" / "d2", 4),
                         _weights(interrupted / "chatsft_checkpoints" / "d2", 4))


@pytest.mark.slow
def test_subset_eval_leaves_the_other_tasks_in_the_report(tmp_path, data_dir, tokenizer):
    from tiny_checkpoint import make_tiny_checkpoint

    base_dir = tmp_path / "base"
    make_tiny_checkpoint(str(base_dir), tokenizer, source="sft", step=7)
    common = ["-i", "sft", "-m", "4", "-b", "4"]
    out = _run("scripts.chat_eval", base_dir, common + ["-a", "ARC-Easy|ARC-Challenge", "-x", "4"])
    assert f"Loaded checkpoint: {base_dir}/chatsft_checkpoints/d2 step 7 (run 'tiny_checkpoint'" in out.stdout
    _run("scripts.chat_eval", base_dir, common + ["-a", "ARC-Easy", "-x", "2"])
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert re.search(r"^- ARC-Easy: \d\.\d{4} \(-x 2\)$", section, re.M), section
    assert re.search(r"^- ARC-Challenge: \d\.\d{4} \(-x 4\)$", section, re.M), section  # kept
    assert "duration: " in section
    out = subprocess.run([sys.executable, "-m", "nanochat.report", "generate"], cwd=REPO_ROOT, capture_output=True,
                         text=True, env=dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\| ARC-Easy \| - \| - \| \d\.\d{4} \(-x 2\) \| - \|$", out.stdout, re.M), out.stdout
    assert re.search(r"^\| ARC-Challenge \| - \| - \| \d\.\d{4} \(-x 4\) \| - \|$", out.stdout, re.M)

