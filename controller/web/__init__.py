"""The controller's web dashboard: a static operator page that reads the public REST API.

Rule: the dashboard is a client of `/api/v1` like the CLI, never a second source of truth; it
has no server-side state and no routes of its own beyond the page and its assets (see `routes`).
"""

from __future__ import annotations

from fleet.controller.web.routes import STATIC_DIR, router

__all__ = ["STATIC_DIR", "router"]
