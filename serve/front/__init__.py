"""The front's side of the engine boundary: prompts rendered and encoded, requests admitted, results collected."""
