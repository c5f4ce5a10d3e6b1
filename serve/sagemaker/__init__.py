"""SageMaker's own features: /ping and /invocations, sessions, runtime adapters, EMF metrics, custom handlers."""
