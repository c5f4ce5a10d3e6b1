"""Model loading: find the model, quantize it, plan its placement over the GPUs, and load each copy."""
