"""Repository invariants: CI runs exactly the README's test command; the README keeps its commands, and its
SFT examples are the files in configs/ (the guide's config, the custom task class)."""

import os
import re
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def ci_test_command():
    lines = read(".ci/run").splitlines()
    i = lines.index("# TEST COMMAND:")
    return lines[i + 1].strip()


def test_ci_runs_the_readme_test_command():
    command = ci_test_command()
    assert "pytest tests/" in command and "torch==2.13.0" in command
    assert command in read("README.md")


def test_readme_names_the_cpu_profile_command():
    # only that the README documents the command and the script exists: the CPU profile itself is run by
    # tests/test_pipeline.py (a tiny end-to-end run), not here
    assert "bash speedrun.sh cpu" in read("README.md")
    assert os.path.exists(os.path.join(REPO, "speedrun.sh"))


def test_readme_sft_examples_are_the_config_files():
    readme = read("README.md")
    assert "```\n" + read("configs/sft_guide.txt") + "```\n" in readme  # the guide's config, verbatim
    block = re.search(r"```python\n(  from tasks.common import Task\n.*?)  ```", readme, re.S).group(1)
    body = textwrap.dedent(block).split("\n\n\n", 1)[1]  # the class as written in the README
    example = read("configs/examples/my_custom_task.py")
    assert body.startswith("class MyCustomTask(Task):") and body.strip() in example
