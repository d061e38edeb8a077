"""Tests of the device agent; they build their models with TensorFlow, the agent never does."""
