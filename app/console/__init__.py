"""The console: Runyard's own web pages under /ui/, server-rendered, on the services."""
