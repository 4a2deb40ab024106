"""Repository invariants: CI runs exactly the README's test command; the README keeps its two commands."""

import os

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


def test_readme_main_job_command_runs_the_cpu_profile():
    readme = read("README.md")
    assert "bash speedrun.sh cpu" in readme
    assert os.path.exists(os.path.join(REPO, "speedrun.sh"))
