"""Durable agents: the journal of their calls, their children, and the waits events resume.

The worker side (replaying an agent's calls against the journal) is workers/durable.py; the
writes that make an execution wait and wake are app/executions/waiting.py.
"""
