"""docs/config.md: every config key has help text, the committed page is current, the CLI points to it."""
from typing import Literal, Optional

import pytest
from pydantic import BaseModel, Field

from cwt_ray.cli import COMMANDS, build_parser
from cwt_ray.config import ExperimentConfig
from cwt_ray.config_doc import DOC_PATH, documented_models, main, render, type_name, undocumented, yaml_value


def test_every_config_key_has_help():
    missing = undocumented(ExperimentConfig)
    assert not missing, (f"config keys without help: {', '.join(missing)}; give each a "
                         "Field(..., description=...) in cwt_ray/config.py, then run `make docs`")


def test_walker_reaches_nested_and_optional_sections():
    # The help check must be able to fail: a key lacking help anywhere below the top is found.
    class Inner(BaseModel):
        documented: int = Field(1, description="has help")
        bare: float = 0.5

    class Outer(BaseModel):
        name: str = Field("x", description="has help")
        plain: Inner = Field(default_factory=Inner, description="a section")
        maybe: Optional[Inner] = None

    assert undocumented(Outer) == ["plain.bare", "maybe", "maybe.bare"]


def test_committed_config_doc_is_current():
    fresh = render(documented_models())
    assert DOC_PATH.is_file(), "docs/config.md is missing: run `make docs` (python -m cwt_ray.config_doc)"
    assert DOC_PATH.read_text() == fresh, "docs/config.md is stale: run `make docs` (python -m cwt_ray.config_doc)"
    assert main(["--check"]) == 0


def test_config_doc_lists_every_key_once():
    text = render(documented_models())
    for key in ("train.lr", "train.lora.r", "data.validation_size", "methods", "stt.gate", "debug.kill_at_step"):
        assert text.count(f"| `{key}` |") == 1, key
    assert "cwt-ray run CONFIG train.lr=3e-4" in text and "make docs" in text
    assert "| `train.lr_schedule` | `'constant' \\| 'linear' \\| 'cosine'` | `linear` |" in text


def test_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cwt_ray.config_doc.DOC_PATH", tmp_path / "config.md")
    assert main(["--check"]) == 1
    capsys.readouterr()
    (tmp_path / "config.md").write_text(render(documented_models()) + "edited by hand\n")
    assert main(["--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert "make docs" in err and "\n" not in err
    assert main([]) == 0 and main(["--check"]) == 0


@pytest.mark.parametrize("annotation, shown", [
    (int, "int"), (list[str], "list[str]"), (Optional[int], "int or null"),
    (Optional[str | list[str]], "str or list[str] or null"), (Literal["a", "off"], "'a' | 'off'"),
    (dict[str, float], "dict[str, float]"),
])
def test_type_names(annotation, shown):
    assert type_name(annotation) == shown


def test_defaults_as_yaml():
    assert yaml_value(None) == "null" and yaml_value(True) == "true" and yaml_value(1e-4) == "0.0001"
    assert yaml_value(["std_cot", "cwt"]) == "[std_cot, cwt]"
    assert yaml_value("a\nb") == '"a\\nb"'


@pytest.mark.parametrize("command", [c for c in ("run", "data", "chunk", "train", "eval", "report", "skip")
                                     if c in COMMANDS] + ["teach"])
def test_config_commands_help_points_to_config_doc(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    assert "docs/config.md" in capsys.readouterr().out
