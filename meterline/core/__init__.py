"""meterline's pure domain: events, meters, windows, rows, positions, schema. No I/O happens here.

Everything else (adapters, processes, jobs, CLI) depends on this package; it depends on none of them,
which `make lint` checks (import-linter contracts in pyproject.toml).
"""
