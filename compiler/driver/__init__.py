"""The driver: capture, the pass pipeline, the site contract, verification, measurement, auto,
the ONNX front end and generation. Runs passes and backends; nothing below imports it.
"""
