"""The development fleet: a broker, the server and agents started on this machine, as the
demo, the benchmarks and the tests need them. Not part of the server, and never imported
by what ships (the server, the agent, the toolchain)."""
