"""The README's training-loop example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_example_runs():
    example = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["importance"].table[4:].ne(10.0).any(), "the importance table learned"
