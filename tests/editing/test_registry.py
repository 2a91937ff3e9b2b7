"""The editor registry: one entry per method, names known without importing torch."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from editing.editors.base import EditError, Editor
from editing.registry import EDITORS, get_editor

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_each_entry_is_the_editor_of_that_name(name: str) -> None:
    cls = EDITORS[name]
    assert issubclass(cls, Editor) and cls.name == name


#: Constructor arguments that are objects, which no method spec or settings file can give.
OBJECT_ARGUMENTS = {"self", "config", "stats", "state", "paths"}


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_option_names_are_what_the_constructor_takes(name: str) -> None:
    """The settings check ``editor.options`` against ``option_names``; it must list every
    scalar constructor option, and only names the constructor takes."""
    cls = EDITORS[name]
    parameters = inspect.signature(cls.__init__).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    assert named - OBJECT_ARGUMENTS <= cls.option_names()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    assert takes_any or cls.option_names() <= named


def test_an_unknown_method_names_the_known_ones() -> None:
    assert "memit" not in EDITORS
    known = "emsedit, ft, memory, none, nse"
    with pytest.raises(EditError, match=f"unknown editor 'memit'; known: {known}"):
        get_editor("memit")


def test_a_mistyped_spec_option_names_the_key_and_the_options() -> None:
    with pytest.raises(EditError, match=r"num_stepz is not an option of ft .*num_steps"):
        get_editor("ft:num_stepz=1")
    with pytest.raises(EditError, match=r"lamda is not an option of nse"):
        get_editor("nse:lamda=5")
    assert get_editor("ft:num_steps=3").config.num_steps == 3  # a known one still passes
    get_editor("emsedit+safeguards:mask_p=0.8")  # safeguard fields are not the editor's


def test_names_need_no_torch_and_an_editor_module_imports_on_its_own() -> None:
    """Checking names imports no editor; an editor module imported first (before the registry
    ever was) loads without an import-order shim, and the registry hands out that same class."""
    code = (
        "import sys\n"
        "from editing.registry import EDITORS\n"
        "assert sorted(EDITORS) == ['emsedit', 'ft', 'memory', 'none', 'nse']\n"
        "assert 'torch' not in sys.modules, 'listing editor names imported torch'\n"
        "from editing.nse.editor import NSEEditor\n"
        "assert EDITORS['nse'] is NSEEditor\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
