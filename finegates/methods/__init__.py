"""Finetuning methods, one module each, registered by name (the order is the CLIs' order).

Adding a method: one module here (a :class:`Method` subclass with its ``Options``, ``search`` ranges,
``reference`` and ``help``) and one line in ``METHODS`` below; the CLIs' choices and help, the config
validation and the sweep's search spaces (tune/space.py) all read this registry.
"""
from __future__ import annotations

from finegates.methods.base import Choice, LogUniform, Method, NoOptions, Range, Uniform
from finegates.methods.bitfit import BitFit
from finegates.methods.finegates import FineGates, FineGatesLora
from finegates.methods.full import Full
from finegates.methods.gift_sw import GiftSW
from finegates.methods.lora import Lora
from finegates.methods.propulsion import Propulsion
from finegates.methods.sparta import Sparta

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    FineGates,
    FineGatesLora,
    GiftSW,
    Sparta,
    Propulsion,
    Lora,
    BitFit,
    Full,
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]


def get_method(name: str) -> Method:
    return get_method_class(name)()


def methods_help() -> str:
    """One line per method (for the CLIs' help)."""
    return "; ".join(f"{n}: {m.help}" for n, m in METHODS.items())


__all__ = ["METHODS", "METHOD_NAMES", "BitFit", "Choice", "FineGates", "FineGatesLora", "Full", "GiftSW", "LogUniform",
           "Lora", "Method", "NoOptions", "Propulsion", "Range", "Sparta", "Uniform", "get_method", "get_method_class",
           "methods_help"]
