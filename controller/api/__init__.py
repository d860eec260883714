"""The controller's REST API (FastAPI): one router per resource, mounted by `fleet.controller.app`."""
