"""params.yaml and its typed sections: one ParamsSection class per section, each setting declared once."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import yaml

import impressionist
from helpers import committed_params_text
from impressionist.errors import UserError
from impressionist.params import ParamsSection, require_positive


def every_section_class() -> list[type[ParamsSection]]:
    """Every ParamsSection subclass the package declares (every module imported first); a shared base
    that names no section (``shipping.HubSection``) is not one."""
    for module in pkgutil.walk_packages(impressionist.__path__, "impressionist."):
        if module.name.split(".")[-1] != "__main__":
            importlib.import_module(module.name)
    found, todo = [], list(ParamsSection.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("impressionist.") and cls.SECTION:
            found.append(cls)
    return found


def all_section_classes() -> dict[str, type[ParamsSection]]:
    """The sections of the params package (no torch), by dotted section path: one class each."""
    found: dict[str, type[ParamsSection]] = {}
    for cls in every_section_class():
        if cls.__module__.startswith("impressionist.params"):
            assert cls.SECTION not in found, f"{cls.SECTION} is declared twice: {found.get(cls.SECTION)} and {cls}"
            found[cls.SECTION] = cls
    return found


def test_sections_live_in_the_params_package_and_code_elsewhere_only_refines_them():
    """A section declared beside heavy code would be out of reach of the early check (and of any
    module that must not import torch); a class outside the package may only add checks that need a
    library (image_features.EvaluateParams: open_clip's registry) to the package's own class."""
    sections = all_section_classes()
    for cls in every_section_class():
        if not cls.__module__.startswith("impressionist.params"):
            assert issubclass(cls, sections[cls.SECTION]), f"{cls} declares '{cls.SECTION}' outside impressionist.params"
            assert {f.name for f in dataclasses.fields(cls)} == {f.name for f in dataclasses.fields(sections[cls.SECTION])}


def test_every_params_section_has_one_typed_class_declaring_exactly_its_settings():
    classes = all_section_classes()
    params = yaml.safe_load(committed_params_text())
    top = {name for name in classes if "." not in name}
    assert top == set(params), "params.yaml sections and ParamsSection classes differ"
    for name, cls in classes.items():
        values = params
        for part in name.split("."):
            values = values[part]
        declared = {f.name for f in dataclasses.fields(cls)}
        # params.yaml documents every setting (it is the user's single source of truth) and the class
        # declares nothing params.yaml does not show
        assert declared == set(values), f"{name}: class {sorted(declared ^ set(values))} differ from params.yaml"
        cls.check(params)  # the committed recipe is valid


def test_the_demo_overrides_are_valid_settings(demo_params):
    for name, cls in all_section_classes().items():
        cls.check(demo_params)


@dataclass(frozen=True)
class InnerParams(ParamsSection):
    SECTION: ClassVar[str] = "outer.inner"
    steps: int = 20


@dataclass(frozen=True)
class OuterParams(ParamsSection):
    SECTION: ClassVar[str] = "outer"
    MISSING_HINTS: ClassVar[dict[str, str]] = {"rate": "the step size, e.g. 0.5"}
    rate: float
    names: list[str] = field(default_factory=list)
    inner: InnerParams = field(default_factory=InnerParams)

    def __post_init__(self) -> None:
        require_positive(self.rate, "outer.rate")
        self._set("names", [n.lower() for n in self.names])


def test_check_builds_nested_sections_declares_defaults_once_and_freezes():
    params = OuterParams.check({"outer": {"rate": 0.5, "names": ["Monet"], "inner": {"steps": 4}}})
    assert params == OuterParams(rate=0.5, names=["monet"], inner=InnerParams(steps=4))
    assert OuterParams.check({"outer": {"rate": 1}}).inner.steps == 20
    assert params.as_dict() == {"rate": 0.5, "names": ["monet"], "inner": {"steps": 4}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.rate = 2


@pytest.mark.parametrize("values, message", [
    ({"outer": {"rate": 1, "rtae": 2}}, r"^params.yaml: 'outer.rtae' is not a setting of 'outer' \(its settings: rate, names, inner\)$"),
    ({"outer": {"rate": 1, "inner": {"step": 2}}}, r"'outer.inner.step' is not a setting of 'outer.inner'"),
    ({"outer": {"names": []}}, r"^params.yaml: 'outer.rate' is missing; the step size, e.g. 0.5$"),
    ({"outer": {"rate": -1}}, r"^params.yaml: outer.rate=-1 must be a number > 0$"),
    ({"outer": {"rate": 1, "inner": 3}}, r"'outer.inner' must be a mapping"),
    ({"other": {}}, r"^params.yaml has no 'outer' section$"),
])
def test_check_names_the_first_wrong_setting_in_one_line(values, message):
    with pytest.raises(UserError, match=message):
        OuterParams.check(values)


@dataclass(frozen=True)
class OptionalParams(ParamsSection):
    SECTION: ClassVar[str] = "extras"
    OPTIONAL: ClassVar[bool] = True
    fused: bool = False


def test_an_optional_section_may_be_left_out_but_is_checked_when_present():
    assert OptionalParams.check({}) == OptionalParams.check({"extras": None}) == OptionalParams(fused=False)
    assert OptionalParams.check({"extras": {"fused": True}}).fused is True
    with pytest.raises(UserError, match="'extras.fsued' is not a setting"):
        OptionalParams.check({"extras": {"fsued": True}})
    with pytest.raises(UserError, match="no 'outer' section"):
        OuterParams.check({})  # not optional
