"""The throughput harness behind ``losa-deploy bench``: engine adapters and their worker processes
(:mod:`.engines`, :mod:`.worker`, :mod:`.onnx_worker`, :mod:`.protocol`), timing and statistics
(:mod:`.timing`), the orchestration (:mod:`.harness`), the standard models (:mod:`.models`) and the
report (:mod:`.report`)."""

from .harness import run_bench

__all__ = ["run_bench"]
