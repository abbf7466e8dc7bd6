"""Service layer: functions with keyword-only arguments that take a session and
raise :mod:`broker.errors` exceptions. Routers stay thin and call these."""
