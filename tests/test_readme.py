"""The README's commands are the ones CI runs, and the ops it lists exist."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_test_command():
    blocks = [b.strip() for b in _bash_blocks(_readme())]
    test_cmd = [b for b in blocks if "pytest" in b]
    assert test_cmd, "README has no test command"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert test_cmd[0] in ci


def test_main_command_runs_free_sample():
    blocks = [b.strip() for b in _bash_blocks(_readme())]
    assert any(b.endswith("free-sample") for b in blocks)


def test_readme_op_table_matches_registered_ops():
    from free_kernels.ops import OPS

    text = _readme()
    for name in OPS:
        assert f"`{name}(" in text, f"op {name} missing from the README table"
