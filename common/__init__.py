"""What more than one part needs and is not the wire contract: durable file writes and the
one place that picks a TFLite runtime. Imports nothing of the project."""
