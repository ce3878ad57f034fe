"""The config reference (`vlm_jax.config_reference`) against the shipped configs, and ``--print_config``."""

import ast
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from vlm_jax import config_files, config_reference

REPO = pathlib.Path(__file__).resolve().parents[1]
# get_config arguments of the files that take one (``--config file.py:argument``); None = get_config().
ARGUMENTS = {"internvl3_1b_retrieval_stage2.py": (None, "stage1"), "internvl3_1b_sft.py": (None, "lora")}
SHIPPED = [f"{p.name}:{a}" if a else p.name for p in sorted((REPO / "configs").glob("*.py"))
           for a in ARGUMENTS.get(p.name, (None,))]
LINE = re.compile(r"^(?P<indent> *)(?P<name>[\w.]+)(?P<rest>:| = (?P<value>.*?))(?:  +# (?P<note>.+))?$")


def load(name: str) -> ml_collections.ConfigDict:
    path, _, argument = name.partition(":")
    return config_files.load_config_file(REPO / "configs" / path, argument or None)


def flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """{dotted name: value} of every field and section (a section's value is its ConfigDict)."""
    out = {}
    for key, value in config.items():
        out[prefix + key] = value
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flat(value, f"{prefix}{key}."))
    return out


def parse(text: str) -> dict:
    """{dotted name: (indent, value or None for a section, note)} from `describe`'s lines."""
    lines = text.splitlines()
    assert lines[0].startswith("# ")
    out = {}
    for line in lines[1:]:
        if not line:
            continue
        m = LINE.match(line)
        assert m, f"unreadable line {line!r}"
        assert m["name"] not in out, f"{m['name']} printed twice"
        value = None if m["rest"] == ":" else ast.literal_eval(m["value"])
        out[m["name"]] = (len(m["indent"]), value, m["note"])
    return out


def test_every_described_name_is_in_a_shipped_config():
    names = {n for name in SHIPPED for n in flat(load(name))}  # the demo's, and task sections only others have
    stale = [p for p in config_reference.DESCRIPTIONS
             if not any(re.fullmatch(re.escape(p).replace(r"\*", r"[^.]+"), n) for n in names)]
    assert not stale, f"described in vlm_jax/config_reference.py but absent from every shipped config: {stale}"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_field_of_every_shipped_config_is_described(name):
    missing = [n for n in flat(load(name)) if config_reference.description(n) is None]
    assert not missing, f"configs/{name}: add these fields to vlm_jax.config_reference.DESCRIPTIONS: {missing}"


def test_descriptions_are_single_short_lines():
    long = {k: v for k, v in config_reference.DESCRIPTIONS.items() if "\n" in v or not 0 < len(v) <= 100}
    assert not long, f"expected one line of 1..100 characters: {long}"


@pytest.mark.parametrize("name", SHIPPED)
def test_the_printed_tree_is_the_config(name):
    config = load(name)
    expected = flat(config)
    printed = parse(config_reference.describe(config))
    assert set(printed) == set(expected)
    for field, (indent, value, note) in printed.items():
        assert indent == 2 * field.count("."), field
        if isinstance(expected[field], ml_collections.ConfigDict):
            assert value is None, field
        else:
            assert value == expected[field], field
        assert note == config_reference.description(field), field


def test_an_override_shows_in_the_printed_config():
    config = load("tiny_synthetic.py")
    config.update_from_flattened_dict({"optim.accum_steps": 4, "data.data_dir": "/data/tfds",
                                       "optim.groups.all.lr": 3e-4})
    printed = parse(config_reference.describe(config))
    assert printed["optim.accum_steps"][1:] == (4, config_reference.DESCRIPTIONS["optim.accum_steps"])
    assert printed["data.data_dir"][1] == "/data/tfds"
    assert printed["optim.groups.all.lr"][1:] == (3e-4, "peak learning rate")


def test_a_field_without_description_prints_last_without_a_note():
    config = load("tiny_synthetic.py")
    config.undocumented = 3
    lines = config_reference.describe(config).splitlines()
    assert lines[-1] == "undocumented = 3"


def test_print_config_prints_the_described_tree_with_the_overrides():
    overrides = ["--config.optim.accum_steps=4", "--config.tasks.box.head=linear"]
    out = subprocess.run([sys.executable, "-m", "vlm_jax.main", "--config", "configs/tiny_synthetic.py",
                          "--print_config", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = load("tiny_synthetic.py")
    expected.update_from_flattened_dict({"optim.accum_steps": 4, "tasks.box.head": "linear"})
    assert out.stdout.rstrip("\n") == config_reference.describe(expected)
    assert parse(out.stdout)["tasks.box.head"][1] == "linear"
