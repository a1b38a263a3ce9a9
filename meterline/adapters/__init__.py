"""Adapters between the core and the world: ClickHouse, Kafka, HTTP problems and health, logging.

They translate dependency exceptions into `meterline.core.errors`, so the processes never catch a
driver's exception type.
"""
