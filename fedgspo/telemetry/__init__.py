"""Telemetry: step records (JSONL, TensorBoard, Prometheus), alert rules, OpenTelemetry spans."""
