"""nanochat.chat_eval (categorical and generative evaluation, pass@k, ChatCORE, 2-process gloo == 1 process)
and the scripts chat_eval / chat_cli end to end on a tiny random checkpoint."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import nanochat.chat_eval as chat_eval
from chat_eval_worker import ByteTokenizer, FakeModel, FakeTask, evaluate_all, mc_conversation, tiny_gpt
from nanochat.chat_eval import (BASELINES, TASK_NAMES, chatcore, collate_prompts, letter_token_ids,
                                rank_problem_indices, run_categorical_eval, run_chat_eval, run_generative_eval,
                                sample_conversations)
from nanochat.loss_eval import LoopProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------
# Pure helpers


def test_chatcore_baselines():
    assert chatcore(dict(BASELINES)) == pytest.approx(0.0)  # chance everywhere
    assert chatcore({name: 1.0 for name in TASK_NAMES}) == pytest.approx(1.0)
    results = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.05}
    expected = ((0.5 - 0.25) / 0.75 + 0.0 + (0.4 - 0.25) / 0.75 + 0.1 + 0.05) / 5
    assert chatcore(results) == pytest.approx(expected)
    with pytest.raises(ValueError, match="HumanEval"):
        chatcore({k: v for k, v in results.items() if k != "HumanEval"})


def test_rank_problem_indices_cover_each_problem_once():
    for n, world in [(10, 1), (10, 3), (2, 4), (0, 2)]:
        parts = [rank_problem_indices(n, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert all(i % world == r for r, p in enumerate(parts) for i in p)


def test_letters_must_be_single_tokens():
    assert letter_token_ids(TOK, ["A", "B", "1"]) == [ord("A"), ord("B"), ord("1")]
    with pytest.raises(ValueError, match="single token"):
        letter_token_ids(TOK, ["A", "BC"])


def test_collate_prompts_right_pads():
    ids, last = collate_prompts([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [5, 6, 9]] and last == [2, 0, 1]


# ----------------------------------------------------------------------------------------------------------
# Categorical evaluation with a rigged model


class RiggedLetterModel(FakeModel):
    """At the last position of a known prompt, the rigged letter beats the other letters; everywhere a
    non-letter token ('Z') has the highest logit and the first letters ('A', '1') beat the rest, so reading
    the wrong position or not restricting to the letters gives different answers."""

    def __init__(self, picks):
        super().__init__(TOK.get_vocab_size())
        self.picks = picks  # prompt tuple -> letter token id

    def scores(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits[:, :, ord("Z")] = 50.0
        logits[:, :, ord("A")] = logits[:, :, ord("1")] = 10.0
        for b in range(idx.size(0)):
            for t in range(idx.size(1)):
                pick = self.picks.get(tuple(idx[b, :t + 1].tolist()))
                if pick is not None:
                    logits[b, t, pick] = 30.0
        return logits


def rigged_setup(n=20):
    """Questions with letter sets ABCD, 1234 (ARC rows labelled 1-4), ABC, ABCDE; the answer is never the
    first letter; the model is right exactly when i % 3 != 0."""
    letter_sets = ["ABCD", "1234", "ABC", "ABCDE"]
    conversations, picks = [], {}
    for i in range(n):
        letters = letter_sets[i % 4]
        k = len(letters) - 1
        answer, wrong = letters[1 + i % k], letters[1 + (i + 1) % k]
        conv = mc_conversation(i, letters, answer)
        conversations.append(conv)
        picks[tuple(TOK.render_for_completion(conv))] = ord(answer if i % 3 != 0 else wrong)
    task = FakeTask(conversations, lambda conv, letter: letter == conv["answer"])
    return task, RiggedLetterModel(picks)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 32])
def test_categorical_eval_rigged_accuracy(batch_size):
    task, model = rigged_setup(20)
    assert run_categorical_eval(task, TOK, model, batch_size=batch_size, rank=0, world_size=1) == (13, 20)
    assert run_categorical_eval(task, TOK, model, batch_size=batch_size, max_problems=10,
                                rank=0, world_size=1) == (6, 10)  # i = 0, 3, 6, 9 wrong
    assert max(b for b, _ in model.calls) == min(batch_size, 20)


def test_run_chat_eval_dispatches_categorical(monkeypatch, capsys):
    task, model = rigged_setup(20)
    monkeypatch.setattr(chat_eval, "load_task", lambda name: task)
    assert run_chat_eval("ARC-Easy", model, TOK, engine=None, batch_size=4) == pytest.approx(13 / 20)
    assert "ARC-Easy: 13/20 = 65.00%" in capsys.readouterr().out


def test_progress_lines_show_running_accuracy(capsys):
    progress = LoopProgress("ARC-Easy", total=20, rank=0, min_interval=0.0)  # stdout is not a tty here
    for done in range(1, 21):
        progress.update(done, f"accuracy {(done // 2) / done:.2%}")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("ARC-Easy: 20/20 (rank 0) | accuracy 50.00%")
    LoopProgress("ARC-Easy", total=20, rank=1, min_interval=0.0).update(20, "x")
    assert capsys.readouterr().out == ""  # rank 0 only


def test_categorical_eval_fails_clearly_on_multi_token_letters():
    task = FakeTask([mc_conversation(0, ["A", "B2"], "A")], lambda conv, letter: True)
    with pytest.raises(ValueError, match="single token"):
        run_categorical_eval(task, TOK, RiggedLetterModel({}), rank=0, world_size=1)


def test_padded_batch_logits_match_single_prompts():
    model = tiny_gpt(TOK.get_vocab_size())
    task, _ = rigged_setup(5)
    prompts = [TOK.render_for_completion(task[i]) for i in range(5)]
    assert len({len(p) for p in prompts}) > 1
    ids, last = collate_prompts(prompts, pad_id=TOK.encode_special("<|assistant_end|>"))
    with torch.no_grad():
        batched = model(ids)
        for b, p in enumerate(prompts):
            single = model(torch.tensor([p]))[0, -1]
            torch.testing.assert_close(batched[b, last[b]], single, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Generative evaluation: pass@k with canned completions


class CannedEngine:
    """generate_batch returns canned completions per prompt (and records the sampling arguments)."""

    def __init__(self, tokenizer, canned):
        self.tokenizer, self.canned, self.kwargs = tokenizer, canned, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.kwargs.append(dict(kwargs, num_samples=num_samples))
        completions = self.canned[tuple(tokens)][:num_samples]
        assert len(completions) == num_samples
        results = [list(tokens) + self.tokenizer.encode(c) for c in completions]
        return results, [[0] * len(tokens) + [1] * (len(r) - len(tokens)) for r in results]


def test_generative_pass_at_k_with_canned_completions():
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "x"}],
              "answer": str(i)} for i in range(6)]
    task = FakeTask(convs, lambda conv, completion: completion.strip() == conv["answer"], eval_type="generative")
    samples = {0: ["0", "no"], 1: ["no", "1"], 2: ["no", "no"], 3: ["3", "3"], 4: ["nope", "no"], 5: ["5 ", "x"]}
    engine = CannedEngine(TOK, {tuple(TOK.render_for_completion(convs[i])): s for i, s in samples.items()})
    assert run_generative_eval(task, TOK, engine, num_samples=2, max_new_tokens=7, temperature=0.5, top_k=3,
                               rank=0, world_size=1) == (4, 6)  # pass@2: 0, 1, 3, 5
    assert run_generative_eval(task, TOK, engine, num_samples=1, rank=0, world_size=1) == (3, 6)  # pass@1
    assert engine.kwargs[0] == dict(num_samples=2, max_tokens=7, temperature=0.5, top_k=3)


# ----------------------------------------------------------------------------------------------------------
# 2 processes (gloo) == 1 process


@pytest.mark.slow
def test_two_process_gloo_eval_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "tests", "chat_eval_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = evaluate_all(rank=0, world_size=1)
    assert ranks[0] == ranks[1] == single
    assert single["categorical"][1] == 13 and single["generative"][1] == 7  # every problem counted once
    assert 0 < single["categorical"][0] < 13 or 0 < single["generative"][0] < 7  # a non-trivial result


# ----------------------------------------------------------------------------------------------------------
# Scripts end to end on a tiny random checkpoint

ACC_LINE = r"{} accuracy: (\d+\.\d\d)%"


@pytest.fixture(scope="module")
def tiny_sft_base_dir(tmp_path_factory, tokenizer):
    from tiny_checkpoint import make_tiny_checkpoint

    base_dir = tmp_path_factory.mktemp("chat_e2e")
    make_tiny_checkpoint(str(base_dir), tokenizer, source="sft")
    return base_dir


def _script_env(base_dir, data_dir):
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": data_dir,
            "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


@pytest.mark.slow
def test_chat_eval_script_all_tasks_and_torchrun(tiny_sft_base_dir, data_dir):
    env = _script_env(tiny_sft_base_dir, data_dir)
    args = ["-i", "sft", "-x", "4", "-m", "8", "-b", "1"]
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Code sandbox for HumanEval: bwrap (" in proc.stdout, proc.stdout[-3000:]  # the isolation it got
    single = {}
    for name in TASK_NAMES:
        m = re.search(ACC_LINE.format(re.escape(name)), proc.stdout)
        assert m, proc.stdout[-3000:]
        single[name] = float(m.group(1))
        assert f"{name}: " in proc.stdout and "/4 = " in proc.stdout  # 4 problems counted
    m = re.search(r"ChatCORE metric: (-?\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-3000:]
    assert float(m.group(1)) == pytest.approx(chatcore({k: v / 100 for k, v in single.items()}), abs=1e-3)
    report_texts = [p.read_text() for p in (tiny_sft_base_dir / "report").glob("*.md")]
    section = [t for t in report_texts if "Chat evaluation sft" in t]
    assert section and "ChatCORE" in section[0] and "ARC-Easy" in section[0], report_texts

    # the same two tasks under torchrun with 2 processes (gloo) give the same accuracies
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.chat_eval", *args, "-a", "ARC-Easy|GSM8K"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ARC-Easy", "GSM8K"):
        m = re.search(ACC_LINE.format(re.escape(name)), proc.stdout)
        assert m and float(m.group(1)) == single[name], proc.stdout[-3000:]
    assert "ChatCORE" not in proc.stdout  # only two tasks ran


@pytest.mark.slow
def test_chat_cli_prompt_and_interactive(tiny_sft_base_dir, data_dir):
    env = _script_env(tiny_sft_base_dir, data_dir)
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-i", "sft", "-p", "Hello there", "-m", "12",
                           "-t", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.split("Assistant: ", 1)[1]
    assert proc.stdout.count("Assistant: ") == 1 and "User:" not in proc.stdout
    # interactive: two turns around a `clear`, then quit; greedy answers to the same first turn agree
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-i", "sft", "-m", "12", "-t", "0"],
                          input="Hello there\nclear\nHello there\nquit\n", cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(conversation cleared)" in proc.stdout
    turns = proc.stdout.split("Assistant: ")[1:]
    assert len(turns) == 2
    first, second = (t.split("\nUser:")[0].split("(conversation cleared)")[0].strip() for t in turns)
    assert first == second == answer.strip()


def test_chat_cli_shows_and_stops_a_reply_as_the_server_does():
    # chat_cli prints CompletionText's text and stops at reply_stop_tokens, the server's two pieces: tool calls
    # as <<expr=result>>, the other special tokens hidden (and kept out of the history), <|assistant_end|> ends it
    from nanochat.chat_turn import reply_stop_tokens, stream_reply
    from nanochat.web import CompletionText

    sp = TOK.special_ids
    tokens = [*TOK.encode("Café: "), sp["<|python_start|>"], *TOK.encode("1+1"), sp["<|python_end|>"],
              sp["<|output_start|>"], *TOK.encode("2"), sp["<|output_end|>"], sp["<|user_end|>"],
              sp["<|assistant_start|>"], *TOK.encode("done ✓"), sp["<|assistant_end|>"], *TOK.encode("never")]
    reply, shown = CompletionText(TOK), []
    kept, interrupted = stream_reply(iter(([t], [1]) for t in tokens), reply_stop_tokens(TOK),
                                     lambda t: shown.append(reply.add(t)))
    text = "".join(shown) + reply.finish()
    assert text == "Café: <<1+1=2>>done ✓" and not interrupted
    assert "<|" not in text and sp["<|user_end|>"] not in [t for t in kept if t not in reply.hidden]
    assert sp["<|python_start|>"] in [t for t in kept if t not in reply.hidden]  # tool calls stay in the history


# ----------------------------------------------------------------------------------------------------------
# Real tasks (local mirror): ARC rows labelled 1-4, GSM8K and HumanEval scoring on canned completions


def test_arc_rows_labelled_1_to_4_through_the_real_task(data_dir):
    from tasks.arc import ARC

    arc = ARC("ARC-Easy", "test")
    examples = [arc[i] for i in range(len(arc))]
    numeric = [c for c in examples if c["letters"] == ["1", "2", "3", "4"]][:3]
    lettered = [c for c in examples if c["letters"][0] == "A"][:3]
    assert len(numeric) == 3 and len(lettered) == 3
    convs = numeric + lettered
    for right in (True, False):
        picks = {}
        for conv in convs:
            answer = conv["messages"][-1]["content"]
            other = next(letter for letter in conv["letters"] if letter != answer)
            picks[tuple(TOK.render_for_completion(conv))] = ord(answer if right else other)
        task = FakeTask(convs, arc.evaluate)
        passed, total = run_categorical_eval(task, TOK, RiggedLetterModel(picks), batch_size=4, rank=0,
                                             world_size=1)
        assert (passed, total) == ((6 if right else 0), 6)


def test_gsm8k_scoring_on_canned_completions(data_dir):
    from tasks.gsm8k import GSM8K, extract_answer

    task = GSM8K("main", "test", stop=4)
    golds = [extract_answer(task[i]["messages"][-1]["content"][-1]["text"]) for i in range(4)]
    canned = {
        0: [f"So the total is {golds[0]}.\n#### {golds[0]}", "#### -1"],  # right first
        1: ["#### -1", f"<|python_start|>1+1<|python_end|>\n#### {golds[1]}"],  # right second (pass@2)
        2: [f"The answer is {golds[2]}", "#### -1"],  # no "####": wrong
        3: ["#### -1", "#### 0.5"],
    }
    engine = CannedEngine(TOK, {tuple(TOK.render_for_completion(task[i])): c for i, c in canned.items()})
    assert run_generative_eval(task, TOK, engine, num_samples=2, rank=0, world_size=1) == (2, 4)
    assert run_generative_eval(task, TOK, engine, num_samples=1, rank=0, world_size=1) == (1, 4)


@pytest.mark.slow
def test_humaneval_scoring_on_canned_completions(data_dir):
    from tasks.humaneval import HumanEval

    task = HumanEval(stop=3)
    canned = {}
    for i in range(3):
        conv = task[i]
        right = f"Here you go:\n```python\n{conv['messages'][-1]['content']}\n```\n"
        wrong = f"```python\ndef {conv['entry_point']}(*args, **kwargs):\n    return None\n```"
        canned[tuple(TOK.render_for_completion(conv))] = [wrong, right] if i < 2 else [wrong, wrong]
    engine = CannedEngine(TOK, canned)
    assert run_generative_eval(task, TOK, engine, num_samples=2, rank=0, world_size=1) == (2, 3)
    assert run_generative_eval(task, TOK, engine, num_samples=1, rank=0, world_size=1) == (0, 3)


def test_sample_conversations_keep_prompts_that_fit_the_context():
    """A validation prompt longer than the model's context is skipped (it used to crash generation after
    training); the first ones that fit are answered, and the heading says which prompts were used."""
    class Tok:
        def render_for_completion(self, conversation):
            return list(range(conversation["n"]))

        def decode(self, ids):
            return ",".join(map(str, ids))

    class Engine:
        def generate_batch(self, prompt, num_samples, max_tokens, temperature):
            assert len(prompt) + max_tokens <= 32
            return [prompt + [99] * max_tokens], None

    conversations = [{"n": 40}, {"n": 3}, {"n": 25}, {"n": 2}, {"n": 1}]
    items = sample_conversations(Engine(), Tok(), iter(conversations), context=32, max_tokens=8)
    assert items[0] == ("Sample conversations (final model, greedy; validation prompts of at most 24 tokens, so "
                        "that 8 new ones fit the model's 32 positions):")
    assert items[1:] == ["```\n0,1,2" + "99," * 7 + "99\n```", "```\n0,1" + "99," * 7 + "99\n```"]
    assert sample_conversations(Engine(), Tok(), iter(conversations[:1]), 32, 8)[1:] == []
