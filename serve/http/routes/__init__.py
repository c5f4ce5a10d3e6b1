"""HTTP routes: thin handlers that parse, validate, admit, call the engine and render."""
