"""The console: server-rendered pages (Jinja2, autoescaped) for admins, operators and viewers."""
