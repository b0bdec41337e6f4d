"""Secrets: write-only values sealed at rest, referenced by agents as {"$secret": "name"}."""
