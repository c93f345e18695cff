"""The named registries behind every config choice."""

import pytest

from utils.registry import Registry, UnknownNameError, closest_names


def test_register_get_and_order():
    reg = Registry("MODEL.THING", "thing")
    a, b = object(), object()
    reg.register("alpha", a)
    reg.decorator("beta")(b)
    assert reg.get("alpha") is a and reg.get("beta") is b
    assert reg.names() == ["alpha", "beta"] and "alpha" in reg and len(reg) == 2


def test_unknown_name_names_key_closest_and_valid():
    reg = Registry("MODEL.THING", "thing")
    reg.register("market1501", 1)
    reg.register("msmt17", 2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("Market1051")
    text = str(err.value)
    assert "MODEL.THING = 'Market1051'" in text
    assert "did you mean 'market1501'" in text and "msmt17" in text


def test_second_registration_refused_unless_overwrite():
    reg = Registry("K", "thing")
    reg.register("x", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", 2)
    reg.register("x", 2, overwrite=True)
    assert reg.get("x") == 2


def test_closest_names_is_case_insensitive():
    assert closest_names("VIT-b-16", ["ViT-B-16", "RN50"]) == ["ViT-B-16"]
    assert closest_names("zzzz", ["ViT-B-16", "RN50"]) == []
