"""What `/metrics` exports: the server process's own counters (`server`) and the fleet's
state read from the database at each scrape (`fleet`)."""
