"""The handler registry: handlers by requestType from objects, modules and module names."""

from __future__ import annotations

import types
from typing import Any

import pytest
from workers import examples

from relaybus.handlers import registerHandlers
from relaybus.testing import FakeRequestHandler


def test_register_handler_objects() -> None:
    a, b = FakeRequestHandler("a"), FakeRequestHandler("b")
    assert registerHandlers(a, b) == {"a": a, "b": b}
    assert registerHandlers() == {}


def test_register_handlers_from_a_module_and_a_dotted_name() -> None:
    expected = {"testRequest": examples.testRequest, "echo": examples.echo,
                "primes": examples.primes}
    assert registerHandlers(examples) == expected
    assert registerHandlers("workers.examples") == expected


def test_register_handlers_mixing_sources() -> None:
    extra = FakeRequestHandler("extra")
    registry = registerHandlers("workers.examples", extra)
    assert sorted(registry) == ["echo", "extra", "primes", "testRequest"]


def test_module_handlers_skip_classes_and_other_values() -> None:
    module = types.ModuleType("someHandlers")
    module.handlerClass = examples.EchoHandler  # type: ignore[attr-defined]
    module.number = 5  # type: ignore[attr-defined]
    module.instance = FakeRequestHandler("only-me")  # type: ignore[attr-defined]
    assert list(registerHandlers(module)) == ["only-me"]


@pytest.mark.parametrize("sources", [
    pytest.param((examples.echo, examples.EchoHandler()), id="two-objects"),
    pytest.param(("workers.examples", FakeRequestHandler("echo")), id="module-and-object"),
    pytest.param(("workers.examples", "workers.examples"), id="same-module-twice"),
])
def test_duplicate_request_type_is_value_error(sources: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="two handlers serve requestType"):
        registerHandlers(*sources)


@pytest.mark.parametrize("source", ["json", types.ModuleType("empty"), "relaybus.errors"])
def test_module_without_handlers_is_value_error(source: Any) -> None:
    with pytest.raises(ValueError, match="no IRequestHandler"):
        registerHandlers(source)


@pytest.mark.parametrize("source", [42, None, examples.EchoHandler, object(), b"workers",
                                    ["workers.examples"]])
def test_bad_source_is_type_error(source: Any) -> None:
    with pytest.raises(TypeError):
        registerHandlers(source)


def test_unknown_module_name_is_import_error() -> None:
    with pytest.raises(ImportError):
        registerHandlers("workers.no_such_module")
