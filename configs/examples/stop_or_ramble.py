"""
A synthetic preference set made from a seed, to see DPO change a behaviour at CPU size: answers that stop after
the answer ("7 plus 5 is 12.") against answers that ramble past it ("7 plus 5 is 12. Also, ...").

    python configs/examples/stop_or_ramble.py write OUT_DIR       # sft.jsonl (half stop, half ramble), prefs.jsonl
    python -m scripts.chat_sft --source=base --train_mixture "['CustomJSON:OUT_DIR/sft.jsonl']" ...
    python configs/examples/stop_or_ramble.py measure sft         # ramble rate on held-out prompts
    python -m scripts.chat_dpo --data "['OUT_DIR/prefs.jsonl']" ...
    python configs/examples/stop_or_ramble.py measure dpo [MODEL_TAG]

`measure` samples answers (temperature 1.0) to held-out prompts (a seed the files never use) and prints the
share that rambles (text after the answer's first sentence), the share whose first sentence has the answer's
form ("A plus B is C.", C not checked) and the mean answer length in tokens.
"""

import json
import os
import random
import re
import sys

RAMBLES = ["Also, the quick brown fox jumps over the lazy dog.", "I hope this helps you today.",
           "Numbers are fun to add.", "By the way, the sky is blue."]


def question(rng):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def ramble(rng, answer):
    return " ".join([answer] + rng.sample(RAMBLES, rng.randint(1, 3)))


def write(out_dir, num_sft=2000, num_pairs=600, seed=0):
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sft.jsonl"), "w", encoding="utf-8") as f:
        for i in range(num_sft):
            q, a = question(rng)
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a if i % 2 else ramble(rng, a)}]}) + "\n")
    with open(os.path.join(out_dir, "prefs.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(num_pairs):
            q, a = question(rng)
            f.write(json.dumps({"prompt": q, "chosen": a, "rejected": ramble(rng, a)}) + "\n")


def measure(source, model_tag=None, num_prompts=100, num_samples=4, seed=12345):
    import torch

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    model, tokenizer, _ = load_model(source, "cpu", phase="eval", model_tag=model_tag)
    engine = Engine(model, tokenizer)
    rng = random.Random(seed)
    rambled, well_formed, lengths = 0, 0, []
    with torch.no_grad():
        for i in range(num_prompts):
            q, _ = question(rng)
            prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": q}]})
            results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=48, temperature=1.0,
                                               seed=seed + i)
            for tokens in results:
                text = tokenizer.decode(tokens[len(prompt):]).strip()
                lengths.append(len(tokens) - len(prompt))
                first, _, rest = text.partition(".")
                rambled += bool(rest.strip())
                well_formed += bool(re.fullmatch(r"\d+ plus \d+ is \d+", first))
    total = num_prompts * num_samples
    print(f"{source}: rambles {rambled}/{total} = {rambled / total:.3f} | answer form {well_formed / total:.3f} | "
          f"mean answer length {sum(lengths) / total:.1f} tokens")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("write", "measure"):
        sys.exit(__doc__)
    write(sys.argv[2]) if sys.argv[1] == "write" else measure(*sys.argv[2:])
