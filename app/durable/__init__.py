"""Durable execution: steps, children, sleeps and event waits (the lead's package)."""
