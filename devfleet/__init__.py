"""The development fleet: a broker, the server and agents started on this machine, as the
demo, the benchmarks and the tests need them. Not part of the server: it runs from the
source tree, is not installed, and nothing that ships imports it."""
