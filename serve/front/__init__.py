"""The front's side of the engine boundary: prompts encoded, requests admitted and watched, results collected."""
