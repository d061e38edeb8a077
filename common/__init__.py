"""What more than one part needs and is not the wire contract: durable file writes
(`files`), the one place that picks a TFLite runtime (`litert`), and the one line a
program says when its extra is not installed (`extras`). Imports nothing of the project."""
