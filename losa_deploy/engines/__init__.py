"""Running packed models in serving engines: ONNX Runtime and DeepSparse (through files, in DeepSparse's
own venv) for the ``deepsparse`` format, and our vLLM plugin for the ``vllm`` format."""
