"""SageMaker LLM serving container: Flask front, continuous-batching engine, transformers models."""

__version__ = "0.1.0"
