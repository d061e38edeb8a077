"""Webhook alerts: events found in the database, raised once, posted with retries.

Kept free of imports so that `fleet_server.settings` can import the configuration
models without pulling in the dispatcher (which needs the settings itself).
"""
