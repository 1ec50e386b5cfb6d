"""The README's two commands are the contract, and CI runs exactly them."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", quick_start, re.S)][:2]


def test_ci_runs_the_readme_commands_verbatim():
    setup, tests = readme_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup.startswith("python3 -m venv .venv") and setup in ci
    assert "pytest" in tests and tests in ci


def test_ci_runs_the_slow_tier_after_the_readme_tests_and_the_readme_says_how():
    _, tests = readme_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    slow = ".venv/bin/python -m pytest -m slow"
    assert slow in ci and ci.index(slow) > ci.index(tests)
    assert "pytest -m slow" in (REPO / "README.md").read_text()
    # The default run is the fast tier: a plain `pytest` deselects exactly the slow tests.
    assert "-m 'not slow'" in (REPO / "pyproject.toml").read_text()


def test_readme_setup_installs_the_pinned_cpu_torch_first():
    setup, _ = readme_commands()
    assert setup.index("torch==2.13.0") < setup.index("pip install -e .")


def test_ci_makes_the_readme_serving_environment_before_the_tests():
    """tests/serving starts Triton from .venv-serve: CI makes it as the README says, first."""
    serving = (REPO / "README.md").read_text().split("## Serving on Triton", 1)[1]
    setup = re.findall(r"```\n(.*?)```", serving, re.S)[0].strip()
    _, tests = readme_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup.startswith("python3 -m venv .venv-serve") and setup in ci
    assert ci.index(setup) < ci.index(tests)
