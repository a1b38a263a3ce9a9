"""Meters: definitions, config.yaml validation, JSONPath extraction and value rules.

A meter turns the ``data`` of every event whose ``type`` equals its ``eventType`` into a
:class:`Measurement` (or a :class:`Rejection` saying why it could not). Everything here is
pure so the processor, the query service and the ``recompute`` job all meter identically;
the only I/O is :func:`load_meters` reading the YAML file.

One concept per module: ``aggregation`` (the enum), ``values`` (which values are numbers, and
canonical text for uniques and groups), ``jsonpath`` (paths compiled to getters), ``model``
(``Meter`` and its validation), ``measuring`` (``MeterSet.measure``), ``config`` (config.yaml).
This package re-exports the public names, so callers import from ``meterline.core.meters``.
"""

from __future__ import annotations

from meterline.core.meters.aggregation import Aggregation, WindowSize
from meterline.core.meters.config import UnreadableMeters, load_meters, read_config, validate_meters
from meterline.core.meters.jsonpath import MISSING, compile_path
from meterline.core.meters.measuring import Measurement, MeterSet, Rejection
from meterline.core.meters.model import Meter
from meterline.core.meters.values import NumericValueError, parse_numeric

__all__ = [
    "MISSING",
    "Aggregation",
    "Measurement",
    "Meter",
    "MeterSet",
    "NumericValueError",
    "Rejection",
    "UnreadableMeters",
    "WindowSize",
    "compile_path",
    "load_meters",
    "parse_numeric",
    "read_config",
    "validate_meters",
]
